"""``finetune ensemble``: choose the members (``--models``, or a sweep's best trials), weight them,
score the pool, and write the artefact and its report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

from finetune.config import RecipeError
from finetune.durable import link_or_copy
from finetune.ensemble.artefact import Ensemble, is_ensemble
from finetune.ensemble.combine import METHODS
from finetune.ensemble.members import Member, has_model, load_members
from finetune.ensemble.select import Pool, markdown
from finetune.processes import command_logging
from finetune.runs import output_home
from finetune.tasks import TASKS

log = logging.getLogger("finetune.ensemble")  # one logger for the package: setup_logging configures it


# --- choosing members ---------------------------------------------------------------------


def sweep_candidates(sweep_dir: Path, top_k: int, everything: bool = False) -> list[tuple[Path, str]]:
    """Finished trials ranked by the sweep's objective; the best ``top_k`` whose models still exist
    (all of them with ``everything``, for greedy selection).

    Raises:
        RecipeError: not a sweep folder with a report, or no trial with a model left.
    """
    from finetune.metrics import greater_is_better

    trials_file, sweep_file = sweep_dir / "report" / "trials.json", sweep_dir / "sweep.yaml"
    if not sweep_file.is_file() or not trials_file.is_file():
        raise RecipeError(f"--from-sweep: {sweep_dir} has no sweep.yaml and report/trials.json (not a sweep "
                          f"folder, or its report was never written: `finetune sweep-report {sweep_dir}`)")
    saved = yaml.safe_load(sweep_file.read_text())
    objective = (saved.get("sweep") or {}).get("objective") or {}
    metric = objective.get("metric") or saved["eval"]["primary"]
    maximize = objective.get("direction", "maximize" if greater_is_better(metric) else "minimize") == "maximize"
    rows = [r for r in json.loads(trials_file.read_text()) if r["state"] == "COMPLETE" and r.get("value") is not None]
    rows.sort(key=lambda r: (-r["value"] if maximize else r["value"], r["number"]))
    kept = [r for r in rows if r.get("model") and has_model(sweep_dir / r["model"])
            and r.get("duplicate_of") is None]  # a trial that reused an earlier one's result shares its model
    removed = [r["number"] for r in rows[:top_k] if r not in kept]
    chosen = kept if everything else kept[:top_k]
    if not chosen:
        raise RecipeError(f"--from-sweep: no finished trial in {sweep_dir} still has its model files")
    log.info("trials ranked by validation %s (%s): %s", metric, "max" if maximize else "min",
             ", ".join(f"trial {r['number']} {r['value']:.4f}" for r in rows))
    if removed or len(kept) < top_k:
        log.warning("asked for the top %d trials, but %s; ensembling the %d best trials with models",
                    top_k, f"trials {removed} had their models removed by the sweep (keep_top_k, see "
                    "MODEL_REMOVED.txt)" if removed else f"only {len(kept)} finished trials have models",
                    min(len(kept), top_k))
    return [(sweep_dir / r["model"], f"trial {r['number']}") for r in chosen]


# --- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-sweep", metavar="SWEEP_DIR", help="take the best trials of a finished sweep")
    source.add_argument("--models", nargs="+", metavar="RUN_DIR", help="run folders to combine (any backbones)")
    parser.add_argument("--top-k", type=int, help="--from-sweep: how many of the best trials (default 3); "
                                                  "--greedy: how many picks (default: the number of --models)")
    parser.add_argument("--combine", choices=METHODS, default="mean",
                        help="mean probability (default), validation-weighted mean, or majority vote")
    parser.add_argument("--greedy", action="store_true", help="greedy forward selection with replacement on "
                        "validation (Caruana et al. 2004); with --from-sweep every trial with a model is a candidate")
    parser.add_argument("--output", help="ensemble folder (default: $FINETUNE_HOME/ensembles/<name>-<timestamp>, "
                        "or ensembles/... here)")
    parser.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --output")
    parser.add_argument("--copy-members", action="store_true",
                        help="copy the members into OUTPUT/members (hard links where possible) so the folder stands alone")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default 64)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="data.* / eval.* overrides of the first member's recipe, e.g. data.max_eval_samples=500")


def command(args: argparse.Namespace) -> int:
    """``finetune ensemble``: choose members, score them and the ensemble, save the artefact, print the table."""
    setup_logging()
    overrides = list(args.overrides) + [m for m in args.models or [] if "=" in m and not Path(m).exists()]
    models = [m for m in args.models or [] if m not in overrides]  # argparse hands trailing key=value to --models
    bad = [o for o in overrides if not o.partition("=")[0].strip().startswith(("data.", "eval."))]
    if bad:
        raise RecipeError(f"ensemble overrides change the members' data or metrics (data.*, eval.*), not {bad[0]!r}")
    if args.top_k is not None and args.top_k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {args.top_k}")
    if args.models and args.top_k is not None and not args.greedy:
        raise RecipeError("--top-k chooses trials of --from-sweep (or the picks of --greedy); --models are all used")
    if args.greedy and args.combine == "weighted":
        raise RecipeError("--greedy sets the weights itself (times each member is picked); use --combine mean or vote")
    if args.from_sweep:
        sweep_dir = Path(args.from_sweep)
        if not sweep_dir.is_dir():
            raise RecipeError(f"--from-sweep: {sweep_dir} " + ("is a file; give the sweep folder (it holds sweep.yaml)"
                                                               if sweep_dir.exists() else "does not exist"))
        chosen = sweep_candidates(sweep_dir, args.top_k or 3, everything=args.greedy)
        paths, names, default_name = [p for p, _ in chosen], [n for _, n in chosen], sweep_dir.resolve().name
    else:
        paths, names, default_name = [Path(m) for m in models], None, "ensemble"
    output = Path(args.output or output_home() / "ensembles" / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from finetune.runs import check_output_folder

    check_output_folder(output, "--output")
    _check_output(output, args.overwrite)  # before the slow part; the old ensemble goes only once the new one is ready
    members = load_members(paths, names, "--from-sweep" if args.from_sweep else "--models")
    recipe = members[0].run.recipe.with_overrides(overrides)
    if args.combine == "vote" and not TASKS[recipe.task].votes:  # a vote needs one label per row
        raise RecipeError(f"--combine vote does not apply to {recipe.task} runs; use mean or weighted")
    pool = Pool(members, recipe, args.batch_size)
    selection = None
    if args.greedy:
        weights, selection = pool.greedy(args.combine, args.top_k or (3 if args.from_sweep else len(members)))
    elif args.combine == "weighted":
        weights = pool.validation_weights()
    else:
        weights = torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    report = pool.report(weights, args.combine, selection)
    if output.is_dir():  # an ensemble, and --overwrite was given (checked above)
        shutil.rmtree(output)
    if args.copy_members:
        members = _copy_members(members, output)
    chosen = [(m, float(w)) for m, w in zip(members, weights) if w > 0]  # greedy may leave members out
    config = {"from_sweep": args.from_sweep, "models": models or None, "top_k": args.top_k, "combine": args.combine,
              "greedy": args.greedy, "overrides": overrides, "copied_members": args.copy_members}
    ensemble = Ensemble([m for m, _ in chosen], [w for _, w in chosen], args.combine, recipe, report, config)
    ensemble.save(output)
    table = markdown(report)
    from finetune.runs import atomic_write_text

    atomic_write_text(output / "ensemble_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(output / "ensemble_report.md", f"# Ensemble {output.name}\n\n{table}")
    print(table, flush=True)
    log.info("ensemble saved to %s (members referenced, not copied%s)", output,
             "; copies in members/" if args.copy_members else "")
    return 0


def _check_output(output: Path, overwrite: bool) -> None:
    """Never mix an ensemble with other files, and replace one only when asked."""
    if output.is_dir() and any(output.iterdir()):
        if not is_ensemble(output):
            raise RecipeError(f"--output: {output} is not empty and holds no ensemble; choose an empty or new folder")
        if not overwrite:
            raise RecipeError(f"--output: {output} already holds an ensemble; pass --overwrite to replace it")


def _copy_members(members: list[Member], output: Path) -> list[Member]:
    """Copy each member's run folder (minus checkpoints) under OUTPUT/members, hard-linking files."""
    copies: dict[Path, Path] = {}
    result = []
    for i, member in enumerate(members):
        key = member.path.resolve()
        if key not in copies:
            copies[key] = output / "members" / f"{i:02d}-{member.path.name}"
            shutil.copytree(member.path, copies[key], copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns("checkpoints", ".*"))
        result.append(Member(member.name, copies[key], member.run))
    return result


def setup_logging() -> None:
    """INFO lines on stderr, tagged [ensemble]."""
    command_logging("ensemble", logger=log)
