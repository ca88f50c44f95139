"""A finished run writes its analysis of the test split (eval.analyze), and a failing analysis never fails
the run: the model is already saved."""

from __future__ import annotations

import json

from conftest import tiny_recipe

from finetune import runs


def test_a_run_writes_its_test_analysis_and_it_can_be_switched_off(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.run()
    analysis = result.run_dir / runs.ANALYSIS
    summary = json.loads((analysis / "analysis.json").read_text())
    assert summary["split"] == "test"
    # the analysis scores the same model on the same rows as the run's own test evaluation
    assert abs(summary["accuracy"] - result.metrics["test"]["accuracy"]) < 1e-9
    assert (analysis / "report.md").is_file() and any(analysis.glob("*.png"))
    assert "analysis of the test split" in (result.run_dir / runs.LOG).read_text()  # and on the console

    off = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1}, eval={"analyze": False},
                      output={"dir": str(tmp_path / "off")})
    assert not (off.run().run_dir / runs.ANALYSIS).exists()


def test_a_failing_analysis_is_reported_and_the_run_still_completes(tiny_backbone, sentiment_dir, tmp_path,
                                                                    monkeypatch):
    from finetune.analysis import report

    def broken(*args, **kwargs):
        raise ValueError("no figure today")

    monkeypatch.setattr(report, "analyze_outputs", broken)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.run()
    assert runs.has_model(result.run_dir)
    assert "analysis of the test split skipped (ValueError: no figure today)" in (result.run_dir / runs.LOG).read_text()
