"""Training policies: which parameters train, what the counts say, and that frozen weights never move."""

import json

import pytest
import torch
from conftest import tiny_recipe
from transformers import AutoTokenizer

from finetune.backbones import build_model
from finetune.config import RecipeError
from finetune.data import label_names, load_splits, make_collator, tokenize
from finetune.loop import make_optimizer
from finetune.policies import POLICIES, apply_policy, count_parameters

LABELS = ["0", "1"]
HIDDEN, LAYERS, INTERMEDIATE = 32, 2, 64  # the tiny backbone


def make_recipe(backbone, data, tmp_path, **policy):
    return tiny_recipe(backbone, data, tmp_path, policy=policy, train={"lr": 1e-2, "batch_size": 16, "weight_decay": 0.01})


def build(backbone, data, tmp_path, task="classification", **policy):
    """The tiny model with the policy applied, and the recipe it came from."""
    recipe = make_recipe(backbone, data, tmp_path, **policy)
    if task != "classification":
        recipe = recipe.with_overrides([f"task={task}", "eval.metrics=[entity_f1]", "eval.primary=entity_f1"])
    model = apply_policy(build_model(recipe, backbone, LABELS), recipe)
    return model, recipe


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def numel(model, keep) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if keep(name))


def test_full_trains_everything(tiny_backbone, sentiment_dir, tmp_path):
    """kind=full: every parameter requires grad and the counts agree."""
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, kind="full")
    total = sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model) == (total, total)


def test_head_only_trains_only_the_head(tiny_backbone, sentiment_dir, tmp_path):
    """kind=head_only: the backbone is frozen, the classifier trains."""
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, kind="head_only")
    names = trainable_names(model)
    assert names == {name for name, _ in model.named_parameters() if name.startswith("classifier.")}
    head = numel(model, lambda n: n.startswith("classifier."))
    assert head == HIDDEN * len(LABELS) + len(LABELS)
    assert count_parameters(model) == (head, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("embeddings, layers", [(True, 1), (False, 2), (True, 0)])
def test_freeze_embeddings_and_lower_layers(embeddings, layers, tiny_backbone, sentiment_dir, tmp_path):
    """kind=freeze: embeddings (if asked) and the first N encoder layers are frozen, the rest trains."""
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, kind="freeze",
                     freeze_embeddings=embeddings, freeze_layers=layers)

    def frozen(name):
        return (embeddings and name.startswith("backbone.embeddings.")) or any(
            name.startswith(f"backbone.encoder.layer.{i}.") for i in range(layers))

    all_names = {name for name, _ in model.named_parameters()}
    assert trainable_names(model) == {name for name in all_names if not frozen(name)}
    assert any(n.startswith("classifier.") for n in trainable_names(model))
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total - numel(model, frozen), total)


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_lora_trains_adapters_and_head(task, tiny_backbone, sentiment_dir, tmp_path):
    """kind=lora: only lora_ weights on the target modules and the saved copy of the classifier train."""
    rank = 4
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, task=task, kind="lora",
                     lora={"rank": rank, "target_modules": ["query", "value"]})
    names = trainable_names(model)
    assert names and all("lora_" in n or ".classifier.modules_to_save." in n for n in names), names
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n} == {"query", "value"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "original_module" in n)
    assert "classifier" in model.peft_config["default"].modules_to_save

    adapters = LAYERS * 2 * rank * (HIDDEN + HIDDEN)  # A: rank x in, B: out x rank, on 2 modules per layer
    head = HIDDEN * len(LABELS) + len(LABELS)
    trainable, total = count_parameters(model)
    assert trainable == adapters + head
    assert numel(model, lambda n: "lora_" in n) == adapters
    base = model.get_base_model()
    assert total == sum(p.numel() for p in base.parameters())
    assert total == numel(model, lambda n: "lora_" not in n and "modules_to_save" not in n) + adapters + head


# --- frozen weights really stay frozen ---------------------------------------------------


@pytest.fixture(scope="module")
def batch(tiny_backbone, sentiment_dir, tmp_path_factory):
    """One real tokenised, collated training batch of 16 sentences."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path_factory.mktemp("batch"))
    raw = load_splits(recipe.data)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    train = tokenize(recipe, raw, tokenizer, label_names(recipe, raw))["train"]
    return make_collator(recipe, tokenizer)([train[i] for i in range(16)])


@pytest.mark.parametrize("policy", [
    {"kind": "head_only"},
    {"kind": "lora", "lora": {"rank": 4, "target_modules": ["query", "value"]}},
    {"kind": "freeze", "freeze_embeddings": True, "freeze_layers": 1},
    {"kind": "bitfit"},
    {"kind": "ia3"},
    {"kind": "dora", "lora": {"rank": 4, "target_modules": ["query", "value"]}},
])
def test_only_trainable_parameters_are_updated(policy, batch, tiny_backbone, sentiment_dir, tmp_path):
    """After real optimizer steps, frozen parameters are bit-identical and every trainable one moved."""
    model, recipe = build(tiny_backbone, sentiment_dir, tmp_path, **policy)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, recipe)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable_names(model))
    model.train()
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_optimizer_skips_decay_on_biases_and_norms(tiny_backbone, sentiment_dir, tmp_path):
    """make_optimizer puts matrices in the decayed group, biases and LayerNorm weights in the undecayed one."""
    model, recipe = build(tiny_backbone, sentiment_dir, tmp_path, kind="full")
    decay, no_decay = make_optimizer(model, recipe).param_groups
    assert decay["weight_decay"] == recipe.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- errors -----------------------------------------------------------------------------------


def test_freeze_more_layers_than_exist(tiny_backbone, sentiment_dir, tmp_path):
    """freeze_layers beyond the backbone's depth is a RecipeError giving the real depth."""
    with pytest.raises(RecipeError, match=rf"freeze_layers=3 but the backbone has only {LAYERS} layers"):
        build(tiny_backbone, sentiment_dir, tmp_path, kind="freeze", freeze_layers=3)


def test_lora_unknown_target_module(tiny_backbone, sentiment_dir, tmp_path):
    """A LoRA target the backbone lacks is named, with the linear modules it does have."""
    with pytest.raises(RecipeError, match=r"no linear module named 'q_proj'.*'dense'.*'key'.*'query'.*'value'"):
        build(tiny_backbone, sentiment_dir, tmp_path, kind="lora", lora={"target_modules": ["query", "q_proj"]})


# --- the registry and the three newer policies (BitFit, IA3, DoRA) ------------------------------


def test_the_registry_names_every_kind_the_schema_accepts():
    """PolicyConfig.kind, POLICIES and recipe_checks' mirror of the adapter kinds agree."""
    from typing import get_args

    from finetune import recipe_checks
    from finetune.config import PolicyConfig

    assert set(get_args(PolicyConfig.model_fields["kind"].annotation)) == set(POLICIES)
    assert all(name == policy.name for name, policy in POLICIES.items())
    assert set(recipe_checks.ADAPTER_KINDS) == {name for name, policy in POLICIES.items() if policy.adapter}


def test_bitfit_trains_every_bias_and_the_head(tiny_backbone, sentiment_dir, tmp_path):
    """kind=bitfit: all biases (LayerNorm biases too, not their gains) and the head; no peft wrapper."""
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, kind="bitfit")
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")}
    assert "backbone.embeddings.LayerNorm.bias" in names and not any("LayerNorm.weight" in n for n in names)
    # per layer: query, key, value, attention output, 2 LayerNorms, FFN output (HIDDEN each), FFN inner
    biases = LAYERS * (7 * HIDDEN + INTERMEDIATE) + HIDDEN  # + the embeddings' LayerNorm
    assert count_parameters(model)[0] == biases + HIDDEN * len(LABELS) + len(LABELS)


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_ia3_scales_keys_values_and_the_feedforward_input(task, tiny_backbone, sentiment_dir, tmp_path):
    """kind=ia3 (paper set): keys and values scaled at their output, the FFN output projection at its input;
    the attention output projection, which peft's 'output.dense' matches too, is left alone."""
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, task=task, kind="ia3")
    names = trainable_names(model)
    assert all("ia3_l" in n or ".classifier.modules_to_save." in n for n in names), names
    shapes = {n.split(".layer.0.")[1].split(".ia3_l")[0]: tuple(p.shape)
              for n, p in model.named_parameters() if "ia3_l" in n and ".layer.0." in n}
    assert shapes == {"attention.self.key": (HIDDEN, 1), "attention.self.value": (HIDDEN, 1),
                      "output.dense": (1, INTERMEDIATE)}
    head = HIDDEN * len(LABELS) + len(LABELS)
    assert count_parameters(model)[0] == LAYERS * (2 * HIDDEN + INTERMEDIATE) + head


def test_ia3_scales_take_no_weight_decay(tiny_backbone, sentiment_dir, tmp_path):
    """The (out, 1) / (1, in) scales are 2-D but start at 1: decay would pull them to 0, so they get none."""
    model, recipe = build(tiny_backbone, sentiment_dir, tmp_path, kind="ia3")
    decay, no_decay = make_optimizer(model, recipe).param_groups
    scales = {id(p) for n, p in model.named_parameters() if "ia3_l" in n}
    assert scales and scales <= {id(p) for p in no_decay["params"]}
    assert not scales & {id(p) for p in decay["params"]} and decay["params"]  # the head's matrix still decays


def test_ia3_settings_are_checked(tiny_backbone, sentiment_dir, tmp_path):
    """An unknown target or a feed-forward module outside the targets names the policy.ia3 key."""
    with pytest.raises(RecipeError, match=r"policy.ia3.target_modules: .*no linear module named 'v_proj'"):
        build(tiny_backbone, sentiment_dir, tmp_path, kind="ia3", ia3={"target_modules": ["v_proj"]})
    with pytest.raises(RecipeError, match=r"policy.ia3.feedforward_modules: \['output.dense'\] are not in"):
        build(tiny_backbone, sentiment_dir, tmp_path, kind="ia3",
              ia3={"target_modules": ["value"], "feedforward_modules": ["output.dense"]})
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, kind="ia3", ia3={"target_modules": ["value"]})
    assert count_parameters(model)[0] == LAYERS * HIDDEN + HIDDEN * len(LABELS) + len(LABELS)


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_dora_adds_a_magnitude_per_output_to_lora(task, tiny_backbone, sentiment_dir, tmp_path):
    """kind=dora reads policy.lora: LoRA's A and B plus one magnitude per output of each adapted module."""
    rank = 4
    model, _ = build(tiny_backbone, sentiment_dir, tmp_path, task=task, kind="dora",
                     lora={"rank": rank, "target_modules": ["query", "value"]})
    assert model.peft_config["default"].use_dora
    names = trainable_names(model)
    assert all("lora_" in n or ".classifier.modules_to_save." in n for n in names), names
    magnitudes = LAYERS * 2 * HIDDEN
    assert numel(model, lambda n: "lora_magnitude_vector" in n) == magnitudes
    head = HIDDEN * len(LABELS) + len(LABELS)
    assert count_parameters(model)[0] == LAYERS * 2 * rank * (HIDDEN + HIDDEN) + magnitudes + head


def test_settings_of_another_policy_are_refused(tiny_backbone, sentiment_dir, tmp_path):
    """policy.ia3 only with ia3; policy.lora with lora or dora; output.merge_lora with any adapter."""
    with pytest.raises(RecipeError, match=r"policy.ia3.target_modules=\[.key.\].*policy.kind=lora"):
        make_recipe(tiny_backbone, sentiment_dir, tmp_path, kind="lora", ia3={"target_modules": ["key"]})
    with pytest.raises(RecipeError, match=r"output.merge_lora=true.*policy.kind=bitfit"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "bitfit"},
                    output={"dir": str(tmp_path / "run"), "merge_lora": True})
    make_recipe(tiny_backbone, sentiment_dir, tmp_path, kind="dora", lora={"rank": 4})
    tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "ia3"},
                output={"dir": str(tmp_path / "run"), "merge_lora": True})


# --- trained, saved, reloaded --------------------------------------------------------------------

TEXTS = ["the movie was great and lovely", "a dull and boring plot", "the actor", "superb"]
SMALL = {"max_train_samples": 48, "max_eval_samples": 16, "max_test_samples": 16}  # 6 steps of 8


def small_recipe(backbone, data, folder, policy: dict, **train):
    return tiny_recipe(backbone, data, folder, policy=policy, data=SMALL,
                       train={"epochs": 1, "batch_size": 8, "lr": 1e-2, **train},
                       output={"dir": str(folder / "run"), "merge_lora": policy["kind"] != "bitfit"})


def train(recipe):
    """Run the recipe (as run_recipe does); the result and the trained model, best weights restored."""
    from finetune.run import Run

    run = Run(recipe)
    try:
        run.open_folder(resume=False, overwrite=False)
        run.train()
        result = run.finish()
    finally:
        run.close()
    return result, run.accelerator.unwrap_model(run.model).eval()


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def pretrained(backbone) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"backbone.{k}": v for k, v in load_file(str(backbone / "model.safetensors")).items()}


@pytest.mark.parametrize("kind", ["bitfit", "ia3", "dora"])
def test_trained_run_reloads_with_the_same_predictions(kind, tiny_backbone, sentiment_dir, tmp_path):
    """The run folder loads through load_run (and pipeline(), as the card says) and predicts what the trained
    model did; adapters also write merged/, a plain model with the same logits; frozen weights never moved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, pipeline

    import finetune  # noqa: F401  registers the architecture with the Auto classes
    from finetune.predict import load_run

    result, model = train(small_recipe(tiny_backbone, sentiment_dir, tmp_path, {"kind": kind}))
    run_dir = result.run_dir
    loaded = load_run(run_dir)
    expected = logits(model, loaded.tokenizer)
    assert torch.allclose(logits(loaded.model, loaded.tokenizer), expected, atol=1e-5)

    def pipeline_probabilities(**source) -> torch.Tensor:
        rows = pipeline("text-classification", top_k=None, **source)(TEXTS)
        return torch.tensor([[{s["label"]: s["score"] for s in row}[name] for name in loaded.labels] for row in rows])

    card = (run_dir / "README.md").read_text()
    assert f"| policy | {kind} (" in card
    if POLICIES[kind].transformers_loads:
        assert torch.allclose(pipeline_probabilities(model=str(run_dir)), expected.softmax(-1), atol=1e-5)
    else:  # DoRA: what the card says instead, and why (transformers' loader misses the magnitudes)
        assert "model=model, tokenizer=tokenizer" in card
        given = pipeline_probabilities(model=loaded.model, tokenizer=loaded.tokenizer)
        assert torch.allclose(given, expected.softmax(-1), atol=1e-5)
        assert not torch.allclose(pipeline_probabilities(model=str(run_dir)), expected.softmax(-1), atol=1e-5)

    before = pretrained(tiny_backbone)
    if kind == "bitfit":
        assert not (run_dir / "adapter_config.json").exists() and not (run_dir / "merged").exists()
        saved = load_file(str(run_dir / "model.safetensors"))
    else:
        merged = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "merged")).eval()
        assert torch.allclose(logits(merged, loaded.tokenizer), expected, atol=1e-5)
        adapter = json.loads((run_dir / "adapter_config.json").read_text())
        assert (adapter["peft_type"], adapter.get("use_dora", False)) == {"ia3": ("IA3", False), "dora": ("LORA", True)}[kind]
        saved = load_file(str(run_dir / "base" / "model.safetensors"))
    frozen = [n for n in saved if n in before and not (kind == "bitfit" and n.endswith(".bias"))]
    assert frozen and all(torch.equal(saved[n], before[n]) for n in frozen)
    if kind == "bitfit":
        assert any(not torch.equal(saved[n], before[n]) for n in saved if n.endswith(".bias") and n in before)


def test_an_interrupted_ia3_run_resumes_to_the_same_adapter(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    """Killed right after a mid-epoch checkpoint and resumed, an IA3 run ends with the straight run's adapter."""
    from safetensors.torch import load_file

    import finetune.loop

    train_settings = {"eval_every": 4, "checkpoint_every": 2}
    straight = small_recipe(tiny_backbone, sentiment_dir, tmp_path / "a", {"kind": "ia3"}, **train_settings).run()
    recipe = small_recipe(tiny_backbone, sentiment_dir, tmp_path / "b", {"kind": "ia3"}, **train_settings)
    real_replace, saves = finetune.loop.replace_dir, []

    class Killed(Exception):
        pass

    def replace_then_die(tmp, final):
        real_replace(tmp, final)
        saves.append(final.name)
        if saves.count("last") == 2:  # after step 4 of 6
            raise Killed

    monkeypatch.setattr(finetune.loop, "replace_dir", replace_then_die)
    with pytest.raises(Killed):
        recipe.run()
    assert not (tmp_path / "b" / "run" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(finetune.loop, "replace_dir", real_replace)
    resumed = recipe.run(resume=True)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    a, b = (load_file(str(r.run_dir / "adapter_model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and any("ia3_l" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
