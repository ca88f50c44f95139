"""``finetune prune``: the flags as a PruneConfig, then ``prune_run``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from finetune.config import PruneConfig, RecipeError
from finetune.prune.run import prune_run, report_table
from finetune.schema import error_key, error_problem

log = logging.getLogger("finetune")


# --- the command ------------------------------------------------------------------------------

FLAGS = {"method": "--method", "sparsity": "--sparsity", "heads_fraction": "--heads-fraction",
         "layers_kept": "--layers-kept", "layer_selection": "--layer-selection",
         "importance_samples": "--importance-samples", "finetune_epochs": "--finetune-epochs",
         "finetune_lr": "--finetune-lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run folder to prune")
    parser.add_argument("--method", required=True, choices=["magnitude", "heads", "layers"])
    parser.add_argument("--sparsity", type=float, help="magnitude: fraction of linear weights zeroed (default 0.5)")
    parser.add_argument("--heads-fraction", type=float, help="heads: fraction of all heads removed (default 0.25)")
    parser.add_argument("--layers-kept", type=int, help="layers: encoder layers kept")
    parser.add_argument("--layer-selection", choices=["importance", "first"], help="layers: which (default importance)")
    parser.add_argument("--importance-samples", type=int, help="validation examples scoring heads/layers (default 512)")
    parser.add_argument("--finetune-epochs", type=float, help="recovery fine-tune epochs (default 0: none)")
    parser.add_argument("--finetune-lr", type=float, help="recovery learning rate (default: the run's train.lr)")
    parser.add_argument("--output", help="folder for the pruned run (default RUN_DIR/pruned-METHOD)")
    parser.add_argument("--overwrite", action="store_true", help="replace a pruned run already in --output")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for data and recovery, e.g. data.max_eval_samples=500")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The flags as a PruneConfig: the same validation as a recipe's prune: section, named by flag.

    Raises:
        RecipeError: a value outside its range, or --method layers without --layers-kept.
    """
    given = {field: getattr(args, field) for field in FLAGS if getattr(args, field) is not None}
    try:
        return PruneConfig(**given)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            field = error_key(item)
            problem = error_problem(item) if field else error_problem({**item, "input": {}})  # a model-level rule
            lines.append(f"{FLAGS.get(field, '--method')}: {problem}")
        raise RecipeError("; ".join(lines)) from None  # one line: the command line prints one


def command(args: argparse.Namespace) -> int:
    from finetune.processes import command_logging
    from finetune.runs import check_output_folder

    cfg = config_from_args(args)
    command_logging(replace=False)  # the training loop sets up logging; a bare command gets plain console lines
    output = Path(args.output) if args.output else Path(args.model) / f"pruned-{cfg.method}"
    if args.output:  # the default lies inside the run, which prune_run checks first
        check_output_folder(output, "--output")  # before scoring and pruning, not after
    report = prune_run(args.model, cfg, output, args.overrides, overwrite=args.overwrite)
    print(report_table(report))
    print(json.dumps({"pruned_run": str(output), "report": str(output / "prune_report.json")}))
    return 0
