"""Sequential transfer: a finished run as the next recipe's backbone (finetune.transfer), its head kept or
not, continued training from the command line (--from, --warm-optimizer), and the runs it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from finetune.cli import main
from finetune.config import RecipeError
from finetune.predict import load_run
from finetune.run import Run
from finetune.transfer import ENSEMBLE_FILE

QUERY = "encoder.layer.0.attention.self.query.weight"


pytestmark = pytest.mark.usefixtures("private_cache")  # a $FINETUNE_CACHE of this module's own


@pytest.fixture(scope="module")
def full_run(tiny_backbone, sentiment_dir, tmp_path_factory) -> Path:
    """A full fine-tune that kept its checkpoint (and so its optimizer state)."""
    folder = tmp_path_factory.mktemp("full")
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, folder, train={"epochs": 1}, output={"keep": "model+checkpoint"})
    return recipe.run().run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_backbone, sentiment_dir, tmp_path_factory) -> Path:
    """A LoRA run that also wrote merged/."""
    folder = tmp_path_factory.mktemp("lora")
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, folder, policy={"kind": "lora"},
                         train={"epochs": 1, "lr": 2e-2}, output={"merge_lora": True})
    return recipe.run().run_dir


def started(recipe) -> Run:
    """The run as it stands at step 0: built, nothing written."""
    run = Run(recipe)
    run.close()
    return run


def new_recipe(source, sentiment_dir, tmp_path, backbone: dict | None = None, **sections):
    """The tiny recipe on the backbone ``source`` (a run folder or a model folder), with ``backbone`` settings."""
    recipe = tiny_recipe(Path(source), sentiment_dir, tmp_path, **sections)
    return recipe.with_overrides([f"backbone.{key}={value}" for key, value in (backbone or {}).items()])


def test_the_backbone_weights_come_from_the_run(full_run, tiny_backbone, sentiment_dir, tmp_path):
    run = started(new_recipe(full_run, sentiment_dir, tmp_path, head={"pooling": "auto"}))
    ours = run.model.backbone.state_dict()[QUERY]
    assert torch.equal(ours, load_file(full_run / "model.safetensors")["backbone." + QUERY])
    assert not torch.equal(ours, load_file(tiny_backbone / "model.safetensors")[QUERY])
    assert run.recipe.head.pooling == "mean"  # the run's pooling, not the backbone folder's guess (cls)
    source = run.recipe.backbone.source
    assert (source.run, source.recipe, source.policy, source.backbone) == (str(full_run), "tiny", "full",
                                                                          str(tiny_backbone))
    # a new head, seeded by train.seed: not the run's
    assert not torch.equal(run.model.classifier.layers[1].weight,
                           load_file(full_run / "model.safetensors")["classifier.layers.1.weight"])


def test_a_truncated_backbone_from_a_run_and_too_many_layers(full_run, sentiment_dir, tmp_path):
    recipe = new_recipe(full_run, sentiment_dir, tmp_path, backbone={"num_layers": 1})
    assert len(started(recipe).model.backbone.encoder.layer) == 1
    recipe.backbone.num_layers = 3
    with pytest.raises(RecipeError, match=rf"backbone.num_layers=3: the backbone has only 2 layers \(from run {full_run}"):
        started(recipe)


def test_a_layer_pruned_run_is_a_backbone_of_its_kept_layers(full_run, sentiment_dir, tmp_path):
    from finetune.config import PruneConfig
    from finetune.prune import prune_run
    from finetune.transfer import read_source

    pruned = tmp_path / "pruned"
    prune_run(full_run, PruneConfig(method="layers", layers_kept=1, layer_selection="first"), pruned,
              ["data.max_eval_samples=16", "data.max_test_samples=16"], latency_repeats=1)
    run = started(new_recipe(pruned, sentiment_dir, tmp_path))
    assert len(run.model.backbone.encoder.layer) == 1
    assert torch.equal(run.model.backbone.state_dict()[QUERY],
                       load_file(full_run / "model.safetensors")["backbone." + QUERY])
    assert read_source(run.backbone_path)["loaded"] == "full, pruned by layers"


def test_from_a_lora_run_the_adapter_is_merged(lora_run, sentiment_dir, tmp_path):
    base = load_file(lora_run / "base" / "model.safetensors")["backbone." + QUERY]
    adapter = load_file(lora_run / "adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if "layer.0.attention.self.query.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layer.0.attention.self.query.lora_B" in k)
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    expected = base + (b @ a) * (cfg["lora_alpha"] / cfg["r"])
    assert not torch.allclose(expected, base)  # the adapter learnt something to merge
    from_merged = started(new_recipe(lora_run, sentiment_dir, tmp_path / "a"))
    copy = tmp_path / "lora-without-merged"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "merged")
    from_adapter = started(new_recipe(copy, sentiment_dir, tmp_path / "b"))
    for run in (from_merged, from_adapter):
        assert torch.allclose(run.model.backbone.state_dict()[QUERY], expected, atol=1e-6)
    from finetune.transfer import read_source

    assert read_source(from_adapter.backbone_path)["loaded"] == "lora, merged 4 adapter modules into base/"
    assert read_source(from_merged.backbone_path)["loaded"] == "lora, its merged/ model"


def test_keep_head_continues_the_trained_head(full_run, sentiment_dir, tmp_path):
    source = load_run(full_run)
    run = started(new_recipe(full_run, sentiment_dir, tmp_path, backbone={"keep_head": True}))
    batch = source.tokenizer(["the movie was great", "an awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(run.model.eval()(**batch).logits, source.model(**batch).logits, atol=1e-5)
    # without keep_head a new head is drawn, and the log says the trained one would fit
    run = Run(new_recipe(full_run, sentiment_dir, tmp_path))
    try:
        run.open_folder(resume=False, overwrite=False)
    finally:
        run.close()
    log = (run.run_dir / "train.log").read_text()
    assert f"backbone from run {full_run} (full)" in log
    assert "head: new, seeded by train.seed=42; backbone.keep_head=true would continue with the trained head" in log


def test_keep_head_refuses_other_labels_or_another_head(full_run, sentiment_dir, tmp_path):
    keep = {"keep_head": True}
    recipe = new_recipe(full_run, sentiment_dir, tmp_path, backbone=keep, data={"labels": ["1", "0"]})
    with pytest.raises(RecipeError, match=r"labels differ: run has \[0, 1\], recipe has \[1, 0\]"):
        started(recipe)
    recipe = new_recipe(full_run, sentiment_dir, tmp_path, backbone=keep, head={"type": "mlp", "pooling": "cls"})
    with pytest.raises(RecipeError, match=r"head.type differs: run has linear, recipe has mlp; head.pooling differs"):
        started(recipe)


def test_train_from_a_run_on_the_command_line(full_run, sentiment_dir, tmp_path):
    """--from keeps the head; --warm-optimizer restores the run's moments, by parameter name."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(new_recipe(Path("unused"), sentiment_dir, tmp_path).to_yaml())
    run_dir = tmp_path / "continued"
    assert main(["train", "--recipe", str(recipe_file), "--from", str(full_run), "--warm-optimizer",
                 f"output.dir={run_dir}", "train.max_steps=2", "--quiet"]) == 0
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())["backbone"]
    assert saved["name"] == str(full_run) and saved["keep_head"] and saved["warm_optimizer"]
    assert saved["source"]["run"] == str(full_run) and saved["source"]["recipe"] == "tiny"
    log = (run_dir / "train.log").read_text()
    assert f"backbone from run {full_run} (full)" in log and "optimizer: AdamW moments of 39 parameter" in log
    assert main(["train", "--recipe", str(recipe_file), "--warm-optimizer"]) == 2
    assert main(["train", "--recipe", str(recipe_file), "--from", str(full_run), f"backbone.name={full_run}"]) == 2


def test_warm_optimizer_restores_the_moments(full_run, sentiment_dir, tmp_path):
    """Matched by name, though this recipe groups its parameters otherwise (head_lr: 4 groups, the run's 2)."""
    recipe = new_recipe(full_run, sentiment_dir, tmp_path, train={"head_lr": 1e-2},
                        backbone={"keep_head": True, "warm_optimizer": True})
    run = Run(recipe)
    try:
        run.open_folder(resume=False, overwrite=False)
        saved = torch.load(full_run / "checkpoints" / "last" / "optimizer.bin", weights_only=True)
        params = dict(run.model.named_parameters())
        # the run's groups: decayed tensors, then undecayed ones (ndim < 2), each in the model's order
        groups = [[n for n, p in params.items() if p.ndim >= 2], [n for n, p in params.items() if p.ndim < 2]]
        assert [len(g["params"]) for g in saved["param_groups"]] == [len(g) for g in groups]
        assert len(run.optimizer.param_groups) == 4
        for name in ("backbone." + QUERY, "classifier.layers.1.weight", "backbone.embeddings.LayerNorm.bias"):
            group = 0 if name in groups[0] else 1
            theirs = saved["state"][saved["param_groups"][group]["params"][groups[group].index(name)]]
            mine = run.optimizer.optimizer.state[params[name]]
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
            assert mine["step"] == theirs["step"] > 0
        # this recipe's learning rates on a fresh schedule; the run's linear one had come down to 0
        assert {g["lr"] for g in saved["param_groups"]} == {0.0}
        assert {g["lr"] for g in run.optimizer.param_groups} == {5e-3, 1e-2}
    finally:
        run.close()


def test_runs_that_cannot_be_a_backbone_are_refused(full_run, lora_run, tiny_backbone, sentiment_dir, tmp_path):
    def refused(folder: Path, match: str, **backbone) -> None:
        recipe = new_recipe(folder, sentiment_dir, tmp_path, backbone=backbone)
        with pytest.raises(RecipeError, match=match):
            started(recipe)

    removed = tmp_path / "removed"
    shutil.copytree(full_run, removed)
    (removed / "MODEL_REMOVED.txt").write_text("removed by its sweep\n")
    refused(removed, rf"backbone.name={removed}: {removed} had its model removed by its sweep")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(full_run, unfinished)
    (unfinished / "metrics.json").unlink()
    refused(unfinished, r"is an unfinished run \(no metrics.json\); finish it with finetune train --recipe .* --resume")
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / ENSEMBLE_FILE).write_text("{}")
    refused(ensemble, r"is an ensemble, not a single model; name one of its members' run folders")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.yaml").write_text("{}")
    refused(sweep, rf"is a sweep, not a run; name its best trial's run folder {sweep / 'best'}")
    refused(lora_run / "merged", rf"is the model folder inside a run, not the run; name the run folder {lora_run}$")
    heads = tmp_path / "head-pruned"
    shutil.copytree(full_run, heads)
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**config, "removed_heads": {"0": [1]}}))
    refused(heads, r"is a head-pruned run \(prune.method=heads\)")
    refused(lora_run, r"kept no optimizer state: it ran with output.keep=model.*output.keep=model\+checkpoint",
            keep_head=True, warm_optimizer=True)
    refused(tiny_backbone, rf"backbone.keep_head=true: backbone.name={tiny_backbone} is not a run folder",
            keep_head=True)


def test_compare_a_plain_backbone_with_one_from_a_run(full_run, tiny_backbone, sentiment_dir, tmp_path):
    from finetune.compare import compare

    recipe = new_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2, "eval_every": 1},
                        data={"max_eval_samples": 16, "max_test_samples": 16})
    variants = f"plain:backbone.name={tiny_backbone},from_x:backbone.name={full_run}"
    result = compare(recipe, variants, tmp_path / "cmp", metric="loss")
    assert [row["variant"] for row in result.rows] == ["plain", "from_x"]
    saved = yaml.safe_load((tmp_path / "cmp" / "runs" / "from_x-seed42" / "recipe.yaml").read_text())
    assert saved["backbone"]["source"]["run"] == str(full_run)
    again = compare(recipe, variants, tmp_path / "cmp", metric="loss")  # finished runs are reused, not refused
    assert [row["variant"] for row in again.rows] == ["plain", "from_x"]


def test_the_file_names_transfer_reads_are_the_ones_written():
    """Names copied from modules transfer and the schema cannot import (they sit above them)."""
    from accelerate.utils import OPTIMIZER_NAME

    from finetune import config, runs, transfer
    from finetune.ensemble.artefact import ARTEFACT

    assert (transfer.ENSEMBLE_FILE, transfer.OPTIMIZER_FILE) == (ARTEFACT, f"{OPTIMIZER_NAME}.bin")
    assert (config.RUN_RECIPE, config.RUN_METRICS) == (runs.RECIPE, runs.METRICS)
