"""Distillation: the student's loss per task, the teacher's targets (one run or an ensemble, cached), the
student recipe ``finetune distill`` builds, and the inputs it refuses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_tsv
from torch.nn import functional as F

from finetune.cli import main
from finetune.config import RecipeError
from finetune.distill import student_recipe
from finetune.distill import teacher as teacher_lib
from finetune.distill.loss import LOSSES
from finetune.errors import DataError

NO_ANALYSIS = {"analyze": False}  # the end-of-run analysis is tested elsewhere; these tests train many runs


pytestmark = pytest.mark.usefixtures("private_cache")  # a $FINETUNE_CACHE of this module's own


@pytest.fixture(scope="module")
def teacher_run(tiny_backbone, sentiment_dir, tmp_path_factory) -> Path:
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path_factory.mktemp("teacher"), train={"epochs": 5},
                         eval=NO_ANALYSIS)
    return recipe.run().run_dir


@pytest.fixture(scope="module")
def flipped_dir(sentiment_dir, tmp_path_factory) -> Path:
    """The sentiment data with every label swapped: a teacher trained on it is confidently wrong."""
    folder = tmp_path_factory.mktemp("flipped")
    for split in ("train", "validation", "test"):
        lines = (sentiment_dir / f"{split}.tsv").read_text().splitlines()
        rows = [line.split("\t") for line in lines[1:]]
        write_tsv(folder / f"{split}.tsv", ["sentence", "label"], [[text, str(1 - int(label))] for text, label in rows])
    return folder


@pytest.fixture(scope="module")
def wrong_teacher(tiny_backbone, flipped_dir, tmp_path_factory) -> Path:
    recipe = tiny_recipe(tiny_backbone, flipped_dir, tmp_path_factory.mktemp("wrong"), train={"epochs": 5},
                         eval=NO_ANALYSIS)
    run = recipe.run()
    assert run.metrics["test"]["accuracy"] > 0.85  # on the flipped labels
    return run.run_dir


# --- the loss ----------------------------------------------------------------------------------


def test_classification_loss_mixes_soft_and_hard_terms():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    teacher, gold = torch.randn(6, 3).softmax(-1), torch.ones(6)
    hard = F.cross_entropy(logits, labels)
    assert LOSSES["classification"](logits, labels, teacher, gold, 2.0, 0.0) == pytest.approx(float(hard), rel=1e-5)
    # alpha=1: T² · KL(softmax(log p / T) || softmax(s / T)), a teacher equal to the student costs nothing
    t = 3.0
    target = (teacher.log() / t).softmax(-1)
    kl = (target * (target.log() - (logits / t).log_softmax(-1))).sum(-1).mean() * t * t
    assert LOSSES["classification"](logits, labels, teacher, gold, t, 1.0) == pytest.approx(float(kl), rel=1e-4)
    assert LOSSES["classification"](logits, labels, logits.softmax(-1), gold, 1.0, 1.0) == pytest.approx(0, abs=1e-5)
    # an unlabeled row learns from the teacher alone, whatever its (filler) label
    mixed = LOSSES["classification"](logits, labels, teacher, torch.tensor([1.0, 1, 1, 0, 0, 0]), t, 0.3)
    relabelled = LOSSES["classification"](logits, torch.tensor([0, 1, 2, 2, 0, 1]), teacher,
                                          torch.tensor([1.0, 1, 1, 0, 0, 0]), t, 0.3)
    assert mixed == pytest.approx(float(relabelled))
    per_row_soft = F.kl_div((logits / t).log_softmax(-1), target, reduction="none").sum(-1) * t * t
    per_row_hard = F.cross_entropy(logits, labels, reduction="none")
    expected = (0.3 * per_row_soft[:3] + 0.7 * per_row_hard[:3]).sum() + per_row_soft[3:].sum()
    assert mixed == pytest.approx(float(expected / 6), rel=1e-5)


def test_regression_multi_label_and_token_losses():
    torch.manual_seed(1)
    gold = torch.ones(4)
    scores, targets, teacher = torch.randn(4, 1), torch.randn(4), torch.randn(4)
    assert LOSSES["regression"](scores, targets, teacher, gold, 2.0, 0.0) == pytest.approx(
        float(F.mse_loss(scores.squeeze(-1), targets)), rel=1e-5)
    assert LOSSES["regression"](scores, targets, teacher, gold, 2.0, 1.0) == pytest.approx(
        float(F.mse_loss(scores.squeeze(-1), teacher)), rel=1e-5)

    logits, hot = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    assert LOSSES["multi_label_classification"](logits, hot, torch.rand(4, 3), gold, 2.0, 0.0) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, hot)), rel=1e-5)
    # at T=1 a teacher's probabilities are the soft targets themselves
    probs = torch.rand(4, 3)
    assert LOSSES["multi_label_classification"](logits, hot, probs, gold, 1.0, 1.0) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, probs)), rel=1e-4)

    logits, tags = torch.randn(2, 5, 3), torch.tensor([[-100, 0, 1, 2, -100], [-100, 1, -100, -100, -100]])
    expected = F.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=-100)
    assert LOSSES["token_classification"](logits, tags, torch.rand(2, 5, 3).softmax(-1), torch.ones(2), 2.0,
                                          0.0) == pytest.approx(float(expected), rel=1e-5)
    assert LOSSES["token_classification"](logits, tags, logits.softmax(-1), torch.ones(2), 1.0,
                                          1.0) == pytest.approx(0, abs=1e-5)


# --- students -----------------------------------------------------------------------------------


def _predicted_labels(run_dir: Path, texts: list[str]) -> list[str]:
    from finetune.predict import load_run, predict

    return [r["label"] for r in predict(load_run(run_dir), texts)]


def test_a_student_learns_what_its_teacher_says_not_only_the_gold_labels(wrong_teacher, sentiment_dir, tiny_backbone,
                                                                            tmp_path):
    """A teacher trained on flipped labels: with alpha=1 the student follows it (test accuracy near 0 on the
    true labels); with alpha=0 it learns the gold labels."""
    def student(alpha: float, name: str):
        recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / name, train={"epochs": 3}, eval=NO_ANALYSIS,
                             distill={"teacher": str(wrong_teacher), "alpha": alpha, "temperature": 1.0})
        return recipe.run()

    follower, gold = student(1.0, "follower"), student(0.0, "gold")
    assert follower.metrics["test"]["accuracy"] < 0.3
    assert gold.metrics["test"]["accuracy"] > 0.8
    summary = follower.metrics["distill"]
    assert summary["teacher"] == str(wrong_teacher) and summary["teacher_kind"] == "run"
    assert summary["labelled_rows"] == 192 and summary["unlabeled_rows"] == 0
    assert summary["teacher_agreement_train"] < 0.15  # it disagrees with the true labels
    assert summary["teacher_test"]["accuracy"] > 0.85
    saved = (follower.run_dir / "recipe.yaml").read_text()
    assert f"teacher: {wrong_teacher}" in saved


def test_teacher_targets_are_cached_and_damaged_cache_files_are_recomputed(teacher_run, sentiment_dir, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    teacher = teacher_lib.load_teacher(teacher_run)
    texts = ["the movie was good", "a dull plot", "superb"]
    calls = []

    def compute():
        calls.append(1)
        return teacher_lib.sequence_targets(teacher, texts, None, ["0", "1"])

    first, hit = teacher_lib.cached(teacher, teacher_lib.texts_key(texts, None), compute, "three")
    again, hit_again = teacher_lib.cached(teacher, teacher_lib.texts_key(texts, None), compute, "three")
    assert len(calls) == 1 and torch.equal(first, again) and (hit, hit_again) == (False, True)
    assert first.shape == (3, 2) and torch.allclose(first.sum(-1), torch.ones(3))
    (file,) = (tmp_path / "cache" / "teacher").glob("*.safetensors")
    file.write_bytes(b"not a tensor file")
    third, _ = teacher_lib.cached(teacher, teacher_lib.texts_key(texts, None), compute, "three")
    assert len(calls) == 2 and torch.allclose(third, first)
    # the label order of the student, not the teacher's, decides the columns
    swapped = teacher_lib.sequence_targets(teacher, texts, None, ["1", "0"])
    assert torch.allclose(swapped, first.flip(-1))


def test_ensemble_teacher_averages_its_members(teacher_run, wrong_teacher, sentiment_dir, tiny_backbone, tmp_path):
    ensemble_dir = tmp_path / "ensemble"
    assert main(["ensemble", "--models", str(teacher_run), str(wrong_teacher), "--output", str(ensemble_dir),
                 "--quiet"]) == 0
    ensemble = teacher_lib.load_teacher(ensemble_dir)
    texts = ["good and lovely", "awful boring film"]
    mean = teacher_lib.sequence_targets(ensemble, texts, None, ["0", "1"])
    one = [teacher_lib.sequence_targets(teacher_lib.load_teacher(p), texts, None, ["0", "1"])
           for p in (teacher_run, wrong_teacher)]
    assert torch.allclose(mean, (one[0] + one[1]) / 2, atol=1e-6)
    recipe = student_recipe(ensemble_dir, layers=1, overrides=["train.epochs=1", f"output.dir={tmp_path / 's'}"])
    # the student starts from the member with the best validation score on the ensemble's data (the wrong
    # teacher scores well on its own flipped validation split, not on this one)
    assert recipe.backbone.name == str(teacher_run.resolve())
    result = recipe.run()
    assert result.metrics["distill"]["teacher_kind"] == "ensemble of 2"


def test_the_lean_benchmark_measures_an_ensemble_teacher_as_it_predicts(teacher_run, tiny_backbone, sentiment_dir,
                                                                         tmp_path):
    """scripts/bench_lean.py's ensemble row: the accuracy of the members' weighted mean, as Ensemble.predict says."""
    import argparse
    import sys

    from conftest import REPO

    from finetune.ensemble import Ensemble
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_lean

    other = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "other", train={"epochs": 3, "seed": 7},
                        eval=NO_ANALYSIS).run().run_dir
    ensemble_dir = tmp_path / "ensemble"
    assert main(["ensemble", "--models", str(teacher_run), str(other), "--combine", "weighted",
                 "--output", str(ensemble_dir), "--quiet"]) == 0
    [row] = bench_lean.ensemble_runtime("teacher-ens", ensemble_dir, argparse.Namespace(latency_rows=3, batches=1))
    ensemble = Ensemble.load(ensemble_dir)
    rows = bench_lean.test_rows(teacher_run, ensemble.labels)
    predicted = [p["label"] for p in ensemble.predict(rows.texts)]
    expected = sum(p == ensemble.labels[g] for p, g in zip(predicted, rows.gold)) / len(rows.gold)
    assert row["accuracy"] == round(100 * expected, 2) and row["runtime"] == "pytorch fp32"
    assert row["parameters"] == 2 * sum(p.numel() for p in ensemble.members[0].run.model.parameters())


def test_distill_command_builds_a_smaller_student_from_the_teacher(teacher_run, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_run), "--layers", "1", "train.epochs=2",
                 f"output.dir={out}"]) == 0
    captured = capsys.readouterr()
    assert "student test accuracy" in captured.err and "vs teacher" in captured.err
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_config"]["num_hidden_layers"] == 1
    saved = (out / "recipe.yaml").read_text()
    assert f"name: {teacher_run}" in saved and "num_layers: 1" in saved and "tiny_student_L1" in saved
    assert "keep_head: true" in saved  # the teacher's own head on its own lower layers
    log = (out / "train.log").read_text()
    assert f"distillation: teacher {teacher_run} (run), temperature 2, alpha 0.5; 192 labelled training rows" in log
    # the same student from the pretrained backbone instead of the teacher's layers
    recipe = student_recipe(teacher_run, layers=1, init="pretrained")
    assert not recipe.backbone.keep_head  # a pretrained backbone has no head of this task to keep
    assert not student_recipe(teacher_run, layers=1, overrides=["backbone.keep_head=false"]).backbone.keep_head
    assert recipe.backbone.name == json.loads(json.dumps(
        __import__("yaml").safe_load((teacher_run / "recipe.yaml").read_text())))["backbone"]["name"]


def test_unlabeled_text_is_labelled_by_the_teacher(teacher_run, sentiment_dir, tiny_backbone, tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("".join(f"{w} movie {i}\n" for i, w in enumerate(["good", "bad", "lovely", "dull"] * 10)))
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1}, eval=NO_ANALYSIS,
                         distill={"teacher": str(teacher_run), "unlabeled": str(extra), "max_unlabeled": 25})
    result = recipe.run()
    assert result.metrics["distill"]["unlabeled_rows"] == 25
    assert result.metrics["distill"]["labelled_rows"] == 192
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == math.ceil((192 + 25) / 16)  # the extra rows are trained on
    with pytest.raises(DataError, match="does not exist"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "x",
                    distill={"teacher": str(teacher_run), "unlabeled": str(tmp_path / "nope.txt")}).run()


@pytest.mark.parametrize("task", ["regression", "multi_label_classification", "token_classification"])
def test_other_tasks_distil(task, tiny_backbone, regression_dir, ner_dir, tmp_path):
    if task == "regression":
        base = tiny_recipe(tiny_backbone, regression_dir, tmp_path / "teacher", task="regression", eval=NO_ANALYSIS,
                           data={"path": str(regression_dir), "columns": {"text": "text", "label": "score"},
                                 "max_length": 32})
    elif task == "token_classification":
        base = tiny_recipe(tiny_backbone, ner_dir, tmp_path / "teacher", task="token_classification", eval=NO_ANALYSIS,
                           data={"path": str(ner_dir), "columns": {"tags": "ner_tags"}, "max_length": 32})
    else:
        from test_multilabel import _rows

        folder = tmp_path / "topics"
        folder.mkdir()
        for seed, (split, n) in enumerate({"train": 80, "validation": 24, "test": 24}.items()):
            with open(folder / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": t, "labels": ls}) + "\n" for t, ls in _rows(seed, n))
        base = tiny_recipe(tiny_backbone, folder, tmp_path / "teacher", task=task, eval=NO_ANALYSIS,
                           data={"path": str(folder), "columns": {"text": "text", "label": "labels"},
                                 "max_length": 32})
    teacher = base.run().run_dir
    student = student_recipe(teacher, layers=1, overrides=["train.epochs=1", f"output.dir={tmp_path / 'student'}"])
    result = student.run()
    assert result.metrics["distill"]["teacher"] == str(teacher)
    assert json.loads((result.run_dir / "config.json").read_text())["backbone_config"]["num_hidden_layers"] == 1
    if task == "token_classification":
        assert 0 <= result.metrics["distill"]["teacher_agreement_train"] <= 1
        with pytest.raises(RecipeError, match="sequence-level tasks"):
            student_recipe(teacher, layers=1, overrides=[f"distill.unlabeled={tmp_path}/x.txt",
                                                         f"output.dir={tmp_path / 's2'}"]).run()


def test_bad_teachers_and_settings_are_refused(teacher_run, sentiment_dir, pairs_dir, tiny_backbone, tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, distill={"teacher": str(tmp_path / "none")}).run()
    with pytest.raises(RecipeError, match="distill.teacher=null"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, distill={"temperature": 4.0})
    with pytest.raises(RecipeError, match="distill.alpha"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, distill={"teacher": str(teacher_run), "alpha": 1.5})
    other_labels = tiny_recipe(tiny_backbone, pairs_dir, tmp_path / "pairs",
                               data={"path": str(pairs_dir), "columns": {"text": "s1", "text_pair": "s2",
                                                                         "label": "relation"}, "max_length": 32},
                               distill={"teacher": str(teacher_run)})
    with pytest.raises(RecipeError, match="student's data has"):
        other_labels.run()
    assert not (tmp_path / "pairs" / "run").exists()  # refused before the run folder is written
    with pytest.raises(RecipeError, match="pass --teacher only"):
        student_recipe(teacher_run, overrides=[f"distill.teacher={teacher_run}"])
    not_finished = tmp_path / "half"
    shutil.copytree(teacher_run, not_finished)
    (not_finished / "model.safetensors").unlink()
    assert main(["distill", "--teacher", str(not_finished)]) != 0


def test_a_sweep_searches_distillation_settings_and_runs_the_teacher_once(wrong_teacher, sentiment_dir,
                                                                          tiny_backbone, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2}, eval=NO_ANALYSIS,
                         distill={"teacher": str(wrong_teacher), "temperature": 1.0})
    result = recipe.sweep({"distill.alpha": [0.0, 1.0]}, method="grid", dir=str(tmp_path / "sweep"))
    accuracy = {t["params"]["distill.alpha"]: t["value"] for t in result.trials}
    assert accuracy[0.0] > accuracy[1.0]  # following the wrong teacher costs accuracy: the key is live
    trial_metrics = [json.loads(f.read_text()) for f in (tmp_path / "sweep").rglob("metrics.json")
                     if "best" not in f.relative_to(tmp_path / "sweep").parts]  # best/ repeats a trial
    sources = sorted(m["distill"]["teacher_targets"] for m in trial_metrics)
    assert sources in (["cache", "cache"], ["cache", "computed"])  # the teacher ran at most once


def test_run_folders_saved_before_the_distill_section_existed_still_load(teacher_run, tmp_path):
    """A saved recipe.yaml lists every section, so defaults in it are not choices; one written before distill:
    existed lacks that section and must still count as written whole (not refused for its LoRA defaults)."""
    import yaml

    from finetune.predict import load_run

    old = tmp_path / "old-run"
    shutil.copytree(teacher_run, old)
    saved = yaml.safe_load((old / "recipe.yaml").read_text())
    assert "distill" in saved and saved["policy"]["kind"] == "full" and "lora" in saved["policy"]
    del saved["distill"]
    (old / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert load_run(old).recipe.distill.teacher is None
