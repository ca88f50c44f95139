"""``finetune auto --recipe R --budget 2h``: search, then ensemble, within one wall-clock budget.

    SWEEP_DIR/            the sweep folder (see finetune.sweep.runner), and:
      ensemble/           the greedy ensemble of the kept trials (finetune predict --model SWEEP_DIR/ensemble)
      auto/report.md      best single model and best ensemble on test with 95 % intervals, members, phases
      auto/auto.json      the same, for scripts
      auto/best_so_far.png  the search's best validation against wall time

The search (``sweep.preset: auto``, see finetune.sweep.preset) gets 90 % of the budget, counted over every
run of the sweep folder, so a killed job resumes with what is left; its last trial stops training at the
end of its share, or, when less is left than a whole trial takes, trains a schedule shortened to fit
(sweep.fill_budget). The rest goes to the ensemble: the kept trials' models are scored once on validation
and test, best first and as many as fit in what is left of the budget; greedy forward selection (with
replacement) on validation picks the bag, and test, which chose nothing, reports both the best single
model (the best validation trial) and the bag.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config import RecipeConfig, RecipeError
from finetune.runs import atomic_write_text
from finetune.sweep.config import SweepConfig
from finetune.sweep.runner import SweepResult, run_sweep

log = logging.getLogger("finetune.sweep")

SEARCH_SHARE = 0.9  # of the budget; the ensemble step scores each kept model once on validation and test
GREEDY_PICKS = 10
BOOTSTRAP_RESAMPLES = 1000


@dataclass
class AutoResult:
    sweep: SweepResult
    summary: dict
    """What auto/auto.json holds: budget, phases, best single model, ensemble."""
    ensemble_dir: Path | None
    report: Path


def run_auto(recipe: RecipeConfig, cfg: SweepConfig) -> AutoResult:
    """Run (or resume) the auto search, then the ensemble; write auto/report.md.

    Raises:
        RecipeError: no budget, an invalid recipe or search (as ``run_sweep``); no trial finished.
    """
    if cfg.budget is None:
        raise RecipeError("finetune auto needs a budget: --budget 2h (or sweep.budget=SECONDS)")
    began = time.monotonic()
    from finetune.runs import output_home

    folder = cfg.dir or recipe.output.dir or str(output_home() / "sweeps" / f"{recipe.name}-auto")
    search = cfg.model_copy(update={"preset": "auto", "budget": cfg.budget * SEARCH_SHARE, "dir": folder})
    result = run_sweep(recipe, search)
    phases = {"search": time.monotonic() - began}
    if result.best_trial is None:
        raise RecipeError(f"finetune auto: no trial finished within the budget ({cfg.budget:.0f} s); nothing to "
                          f"report. Give a larger --budget (the trials are in {result.sweep_dir})")
    started = time.monotonic()
    # what is left of the budget, less a little for writing the ensemble and the report
    deadline = began + cfg.budget - result.spent_before - min(60.0, 0.02 * cfg.budget)
    summary, ensemble_dir = _ensemble(result, deadline)
    phases["ensemble"] = time.monotonic() - started
    summary.update(budget_seconds=cfg.budget, phases_seconds={k: round(v, 1) for k, v in phases.items()},
                   earlier_runs_seconds=round(result.spent_before, 1))
    total = result.spent_before + sum(phases.values())
    summary.update(total_seconds=round(total, 1), within_budget=total <= cfg.budget * 1.05)
    out = result.sweep_dir / "auto"
    out.mkdir(exist_ok=True)
    _best_so_far_plot(result, out / "best_so_far.png")
    atomic_write_text(out / "auto.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(summary, result))
    log.info("auto: %s", headline(summary))
    return AutoResult(result, summary, ensemble_dir, out / "report.md")


def _ensemble(result: SweepResult, deadline: float) -> tuple[dict, Path | None]:
    """Score the kept trials (best first, as many as fit before ``deadline``), pick a greedy bag on validation,
    save it; the best single model and the bag on test. A task ensembles cannot combine (token tags,
    multi-label) reports the best single model only."""
    from finetune.ensemble.artefact import Ensemble
    from finetune.ensemble.command import sweep_candidates
    from finetune.ensemble.members import load_members
    from finetune.ensemble.select import Pool
    from finetune.tasks import TASKS

    best_recipe = result.best_recipe
    summary: dict = {"sweep_dir": str(result.sweep_dir), "metric": result.metric, "direction": result.direction,
                     "trials": _trial_counts(result.trials),
                     "best_single": {"trial": result.best_trial, "validation": result.best_value,
                                     "settings": result.best_params}}
    if best_recipe is None or not TASKS[best_recipe.task].ensembles or result.best_run_dir is None:
        summary["ensemble"] = {"skipped": "ensembles combine classification and regression runs only"
                               if best_recipe is not None else "the best trial's model is in another sweep folder"}
        return summary, None
    chosen = sweep_candidates(result.sweep_dir, 1, everything=True)  # every kept model, best validation first
    # the study's best trial first (on a tie of values the ranking may put another first): it is always scored
    chosen.sort(key=lambda candidate: candidate[1] != f"trial {result.best_trial}")
    members = load_members([p for p, _ in chosen], [n for _, n in chosen], "auto")
    pool = Pool(members, best_recipe, deadline=deadline)
    members, metric = pool.members, pool.primary
    weights, selection = pool.greedy("mean", min(GREEDY_PICKS, 2 * len(members)))
    report = pool.report(weights, "mean", selection)
    single = pool.one_hot(0)  # the study's best trial, sorted first above
    summary["best_single"].update(name=members[0].name, path=str(members[0].path),
                                  **{f"{split}_metrics": report["members"][0].get(split) for split in pool.splits})
    summary["ensemble"] = {"members": [{"name": m["name"], "weight": m["weight"]} for m in report["members"]
                                       if m["weight"] > 0],
                           "candidates": len(members),
                           **({"left_out": pool.left_out} if pool.left_out else {}),
                           **{f"{split}_metrics": report["ensemble"][split] for split in pool.splits}}
    if "test" in pool.splits:
        summary["best_single"]["test_ci95"] = bootstrap_ci(pool, single, metric)
        summary["ensemble"]["test_ci95"] = bootstrap_ci(pool, weights, metric)
        if pool.task.votes:
            summary["ensemble"]["mcnemar_vs_single"] = _mcnemar(pool, single, weights)
    else:
        summary["test"] = "the recipe has no test split: validation chose both, so their scores are optimistic"
    ensemble_dir, staging = result.sweep_dir / "ensemble", result.sweep_dir / "ensemble.partial"
    shutil.rmtree(staging, ignore_errors=True)
    chosen_members = [(m, float(w)) for m, w in zip(members, weights) if w > 0]
    Ensemble([m for m, _ in chosen_members], [w for _, w in chosen_members], "mean", best_recipe, report,
             {"from_sweep": str(result.sweep_dir), "greedy": True, "combine": "mean", "auto": True}).save(staging)
    atomic_write_text(staging / "ensemble_report.json", json.dumps(report, indent=2) + "\n")
    shutil.rmtree(ensemble_dir, ignore_errors=True)  # an earlier run's bag: the new one replaces it whole
    staging.rename(ensemble_dir)
    return summary, ensemble_dir


def bootstrap_ci(pool, weights, metric: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the combination's test ``metric``, resampling test rows (accuracy
    vectorised over all resamples; another metric is computed on a third as many). None for ``loss``."""
    from finetune.ensemble.combine import average, predict_ids
    from finetune.metrics import MetricSuite

    if metric == "loss":
        return None
    outputs, gold = pool.outputs["test"], np.asarray(pool.splits["test"].gold)
    predicted = (predict_ids(outputs, weights, "mean") if pool.task.classes else average(outputs, weights)).numpy()
    rows = np.random.default_rng(seed).integers(0, len(gold), (resamples, len(gold)))
    if metric == "accuracy":
        values = (predicted[rows] == gold[rows]).mean(axis=1)
    else:
        suite = MetricSuite([metric])
        values = np.array([suite.compute(predictions=predicted[r].tolist(), references=gold[r].tolist())[metric]
                           for r in rows[:max(100, resamples // 3)]])
    values = values[~np.isnan(values)]
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def _mcnemar(pool, single, weights) -> dict:
    """Rows only the ensemble gets right, only the best single model does, and McNemar's exact p-value."""
    import torch

    from finetune.analysis.compare import mcnemar_exact
    from finetune.ensemble.combine import predict_ids

    outputs, gold = pool.outputs["test"], torch.tensor(pool.splits["test"].gold)
    right_single = predict_ids(outputs, single, "mean") == gold
    right_bag = predict_ids(outputs, weights, "mean") == gold
    only_bag, only_single = int((right_bag & ~right_single).sum()), int((right_single & ~right_bag).sum())
    return {"only_ensemble": only_bag, "only_single": only_single, "p": round(mcnemar_exact(only_bag, only_single), 4)}


def _trial_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"].lower()] = counts.get(row["state"].lower(), 0) + 1
    counts["stopped_at_deadline"] = sum(bool(r.get("stopped_at_deadline")) for r in rows)
    counts["shortened"] = sum(bool(r.get("shortened")) for r in rows)  # sweep.fill_budget's last trial
    return counts


def _best_so_far_plot(result: SweepResult, path: Path) -> None:
    """Best validation so far against the search's wall time (trials in the order they finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maximize = result.direction == "maximize"
    clock, best, xs, ys = 0.0, None, [], []
    for row in sorted(result.trials, key=lambda r: r["number"]):
        clock += row.get("seconds") or 0.0
        if row["state"] == "COMPLETE" and row.get("value") is not None and not math.isnan(row["value"]):
            best = row["value"] if best is None else (max if maximize else min)(best, row["value"])
        if best is not None:
            xs.append(clock / 60)
            ys.append(best)
    figure, ax = plt.subplots(figsize=(6, 3.6))
    ax.step(xs, ys, where="post")
    ax.set_xlabel("search wall time (min, trials back to back)")
    ax.set_ylabel(f"best validation {result.metric}")
    ax.set_title("auto search: best so far")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _score(metrics: dict | None, metric: str, interval: list[float] | None = None) -> str:
    if not metrics or metric not in metrics:
        return "n/a"
    text = f"{metrics[metric]:.4f}"
    return text + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def headline(summary: dict) -> str:
    metric, single, bag = summary["metric"], summary["best_single"], summary["ensemble"]
    parts = [f"best single model (trial {single['trial']}): test {metric} "
             f"{_score(single.get('test_metrics'), metric, single.get('test_ci95'))}"]
    if "skipped" not in bag:
        parts.append(f"ensemble of {len(bag['members'])}: test {metric} "
                     f"{_score(bag.get('test_metrics'), metric, bag.get('test_ci95'))}")
    parts.append(f"{summary['total_seconds']:.0f} s of a {summary['budget_seconds']:.0f} s budget")
    return "; ".join(parts)


def markdown(summary: dict, result: SweepResult) -> str:
    metric, single, bag = summary["metric"], summary["best_single"], summary["ensemble"]
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items() if n)
    lines = [f"# finetune auto: {Path(summary['sweep_dir']).name}", "",
             f"Budget {summary['budget_seconds']:.0f} s; spent {summary['total_seconds']:.0f} s "
             f"({'within' if summary['within_budget'] else 'OVER'} budget + 5 %): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in summary["phases_seconds"].items())
             + (f", earlier runs of this job {summary['earlier_runs_seconds']:.0f} s"
                if summary["earlier_runs_seconds"] else "") + ".",
             f"Trials: {counts}. The search's table and plots: [../report/report.md](../report/report.md); "
             "best validation against time: [best_so_far.png](best_so_far.png).", "",
             f"| model | validation {metric} | test {metric} (95 % bootstrap interval) |", "|---|---|---|",
             f"| best single: trial {single['trial']} | {_score(single.get('validation_metrics'), metric)} | "
             f"{_score(single.get('test_metrics'), metric, single.get('test_ci95'))} |"]
    if "skipped" in bag:
        lines += ["", f"No ensemble: {bag['skipped']}."]
    else:
        members = ", ".join(f"{m['name']} ×{m['weight']:.2f}" for m in bag["members"])
        lines.append(f"| ensemble (greedy, mean of probabilities) | {_score(bag.get('validation_metrics'), metric)} | "
                     f"{_score(bag.get('test_metrics'), metric, bag.get('test_ci95'))} |")
        lines += ["", f"Ensemble members (weight = share of the greedy picks), chosen on validation among "
                      f"{bag['candidates']} kept trials: {members}."]
        if bag.get("left_out"):
            lines.append(f"Left out, as scoring them would have passed the budget: {', '.join(bag['left_out'])}.")
        if "mcnemar_vs_single" in bag:
            m = bag["mcnemar_vs_single"]
            lines.append(f"On test, {m['only_ensemble']} rows only the ensemble gets right, {m['only_single']} only "
                         f"the best single model; McNemar's exact p = {m['p']}.")
        if len(bag["members"]) == 1:
            lines.append("Greedy selection kept one model: no bag did better on validation than the best trial.")
    lines += ["", f"Best single model's settings: {' '.join(single['settings']) or 'the base recipe'}.",
              "Validation chose the trials and the bag, so validation scores are optimistic; test chose nothing.",
              f"Use: `finetune predict --model {result.sweep_dir / 'best'}` or "
              f"`--model {result.sweep_dir / 'ensemble'}`."]
    return "\n".join(lines) + "\n"
