"""Training policies: which parameters train, what the counts say, and that frozen weights never move."""

import pytest
import torch
from conftest import tiny_recipe
from transformers import AutoTokenizer

from finetune.backbones import build_model
from finetune.config import RecipeError
from finetune.data import label_names, load_splits, make_collator, tokenize
from finetune.loop import make_optimizer
from finetune.policies import apply_policy, count_parameters

LABELS = ["0", "1"]
HIDDEN, LAYERS = 32, 2  # the tiny backbone


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
