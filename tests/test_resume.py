"""An interrupted run, resumed, ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

import finetune.loop


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_identical_final_weights(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    """Kill a run right after its second checkpoint (mid-epoch), resume it, compare with a straight run."""
    sections = dict(train={"epochs": 2, "eval_every": 5, "checkpoint_every": 3, "gradient_accumulation_steps": 2,
                           "batch_size": 8, "lr": 3e-3},
                    head={"pooling": "mean", "dropout": 0.2})  # dropout: the RNG state must be restored too
    straight = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "a", **sections).run()

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "b", **sections)
    saves = {"n": 0}
    real_replace = finetune.loop.replace_dir

    def replace_then_die(tmp, final):
        real_replace(tmp, final)
        if final.name == "last":
            saves["n"] += 1
            if saves["n"] == 3:  # after step 6 of 24: a checkpoint that is not at an epoch boundary
                raise Interrupted

    monkeypatch.setattr(finetune.loop, "replace_dir", replace_then_die)
    with pytest.raises(Interrupted):
        recipe.run()
    monkeypatch.setattr(finetune.loop, "replace_dir", real_replace)
    assert not (tmp_path / "b" / "run" / "model.safetensors").exists()

    resumed = recipe.run(resume=True)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    assert resumed.best_step == straight.best_step
    a = load_file(str(straight.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for split in ("validation", "test"):
        assert resumed.metrics[split] == pytest.approx(straight.metrics[split])


def test_resume_refuses_a_changed_recipe(tiny_backbone, sentiment_dir, tmp_path):
    """Resuming with other settings would mix two runs: it is refused, naming the changed key."""
    from finetune import RecipeError

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 3, "checkpoint_every": 1},
                         output={"keep": "model+checkpoint"})  # a finished run that can be resumed
    recipe.run()
    with pytest.raises(RecipeError, match=r"differs.*train\.lr"):
        recipe.with_overrides(["train.lr=1e-2"]).run(resume=True)
