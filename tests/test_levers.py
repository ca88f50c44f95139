"""Accuracy levers, each a recipe key: label smoothing, class weights, re-initialised top layers, model soups."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file
from torch.nn import functional as F

from finetune.config import RecipeError
from finetune.objective import Objective, balanced_weights
from finetune.soup import SoupPool


def test_balanced_weights_follow_the_sklearn_convention():
    # 3 rows of class 0, 1 of class 1, none of class 2: N / (K n_c) over the K=2 present classes
    assert balanced_weights("classification", [0, 0, 0, 1], 3).tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    # token labels: -100 positions are not counted
    weights = balanced_weights("token_classification", [[0, -100, 0, 1], [1, 1, -100]], 2)
    assert weights.tolist() == pytest.approx([5 / 4, 5 / 6])
    # multi-label: negatives / positives per label, 1 for a label never on
    assert balanced_weights("multi_label_classification", [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0],
                                                           [1.0, 0.0, 0.0]], 3).tolist() == pytest.approx([1 / 3, 3.0, 1.0])


class _Logits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return type("Out", (), {"logits": self.logits})()


def test_the_training_loss_smooths_and_weighs_as_stated(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"label_smoothing": 0.2,
                                                                        "class_weights": "balanced"})
    objective = Objective(recipe, [0, 0, 0, 1], 2)  # class 0 weighs 2/3, class 1 weighs 2
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    loss = objective.loss(_Logits(logits), {"input_ids": None, "labels": labels})
    # by hand: each row's target is 0.9 on its class, 0.1 on the other; rows weigh by their class, the mean
    # divides by the summed weights
    log_p = logits.log_softmax(-1)
    target = torch.full_like(logits, 0.1).scatter(1, labels[:, None], 0.9)
    weights = torch.tensor([2 / 3, 2.0])
    row_weight = weights[labels]
    expected = (-(target * log_p * weights).sum(-1)).sum() / row_weight.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # neither key: the objective is the plain cross-entropy the model computes
    plain = Objective(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path), [0, 1], 2)
    assert plain.loss(_Logits(logits), {"labels": labels}).item() == pytest.approx(
        F.cross_entropy(logits, labels).item())


def test_a_run_trains_with_label_smoothing_and_class_weights_and_says_so(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"label_smoothing": 0.1,
                                                                        "class_weights": "balanced", "max_steps": 4})
    result = recipe.run()
    assert result.metrics["optimizer_steps"] == 4
    log = (result.run_dir / "train.log").read_text()
    assert "training loss: label smoothing 0.1; balanced class weights [" in log


def _with_backbone(recipe, **settings):
    raw = recipe.to_dict()
    raw["backbone"].update(settings)
    return type(recipe).from_dict(raw)


def test_levers_that_would_do_nothing_are_refused(tiny_backbone, sentiment_dir, regression_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"train\.label_smoothing=0\.1 has no effect with task=regression"):
        tiny_recipe(tiny_backbone, regression_dir, tmp_path, task="regression", train={"label_smoothing": 0.1},
                    data={"path": str(regression_dir), "columns": {"text": "sentence"}})
    with pytest.raises(RecipeError, match=r"backbone\.reinit_layers=1 has no effect with backbone\.pretrained=false"):
        _with_backbone(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path), pretrained=False, reinit_layers=1)
    with pytest.raises(RecipeError, match=r"train\.soup_size=3 has no effect with train\.soup=none"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"soup_size": 3})
    with pytest.raises(RecipeError, match=r"train\.soup=greedy with policy\.kind=lora: averaging LoRA's A and B"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"soup": "greedy"}, policy={"kind": "lora"})


def test_reinit_layers_redraws_only_the_top_layers(tiny_backbone, sentiment_dir, tmp_path):
    from finetune.backbones import build_model

    plain = build_model(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path), tiny_backbone, ["neg", "pos"])
    recipe = _with_backbone(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path), reinit_layers=1)
    redrawn = build_model(recipe, tiny_backbone, ["neg", "pos"])
    again = build_model(recipe, tiny_backbone, ["neg", "pos"])
    before, after = plain.state_dict(), redrawn.state_dict()
    for name in before:
        if ".layer.1." in name:
            assert not torch.equal(before[name], after[name]) or name.endswith(("bias", "LayerNorm.weight")), name
            if name.endswith("bias"):
                assert not after[name].any(), name
        elif "classifier" not in name:
            assert torch.equal(before[name], after[name]), name  # the lower layer and embeddings are kept
    query = after["backbone.encoder.layer.1.attention.self.query.weight"]
    assert query.std().item() == pytest.approx(0.02, rel=0.2)  # BERT's initializer_range
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())  # seeded by train.seed

    for backbone, policy, message in (
            ({"reinit_layers": 2}, {}, r"reinit_layers=2: the backbone has 2 layers; re-initialise fewer"),
            ({"reinit_layers": 1}, {"kind": "freeze", "freeze_layers": 2},
             r"re-initialised layers would stay frozen at random weights; freeze at most 1 layers"),
            ({"reinit_layers": 1}, {"kind": "head_only"}, r"policy\.kind=head_only: re-initialised layers")):
        bad = _with_backbone(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy=policy), **backbone)
        with pytest.raises(RecipeError, match=message):
            build_model(bad, tiny_backbone, ["neg", "pos"])


def test_the_soup_pool_keeps_the_best_evaluations_and_drops_the_rest(tmp_path):
    model = torch.nn.Linear(2, 1)
    pool = SoupPool(tmp_path, size=2, greater=True)
    for step, value in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.4), (5, float("nan"))):
        with torch.no_grad():
            model.weight.fill_(step)
        pool.offer(step, value, model, writer=True)
    assert pool.entries == [(0.7, 2), (0.6, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "soup").iterdir()) == [
        "step-2.safetensors", "step-3.safetensors"]
    assert load_file(str(pool.path(3)))["weight"].eq(3).all()
    # a resume whose checkpoint knows only the evaluations up to step 2 keeps step 2's file alone
    resumed = SoupPool(tmp_path, size=2, greater=True)
    resumed.restore([{"step": 1, "accuracy": 0.5}, {"step": 2, "accuracy": 0.7}], "accuracy", writer=True)
    assert resumed.entries == [(0.7, 2)]
    assert not pool.path(3).exists()


@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_a_soup_is_kept_only_when_validation_says_so(tiny_backbone, sentiment_dir, tmp_path, method):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={
        "max_steps": 8, "eval_every": 2, "soup": method, "soup_size": 3, "lr": 1e-3}, output={
        "dir": str(tmp_path / "run"), "keep": "all"})
    result = recipe.run()
    soup = result.metrics["soup"]
    history = {r["step"]: r["accuracy"] for r in result.history}
    best_single = max(history.values())
    assert soup["best_single"] == best_single == history[result.best_step]
    assert len(soup["candidates"]) == 3 and soup["candidates"][0] == result.best_step
    assert sorted(history[s] for s in soup["candidates"]) == sorted(history.values())[-3:]
    assert soup["members"][0] == result.best_step and set(soup["members"]) <= set(soup["candidates"])
    if method == "uniform":
        assert soup["members"] == soup["candidates"]
    # the reported validation is the kept model's, and never below the best single evaluation
    assert result.metrics["validation"]["accuracy"] == (soup["validation"] if soup["kept"] else best_single)
    assert result.metrics["validation"]["accuracy"] >= best_single
    exported = load_file(str(result.run_dir / "model.safetensors"))
    files = [load_file(str(result.run_dir / "checkpoints" / "soup" / f"step-{s}.safetensors"))
             for s in (soup["members"] if soup["kept"] else soup["members"][:1])]
    name = "backbone.encoder.layer.0.attention.self.query.weight"
    expected = torch.stack([f[name] for f in files]).mean(0)
    assert torch.allclose(exported[name], expected, atol=1e-6)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["soup"]["members"] == soup["members"]


@pytest.mark.parametrize("method, members, kept, weight", [("greedy", [1, 2], True, 2.0),
                                                           ("uniform", [1, 2, 3], False, 1.0)])
def test_cook_keeps_the_soup_that_validates_better_and_restores_the_best_otherwise(tmp_path, method, members, kept,
                                                                                   weight):
    from finetune.soup import cook

    model = torch.nn.Linear(1, 1, bias=False)
    pool = SoupPool(tmp_path, size=3, greater=True)
    for step, (w, value) in {1: (1.0, 0.9), 2: (3.0, 0.8), 3: (10.0, 0.7)}.items():
        with torch.no_grad():
            model.weight.fill_(w)
        pool.offer(step, value, model, writer=True)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the best evaluation's weights, as finish() restores them

    def evaluate() -> dict:  # validation peaks at weight 2: the mean of steps 1 and 2
        return {"accuracy": 1 - abs(model.weight.item() - 2) / 10}

    report = cook(pool, method, model, {"accuracy": 0.9}, "accuracy", evaluate)
    assert (report["members"], report["kept"]) == (members, kept)
    assert model.weight.item() == pytest.approx(weight)
    assert report["metrics"]["accuracy"] == pytest.approx(1.0 if kept else 0.9)
