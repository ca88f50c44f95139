"""The ``finetune`` command: train, eval, predict, recipes.

    finetune train --recipe sst2_minilm_lora train.lr=3e-4 policy.lora.rank=16
    finetune eval --model runs/sst2_minilm_lora-20261128-120000 --split test
    finetune predict --model RUN_DIR --input sentences.txt
    finetune sweep --recipe recipes/sst2_minilm_sweep.yaml sweep.n_trials=4
    finetune sweep-report sweeps/sst2_minilm_sweep
    finetune prune --model RUN_DIR --method magnitude --sparsity 0.5
    finetune ensemble --from-sweep SWEEP_DIR --top-k 3
    finetune compare --recipe sst2_minilm_full --variants pretrained,scratch
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from finetune.config import RecipeError


def _recipes_epilog() -> str:
    import recipes

    lines = [f"  {name:<22} {summary}" for name, summary in recipes.available().items()]
    return "shipped recipes (--recipe NAME or a path):\n" + "\n".join(lines)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    parser.add_argument("--merge", action="store_true", help="LoRA: also save a merged full model under merged/")


def train_command(args: argparse.Namespace) -> int:
    import recipes
    from finetune.config import Recipe
    from finetune.processes import end_processes

    overrides = list(args.overrides) + (["output.merge_lora=true"] if args.merge else [])
    recipe = Recipe.from_yaml(recipes.recipe_path(args.recipe), overrides=overrides)
    if args.resume and not recipe.output.dir:
        raise RecipeError("--resume needs output.dir=RUN_DIR naming the run to continue")
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        print("# resolved recipe\n" + recipe.to_yaml(), flush=True)
    result = recipe.run(resume=args.resume, overwrite=args.overwrite or None)
    if main_process:
        print(json.dumps({"run_dir": str(result.run_dir), **result.metrics}))
    end_processes()
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from finetune.predict import evaluate_run

    print(json.dumps(evaluate_run(args.model, args.split, args.overrides), indent=2))
    return 0


def _read_inputs(path: Path, run) -> tuple[list, list | None]:
    """A .txt file has one input per line; other files go through the recipe's column mapping."""
    from finetune.data import read_table

    cols, task = run.recipe.data.columns, run.recipe.task
    if not path.is_file():
        raise RecipeError(f"--input: {path} does not exist")
    if path.suffix == ".txt":
        if cols.text_pair and task != "token_classification":
            raise RecipeError(f"--input: this run classifies text pairs; give a tsv/csv/json/jsonl file with "
                              f"columns {cols.text!r} and {cols.text_pair!r}")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return ([line.split() for line in lines] if task == "token_classification" else lines), None
    table = read_table(path)
    needed = [cols.tokens] if task == "token_classification" else [cols.text] + ([cols.text_pair] if cols.text_pair else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise RecipeError(f"--input: {path} has no column {missing[0]!r}; its columns are {table.column_names}")
    return table[needed[0]], (table[needed[1]] if len(needed) > 1 else None)


def predict_command(args: argparse.Namespace) -> int:
    from finetune.ensemble import Ensemble, is_ensemble
    from finetune.predict import load_run, predict

    if is_ensemble(args.model):  # an ensemble folder predicts like a run (same output lines)
        run = Ensemble.load(args.model)
        texts, pairs = _read_inputs(Path(args.input), run)
        results = run.predict(texts, pairs)
    else:
        run = load_run(args.model)
        texts, pairs = _read_inputs(Path(args.input), run)
        results = predict(run, texts, pairs)
    for text, result in zip(texts, results):
        print(json.dumps({"input": text, **result}, ensure_ascii=False))
    return 0


def _add_sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe or sweep YAML with a sweep: section")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (train.lr=...) and sweep overrides (sweep.n_trials=3)")
    parser.add_argument("--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
                                          "(default: a journal file in the sweep folder)")
    parser.add_argument("--study", help="study name (default: the recipe name)")


def sweep_command(args: argparse.Namespace) -> int:
    import recipes
    from finetune.processes import end_processes
    from finetune.sweep import load_sweep_file, run_sweep

    overrides = list(args.overrides)
    overrides += [f"sweep.storage={args.storage}"] if args.storage else []
    overrides += [f"sweep.study={args.study}"] if args.study else []
    recipe, cfg = load_sweep_file(recipes.recipe_path(args.recipe), overrides)
    result = run_sweep(recipe, cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"sweep_dir": str(result.sweep_dir), "best_trial": result.best_trial,
                          f"best_{result.metric}": result.best_value, "best_params": result.best_params,
                          "best_run_dir": str(result.best_run_dir) if result.best_run_dir else None}))
    end_processes()
    return 0


def sweep_report_command(args: argparse.Namespace) -> int:
    from finetune.sweep.report import report_from_dir

    report_from_dir(args.sweep_dir)
    return 0


def recipes_command(args: argparse.Namespace) -> int:
    print(_recipes_epilog())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune Hugging Face backbones from recipes.",
                                     epilog=_recipes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recipe", epilog=_recipes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(train)
    train.set_defaults(handler=train_command)
    evaluate = commands.add_parser("eval", help="evaluate a finished run on a split")
    evaluate.add_argument("--model", required=True, help="run folder")
    evaluate.add_argument("--split", default="test", choices=["validation", "test"])
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=DIR")
    evaluate.set_defaults(handler=eval_command)
    pred = commands.add_parser("predict", help="print labels and probabilities, one JSON line per input")
    pred.add_argument("--model", required=True, help="run folder")
    pred.add_argument("--input", required=True, help=".txt (one input per line) or a tsv/csv/json/jsonl/parquet file")
    pred.set_defaults(handler=predict_command)
    commands.add_parser("recipes", help="list the shipped recipes").set_defaults(handler=recipes_command)
    sweep = commands.add_parser("sweep", help="run or resume a sweep (grid, random, bayes, gp)")
    _add_sweep_args(sweep)
    sweep.set_defaults(handler=sweep_command)
    report = commands.add_parser("sweep-report", help="rebuild a sweep's table and plots")
    report.add_argument("sweep_dir", help="the sweep folder")
    report.set_defaults(handler=sweep_report_command)
    # commands that live beside their feature: each module has add_arguments(parser) and command(args)
    for name, module, help_text in [
        ("prune", "finetune.prune", "prune a finished run (magnitude, heads, layers) and report before/after"),
        ("ensemble", "finetune.ensemble", "combine finished runs or a sweep's best trials into an ensemble"),
        ("compare", "finetune.compare", "train recipe variants side by side (pretrained/scratch, full/lora/head_only)"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=_lazy_command(module))
        importlib.import_module(module).add_arguments(sub)
    return parser


def _lazy_command(module: str):
    def handler(args: argparse.Namespace) -> int:
        return importlib.import_module(module).command(args)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _standalone(prog: str, description: str, add_args, command, argv: list[str] | None) -> int:
    """One command as its own script (scripts/finetune.py, scripts/sweep.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_recipes_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    try:
        return command(parser.parse_args(argv))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def train_main(argv: list[str] | None = None) -> int:
    """``scripts/finetune.py``: the train command on its own."""
    return _standalone("finetune.py", "Train a recipe (under accelerate launch or python).", _add_train_args,
                       train_command, argv)


def sweep_main(argv: list[str] | None = None) -> int:
    """``scripts/sweep.py``: the sweep command on its own."""
    return _standalone("sweep.py", "Run, resume or join a sweep (under accelerate launch or python).",
                       _add_sweep_args, sweep_command, argv)


if __name__ == "__main__":
    sys.exit(main())
