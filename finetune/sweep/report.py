"""The sweep report, written at the end of a sweep and by ``finetune sweep-report DIR``:
a table of trials (CSV, JSON, markdown) and Optuna's plots as PNG (matplotlib) and HTML (plotly).
No server needed; ``optuna-dashboard`` reads the same storage for a live view."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from finetune.config import RecipeError
from finetune.sweep.config import SweepConfig, parse_sweep
from finetune.sweep.space import choice_label
from finetune.sweep.trials import (
    WARM_START,
    WIDENINGS,
    current_study,
    lent_trials,
    own_trials,
)

log = logging.getLogger("finetune.sweep")
CONTOUR_MIN_TRIALS = 5
IMPORTANCE_MIN_TRIALS = 10  # fANOVA on fewer finished trials ranks parameters by noise
COLUMNS = ["number", "slot", "state", "value", "overrides", "best_step", "seconds", "train_seconds",
           "outside_training", "parameters", "nonzero_parameters", "latency_ms", "guided", "ci95", "retry_of", "model", "worker", "rss_mb", "error"]


def trial_rows(study: optuna.Study, metric: str) -> list[dict[str, Any]]:
    rows = []
    for trial in own_trials(study):  # not the trials a warm start lent the sampler
        if trial.state == TrialState.WAITING:
            continue
        attrs = trial.user_attrs
        row = {"number": trial.number, "slot": attrs.get("slot"), "state": trial.state.name,
               "value": trial.value if trial.state == TrialState.COMPLETE else None,
               "overrides": " ".join(attrs.get("overrides", [])), "params": trial.params,
               "best_step": attrs.get("best_step"), "seconds": attrs.get("seconds"),
               "train_seconds": attrs.get("train_seconds"), "guided": attrs.get("guided"),
               "time_split": attrs.get("time_split"), "folder": attrs.get("folder"), "duplicate_of": attrs.get("duplicate_of"), "parameters": attrs.get("parameters"),
               "nonzero_parameters": attrs.get("nonzero_parameters"), "latency_ms": attrs.get("latency_ms"),
               "outside_training": (attrs.get("time_split") or {}).get("outside_training"),
               "ci95": attrs.get("ci95"), "values": attrs.get("values"), "retry_of": attrs.get("retry_of"),
               "model": attrs.get("model_dir"), "test": attrs.get("test"), "error": attrs.get("error"),
               "worker": attrs.get("worker"), "rss_mb": attrs.get("rss_mb"),
               "stopped_at_deadline": attrs.get("stopped_at_deadline"), "shortened": attrs.get("shortened"),
               "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())}}
        if trial.state == TrialState.PRUNED and trial.intermediate_values:  # older sweeps did not record it
            row["pruned_at_step"] = attrs.get("pruned_at_step", max(trial.intermediate_values))
        rows.append(row)
    return rows


def write_report(study: optuna.Study, sweep_dir: Path, cfg: SweepConfig, metric: str) -> list[dict[str, Any]]:
    """Write report/ (trials.csv, trials.json, report.md, plots) and print the table; returns the rows."""
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, metric)
    (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # no test column to choose on
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    plots = _plots(_own_view(study), out, cfg)
    maximize = study.direction.name == "MAXIMIZE"
    plots["pareto"] = pareto_plot(rows, metric, maximize, out / "pareto.png")
    table = _markdown_table(rows, metric) + pareto_table(rows, metric, maximize) + _test_table(rows, metric,
                                                                                              sweep_dir, maximize)
    summary = _summary(study, cfg, metric, rows, sweep_dir)
    (out / "report.md").write_text(f"# Sweep {study.study_name}\n\n{summary}\n\n{table}\n\n## Plots\n\n"
                                   + "\n".join((f"- {name}: [{name}.png]({name}.png)" if name == "pareto" else
                                                f"- {name}: [{name}.png]({name}.png), [{name}.html]({name}.html)")
                                               + (f" ({why})" if why else "")
                                               if ok else f"- {name}: not drawn ({why})" for name, (ok, why) in plots.items())
                                   + "\n")
    log.info("%s\n%s\nreport: %s", summary, table, out)
    return rows


def _summary(study: optuna.Study, cfg: SweepConfig, metric: str, rows: list[dict], sweep_dir: Path) -> str:
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    lines = [f"{cfg.method} search, {study.direction.name.lower()} validation {metric}; "
             + ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)]
    if cfg.method in ("bayes", "gp"):
        guided = sum(bool(r["guided"]) for r in rows)
        lines.append(f"{guided} of {len(rows)} trials were proposed by the model; the others were random "
                     f"(the first {cfg.guided_after()} finished trials) or re-runs of fixed settings.")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        best = (max if study.direction.name == "MAXIMIZE" else min)(complete, key=lambda r: r["value"])
        test = (best["test"] or {}).get(metric)
        lines.append(f"best: trial {best['number']} {metric} {best['value']:.4f}"
                     + (f" (test {test:.4f})" if test is not None else "")
                     + f" with {best['overrides'] or 'the base recipe'}; {_where_best_is(best, sweep_dir, metric)}")
    lines += _time_summary(complete)
    return "\n".join(lines + _history(study))


def _history(study: optuna.Study) -> list[str]:
    """Where the sweep's knowledge came from: a warm start, widenings."""
    lines = []
    if warm := study.user_attrs.get(WARM_START):
        lines.append(f"warm start from {warm['source']}: {warm['lent']} of its finished trials informed the sampler "
                     f"(not listed here; {warm['skipped']} lay outside this space); tried first: "
                     + (" | ".join(warm["first"]) or "none"))
    for widening in study.user_attrs.get(WIDENINGS, []):
        lines.append(f"widened from study {widening['from']} ({widening['at']}): {'; '.join(widening['changes'])}; "
                     "its trials are kept")
    return lines


def _own_view(study: optuna.Study) -> optuna.Study:
    """The study for the plots: without the trials a warm start lent, which are not the sweep's."""
    if not lent_trials(study):
        return study
    view = optuna.create_study(study_name=study.study_name, directions=study.directions)
    view.add_trials(own_trials(study))
    return view


def _where_best_is(best: dict, sweep_dir: Path, metric: str) -> str:
    """Whether best/ here holds the study's best trial; with several workers it may have run elsewhere."""
    try:
        held = json.loads((sweep_dir / "best" / "sweep_trial.json").read_text())
    except (OSError, ValueError):
        held = None
    if held is not None and held.get("trial") in (best["number"], best.get("duplicate_of")):
        return "model in best/"
    where = f"it ran in another sweep folder ({best.get('folder') or 'another worker'}): its model is there, not here"
    if held is None:
        return f"{where}; this folder holds no finished trial's model"
    return f"{where}; best/ here holds trial {held['trial']} ({metric} {held['value']:.4f})"


def _time_summary(complete: list[dict]) -> list[str]:
    """Per completed trial, the share of wall time spent outside training steps, and on what."""
    splits = [r["time_split"] for r in complete if r.get("time_split")]
    if not splits:
        return []
    parts = ["setup", "evaluate", "checkpoint", "test", "other"]
    totals = {part: sum(s.get(part, 0.0) for s in splits) for part in parts}
    wall = sum(r["seconds"] for r in complete if r.get("time_split"))
    shares = sorted(s["outside_training"] for s in splits)
    return [f"time outside training steps: median {shares[len(shares) // 2]:.1%} of a completed trial's wall time "
            f"(range {shares[0]:.1%}-{shares[-1]:.1%}); of all completed trials' {wall:.0f} s: "
            + ", ".join(f"{part} {totals[part] / max(wall, 1e-9):.1%}" for part in parts)]


def _markdown_table(rows: list[dict], metric: str) -> str:
    lines = [f"| trial | state | {metric} (validation) | settings | best step | seconds | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}" + (f" ± {r['ci95']:.4f}" if r["ci95"] else "")
        note = r["error"] or (f"pruned at step {r['pruned_at_step']}" if r.get("pruned_at_step") is not None else "")
        if r.get("duplicate_of") is not None:
            note = f"same settings as trial {r['duplicate_of']}: its result, nothing trained"
        if r.get("shortened"):
            cut = r["shortened"]
            note = f"sweep.fill_budget: a schedule of {cut['steps']} of {cut['of']} steps, to end within the budget"
        if r.get("stopped_at_deadline"):
            cut = r["stopped_at_deadline"]
            note = (f"{note}; " if r.get("shortened") else "") + \
                f"sweep.budget ran out: training stopped at step {cut['step']} of {cut['of']}"
        lines.append(f"| {r['number']} | {r['state']} | {value} | {r['overrides']} | {r['best_step'] or ''} | "
                     f"{r['seconds'] or ''} | {note.replace('|', '/')[:200]} |")
    return "\n".join(lines)


def _test_table(rows: list[dict], metric: str, sweep_dir: Path, maximize: bool) -> str:
    """The models the sweep kept, on test, in their validation order: a record of what was kept, apart from
    the trials table, so that nobody picks a trial by its test score (sweep.test says which are scored)."""
    from finetune import runs

    def kept(row: dict) -> bool:
        model = sweep_dir / (row.get("model") or "-")
        return (model / runs.RECIPE).is_file() and not (model / runs.MODEL_REMOVED).exists()

    scored = [r for r in rows if r["state"] == "COMPLETE" and (r["test"] or {}).get(metric) is not None and kept(r)]
    if not scored:
        return ""
    scored.sort(key=lambda r: r["value"], reverse=maximize)
    lines = ["", "", "The models this sweep kept, on the test split (in validation order; trials are chosen on "
                     "validation, test only records how the kept ones do):", "",
             f"| trial | {metric} (validation) | {metric} (test) | settings |", "|---|---|---|---|"]
    lines += [f"| {r['number']} | {r['value']:.4f} | {r['test'][metric]:.4f} | {r['overrides']} |" for r in scored]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats: at most the cost (first) and at least as good a value
    (second), and strictly better in one of them."""
    def beats(a, b):
        better = a[1] >= b[1] if maximize else a[1] <= b[1]
        strictly = a[0] < b[0] or (a[1] > b[1] if maximize else a[1] < b[1])
        return a[0] <= b[0] and better and strictly
    return [i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)]


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["state"] == "COMPLETE" and r.get("latency_ms") is not None
            and r.get("duplicate_of") is None]


def pareto_plot(rows: list[dict], metric: str, maximize: bool, path: Path) -> tuple[bool, str]:
    """Validation metric against CPU latency and against parameter count; the Pareto front joined."""
    measured = _measured(rows)
    if len(measured) < 2:
        return False, ("needs 2 completed trials with a measured cost (sweep.measure_cost; by default measured only "
                       "when the space changes the architecture)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, cost, label in [(axes[0], "latency_ms", "CPU latency per batch of 32 (ms)"),
                            (axes[1], "nonzero_parameters", "parameters (non-zero)")]:
        points = [(r[cost], r["value"]) for r in measured]
        front = sorted(pareto_front(points, maximize), key=lambda i: points[i][0])
        ax.scatter(*zip(*points), color="tab:gray", label="trial")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="tab:red",
                label="Pareto front")
        for r, (x, y) in zip(measured, points):
            ax.annotate(str(r["number"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Accuracy against cost: trials on the red line are not beaten on both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True, ""


def pareto_table(rows: list[dict], metric: str, maximize: bool) -> str:
    measured = _measured(rows)
    if not measured:
        return ""
    front = set(pareto_front([(r["latency_ms"], r["value"]) for r in measured], maximize))
    lines = ["", "", (f"Cost of each completed trial's model (CPU, batch 32, LoRA merged); * = on the "
                      f"{metric}-vs-latency Pareto front"), "",
             f"| trial | {metric} (validation) | latency ms | parameters | non-zero | settings |", "|---|---|---|---|---|---|"]
    for i, r in sorted(enumerate(measured), key=lambda item: item[1]["latency_ms"]):
        lines.append(f"| {r['number']}{' *' if i in front else ''} | {r['value']:.4f} | {r['latency_ms']:.1f} | "
                     f"{r['parameters']:,} | {r['nonzero_parameters']:,} | {r['overrides']} |")
    return "\n".join(lines)


def _contour_params(cfg: SweepConfig) -> list[str]:
    numeric = [k for k, s in cfg.parameters.items() if not s.paired]
    preferred = [k for k in ("train.lr", "policy.lora.rank") if k in numeric]
    return (preferred + [k for k in numeric if k not in preferred])[:2]


def _plots(study: optuna.Study, out: Path, cfg: SweepConfig) -> dict[str, tuple[bool, str]]:
    """Each plot as PNG and HTML; a plot that needs more trials than there are is listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    pair = _contour_params(cfg)
    wanted = {"history": ("plot_optimization_history", {}), "importances": ("plot_param_importances", {}),
              "slice": ("plot_slice", {}), "contour": ("plot_contour", {"params": pair}),
              "parallel_coordinates": ("plot_parallel_coordinate", {}),
              "intermediate_values": ("plot_intermediate_values", {})}
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    done: dict[str, tuple[bool, str]] = {}
    for name, (function, kwargs) in wanted.items():
        if name == "importances" and (complete < 2 or len(cfg.parameters) < 2):
            done[name] = (False, "needs 2 finished trials and 2 parameters")
            continue
        if name == "contour" and len(pair) < 2:
            done[name] = (False, "needs 2 numeric parameters")
            continue
        if name == "contour" and complete < CONTOUR_MIN_TRIALS:  # fewer points draw an empty or misleading surface
            done[name] = (False, f"needs {CONTOUR_MIN_TRIALS} finished trials to draw a surface, has {complete}")
            continue
        try:
            if name == "slice":  # our own: optuna's squeezes every parameter into one row of unreadable ticks
                _slice_figure(study, cfg, out / "slice.png")
                with _quiet():
                    interactive.plot_slice(study).write_html(out / "slice.html", include_plotlyjs="directory")
                done[name] = (True, "")
                continue
            with _quiet():
                axes = getattr(static, function)(study, **kwargs)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
                figure.set_size_inches(9, 6)
                figure.tight_layout()
                figure.savefig(out / f"{name}.png", dpi=110)
                plt.close(figure)
                getattr(interactive, function)(study, **kwargs).write_html(out / f"{name}.html",
                                                                           include_plotlyjs="directory")
            few = name == "importances" and complete < IMPORTANCE_MIN_TRIALS
            done[name] = (True, f"from {complete} finished trials only: indicative, not a ranking to trust "
                                f"(about {IMPORTANCE_MIN_TRIALS} or more are needed)" if few else "")
        except Exception as err:  # noqa: BLE001 - e.g. too few trials for this plot; the table still stands
            plt.close("all")
            done[name] = (False, f"{type(err).__name__}: {err}")
    return done


def _slice_figure(study: optuna.Study, cfg: SweepConfig, path: Path) -> None:
    """Objective value against each searched parameter, one panel each (up to 3 a row), coloured by trial:
    log axes for log-scale ranges, choices as wrapped, slanted category labels."""
    import textwrap

    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = list(cfg.parameters)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    numbers = [t.number for t in trials]
    for ax, name in zip(axes.flat, names):
        spec = cfg.parameters[name]
        points = [(t.params[name], t.value, t.number) for t in trials if name in t.params]
        numeric = spec.choice is None and points
        if numeric:
            x = [p[0] for p in points]
            if spec.loguniform is not None or spec.log:
                ax.set_xscale("log")
        else:  # a choice: one position per value, in the order the space lists them
            labels = [str(choice_label(c)) for c in (spec.choice or [])]  # as the trials store them
            position = {label: i for i, label in enumerate(labels)}
            x = [position.get(str(p[0]), len(labels)) for p in points]
            ax.set_xticks(range(len(labels)), [textwrap.fill(label, 22) for label in labels], rotation=25,
                          ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        scatter = ax.scatter(x, [p[1] for p in points], c=[p[2] for p in points], cmap="Blues", edgecolors="grey",
                             vmin=min(numbers, default=0), vmax=max(numbers, default=1))
        ax.set_xlabel(textwrap.fill(name, 30), fontsize=9)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"{cfg.objective.metric or 'objective'} (validation)")
    figure.colorbar(scatter, ax=axes.ravel().tolist(), label="trial", shrink=0.8)
    figure.suptitle(f"Each finished trial's value against each parameter ({len(trials)} trials)")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


@contextlib.contextmanager
def _quiet():
    """Optuna marks its matplotlib plots experimental and warns about one-valued axes; the report
    lists what it could not draw instead."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def report_from_dir(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """``finetune sweep-report DIR``: rebuild the report from the study the folder names.

    Raises:
        RecipeError: the folder holds no sweep.
    """
    from finetune.sweep.study import open_storage

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.yaml").is_file():
        raise RecipeError(f"{sweep_dir} holds no sweep (sweep.yaml is missing)")
    saved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    # the warm start's source is not needed (the study holds what it lent), and may be gone
    cfg = parse_sweep({k: v for k, v in saved["sweep"].items() if not k.startswith("warm_start")})
    study_name = cfg.study or saved["name"]
    study = current_study(open_storage(cfg.storage, sweep_dir), study_name)  # the widened study, if widened
    if study is None:
        raise RecipeError(f"{sweep_dir}: its storage holds no study {study_name!r}")
    metric = cfg.objective.metric or saved["eval"]["primary"]
    return write_report(study, sweep_dir, cfg, metric)
