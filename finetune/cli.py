"""The ``finetune`` command: train, eval, predict, recipes.

    finetune train --recipe sst2_minilm_lora train.lr=3e-4 policy.lora.rank=16
    finetune eval --model runs/sst2_minilm_lora-20261128-120000 --split test
    finetune predict --model RUN_DIR --input sentences.txt
    finetune sweep --recipe recipes/sst2_minilm_sweep.yaml sweep.n_trials=4
    finetune sweep-report sweeps/sst2_minilm_sweep
    finetune auto --recipe trec_minilm_full --budget 30m
    finetune prune --model RUN_DIR --method magnitude --sparsity 0.5
    finetune ensemble --from-sweep SWEEP_DIR --top-k 3
    finetune compare --recipe sst2_minilm_full --variants pretrained,scratch
    finetune analyze RUN_DIR --split test
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from finetune import predictions
from finetune.errors import (
    DataError,
    FinetuneError,
    Interrupted,
    RecipeError,
    RunFolderError,
    file_in_traceback,
    hide_unactionable_warnings,
)
from finetune.progress import QUIET, hide_library_bars, quiet

# exit statuses: expected errors 2 (as argparse's usage errors), the file system 1, Ctrl-C 130 (128 + SIGINT)
EXIT_ERROR, EXIT_FILE_SYSTEM, EXIT_INTERRUPTED, EXIT_BUG = 2, 1, 130, 1
REPORT_BUGS_TO = "the finetune issue tracker"


def _recipes_epilog() -> str:
    import recipes

    lines = [f"  {name:<22} {summary}" for name, summary in recipes.available().items()]
    return "shipped recipes (--recipe NAME or a path):\n" + "\n".join(lines)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    parser.add_argument("--merge", action="store_true",
                        help="adapter policies (lora, dora, ia3): also save a merged full model under merged/")
    parser.add_argument("--from", dest="from_run", metavar="RUN",
                        help="continue the finished run folder RUN on this recipe's data: sets backbone.name=RUN and "
                             "backbone.keep_head=true (same task, head and labels)")
    parser.add_argument("--warm-optimizer", action="store_true",
                        help="with --from: also start from RUN's AdamW moments (RUN kept checkpoints/last: "
                             "output.keep=model+checkpoint or all); the learning-rate schedule starts fresh")


def train_command(args: argparse.Namespace) -> int:
    import recipes
    from finetune.processes import end_processes

    overrides = list(args.overrides) + (["output.merge_lora=true"] if args.merge else [])
    overrides = _continued_from(args) + overrides
    recipe = recipes.load(args.recipe, *overrides)
    if args.resume and not recipe.output.dir:
        raise RecipeError("--resume needs output.dir=RUN_DIR naming the run to continue")
    if is_main_process() and not quiet():
        print("# resolved recipe\n" + recipe.to_yaml(), flush=True)
    result = recipe.run(resume=args.resume, overwrite=args.overwrite or None)
    if is_main_process():
        print(json.dumps({"run_dir": str(result.run_dir), **result.metrics}))
    end_processes()
    return 0


def _continued_from(args: argparse.Namespace) -> list[str]:
    """--from RUN [--warm-optimizer] as the overrides they stand for (finetune.transfer)."""
    if not args.from_run:
        if args.warm_optimizer:
            raise RecipeError("--warm-optimizer needs --from RUN (the finished run whose optimizer state to start from)")
        return []
    named = [o for o in args.overrides if o.partition("=")[0].strip() == "backbone.name"]
    if named:
        raise RecipeError(f"--from {args.from_run} and {named[0]} both name the backbone; pass one of them")
    return [f"backbone.name={args.from_run}", "backbone.keep_head=true",
            *(["backbone.warm_optimizer=true"] if args.warm_optimizer else [])]


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` (or a plain ``python``), known before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def eval_command(args: argparse.Namespace) -> int:
    from finetune.predict import evaluate_run

    print(json.dumps(evaluate_run(args.model, args.split, args.overrides), indent=2))
    return 0


def _check_input_path(path: Path) -> None:
    """Before the model loads (seconds): the --input file exists and has a format predict reads."""
    from finetune.sources import EXTENSIONS

    if not path.exists():
        raise DataError(f"--input: {path} does not exist")
    if not path.is_file():
        raise DataError(f"--input: {path} is a folder; give one file")
    if path.suffix != ".txt" and path.suffix not in EXTENSIONS:
        raise DataError(f"--input: {path}: expected one of {', '.join(['.txt', *EXTENSIONS])}")


def _read_inputs(path: Path, run) -> tuple[list, list | None, list[dict] | None, list[str]]:
    """A .txt file has one input per line; other files go through the recipe's column mapping, and
    their rows come back whole (to keep the other columns beside the predictions), with the input columns.

    Raises:
        DataError: an empty or header-only file, or a column the run needs is missing (named, with those present).
    """
    from finetune.data import read_lines, read_table
    from finetune.tasks import TASKS

    cols, task = run.recipe.data.columns, TASKS[run.recipe.task]
    needed = task.input_columns(cols)
    _check_input_path(path)
    if path.suffix == ".txt":
        if len(needed) > 1:
            raise DataError(f"--input: this run classifies text pairs; give a tsv/csv/json/jsonl file with "
                            f"columns {needed[0]!r} and {needed[1]!r}")
        lines = read_lines(path)
        return ([line.split() for line in lines] if task.words else lines), None, None, []
    table = read_table(path, other_formats=(".txt",))
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"--input: {path} has no column {missing[0]!r} (the run's data.columns); "
                        f"its columns are {table.column_names}")
    return table[needed[0]], (table[needed[1]] if len(needed) > 1 else None), list(table), needed


def predict_command(args: argparse.Namespace) -> int:
    from finetune.ensemble import Ensemble, is_ensemble
    from finetune.export import is_exported, load_exported
    from finetune.predict import check_run_folder, load_run, predict

    # an ensemble folder and an exported one (finetune export) predict like a run (same output)
    ensemble, exported = is_ensemble(args.model), is_exported(args.model)
    if not ensemble and not exported:
        check_run_folder(args.model)
    _check_input_path(Path(args.input))  # all checked in a second, before the model loads
    if args.top_k is not None and args.top_k < 1:
        raise RecipeError(f"--top-k {args.top_k}: give 1 or more")
    fmt = predictions.output_format(args.format, args.output)
    if args.output:
        predictions.check_output_file(args.output)
    started = time.perf_counter()
    run = Ensemble.load(args.model) if ensemble else load_exported(args.model) if exported else load_run(args.model)
    texts, pairs, rows, input_columns = _read_inputs(Path(args.input), run)
    results = run.predict(texts, pairs) if ensemble or exported else predict(run, texts, pairs)
    results = [predictions.keep_top_k(result, args.top_k) for result in results]
    predictions.write(predictions.render(texts, results, rows, input_columns, fmt), args.output)
    if is_main_process():
        print(predictions.summary(results, time.perf_counter() - started)
              + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
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
    if cfg.preset == "auto":
        return _auto(recipe, cfg)
    result = run_sweep(recipe, cfg)
    if is_main_process():
        print(json.dumps({"sweep_dir": str(result.sweep_dir), "best_trial": result.best_trial,
                          f"best_{result.metric}": result.best_value, "best_params": result.best_params,
                          "best_run_dir": str(result.best_run_dir) if result.best_run_dir else None,
                          **({"note": result.note} if result.note else {})}))
    end_processes()
    return 0


def auto_command(args: argparse.Namespace) -> int:
    """``finetune auto``: a recipe (with or without a sweep: section) searched and ensembled within --budget."""
    import recipes
    from finetune.config import read_recipe_file
    from finetune.sweep import load_sweep_file, parse_sweep

    path = recipes.recipe_path(args.recipe)
    overrides = [*args.overrides, f"sweep.budget={args.budget}"] + ([f"sweep.dir={args.dir}"] if args.dir else [])
    if "sweep" in read_recipe_file(path):
        recipe, cfg = load_sweep_file(path, [*overrides, "sweep.preset=auto"])
    else:
        recipe = recipes.load(args.recipe, *[o for o in overrides if not o.startswith("sweep.")])
        cfg = parse_sweep({"preset": "auto"}, [o[len("sweep."):] for o in overrides if o.startswith("sweep.")])
    return _auto(recipe, cfg)


def _auto(recipe, cfg) -> int:
    from finetune.processes import end_processes
    from finetune.sweep.auto import run_auto

    result = run_auto(recipe, cfg)
    if is_main_process():
        print(result.report.read_text(), flush=True)
        print(json.dumps({"sweep_dir": str(result.sweep.sweep_dir), "report": str(result.report),
                          "best_run_dir": str(result.sweep.best_run_dir) if result.sweep.best_run_dir else None,
                          "ensemble_dir": str(result.ensemble_dir) if result.ensemble_dir else None}))
    end_processes()
    return 0


def sweep_report_command(args: argparse.Namespace) -> int:
    from finetune.sweep.report import report_from_dir

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise RunFolderError(f"sweep-report: {sweep_dir} " + ("is a file; give the sweep folder (it holds sweep.yaml)"
                                                              if sweep_dir.exists() else "does not exist"))
    report_from_dir(sweep_dir)
    return 0


def recipes_command(args: argparse.Namespace) -> int:
    print(_recipes_epilog())
    return 0


class UsageError(FinetuneError):
    """A command line argparse refuses (unknown flag, missing --recipe, invalid choice)."""


class Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other expected error: one line, with where to find help."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not reset `finetune --debug train` (the funnel reads argv anyway)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of any error (for bug reports)")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars and only warnings on the console (the run folder's train.log "
                             "still gets everything); results and errors are still printed")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="finetune", description="Fine-tune Hugging Face backbones from recipes.",
                    epilog=_recipes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recipe", epilog=_recipes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(train)
    train.set_defaults(handler=train_command)
    evaluate = commands.add_parser("eval", help="evaluate a finished run on a split")
    evaluate.add_argument("--model", required=True, help="run folder")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=DIR")
    evaluate.set_defaults(handler=eval_command)
    pred = commands.add_parser("predict", help="print labels and probabilities, one JSON line per input")
    pred.add_argument("--model", required=True,
                      help="run folder, ensemble folder (finetune ensemble) or exported folder (finetune export)")
    pred.add_argument("--input", required=True, help=".txt (one input per line) or a tsv/csv/json/jsonl/parquet file")
    pred.add_argument("--top-k", type=int, help="keep only the K most probable classes per input")
    pred.add_argument("--output", help="write to this file (written whole, then moved into place) instead of stdout")
    pred.add_argument("--format", choices=predictions.FORMATS,
                      help="jsonl (default), or csv/tsv with the input's other columns beside predicted_* columns; "
                           "default: from --output's suffix")
    pred.set_defaults(handler=predict_command)
    commands.add_parser("recipes", help="list the shipped recipes").set_defaults(handler=recipes_command)
    sweep = commands.add_parser("sweep", help="run or resume a sweep (grid, random, bayes, gp)")
    _add_sweep_args(sweep)
    sweep.set_defaults(handler=sweep_command)
    auto = commands.add_parser("auto", help="search and ensemble a recipe within a time budget (sweep.preset: auto)")
    auto.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    auto.add_argument("--budget", required=True, help="wall-clock budget for search and ensemble: 2h, 90m or seconds")
    auto.add_argument("--dir", help="the sweep folder (default: sweeps/<recipe name>-auto); re-running resumes")
    auto.add_argument("overrides", nargs="*", metavar="key=value",
                      help="recipe overrides (data.max_train_samples=...) and sweep overrides (sweep.seed=1)")
    auto.set_defaults(handler=auto_command)
    report = commands.add_parser("sweep-report", help="rebuild a sweep's table and plots")
    report.add_argument("sweep_dir", help="the sweep folder")
    report.set_defaults(handler=sweep_report_command)
    # commands that live beside their feature: each module has add_arguments(parser) and command(args)
    for name, module, help_text in [
        ("prune", "finetune.prune", "prune a finished run (magnitude, heads, layers) and report before/after"),
        ("ensemble", "finetune.ensemble", "combine finished runs or a sweep's best trials into an ensemble"),
        ("compare", "finetune.compare", "train recipe variants side by side (pretrained/scratch, full/lora/head_only)"),
        ("analyze", "finetune.analysis", "what a run or ensemble gets right and wrong on a split: report.md, JSON, PNGs"),
        ("distill", "finetune.distill", "train a smaller student on a finished run's or an ensemble's outputs"),
        ("export", "finetune.export", "export a finished run to ONNX / TorchScript / int8 for serving, checked"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=_lazy_command(module))
        importlib.import_module(module).add_arguments(sub)
    for sub in commands.choices.values():
        _add_debug(sub)
    return parser


def _lazy_command(module: str):
    def handler(args: argparse.Namespace) -> int:
        return importlib.import_module(module).command(args)
    return handler


# --- the error funnel: every entry point ends here --------------------------------------------


def one_line(message: str) -> str:
    """The first line, then the others joined with '; ' (a message must fit the one line a user reads)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines)


# errno -> what it means for the path it names
_OS_REASONS = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder", errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "already exists", errno.EROFS: "read-only file system", errno.ENOTEMPTY: "folder not empty",
}
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def describe(err: BaseException, command: str) -> tuple[str, int] | None:
    """The one line and exit status for an error a user can act on; None for a bug (keep its traceback)."""
    if isinstance(err, Interrupted):  # the training loop's own line: what was kept and the command to go on
        message = one_line(str(err))
        return (message if message.startswith("interrupted") else f"interrupted: {message}"), EXIT_INTERRUPTED
    if isinstance(err, FinetuneError):
        return f"error: {one_line(str(err)) or type(err).__name__}", EXIT_ERROR
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted: {command} stopped by Ctrl-C before it finished", EXIT_INTERRUPTED
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        where = f" writing {err.filename}" if err.filename else ""
        return f"error: no space left on device{where}: free some space and run the command again", EXIT_FILE_SYSTEM
    if isinstance(err, OSError) and err.filename:
        path = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"error: {path}: {_OS_REASONS.get(err.errno, err.strerror or type(err).__name__)}", EXIT_FILE_SYSTEM
    from safetensors import SafetensorError

    if isinstance(err, (SafetensorError, json.JSONDecodeError)):  # a damaged weight, config or label file
        kind = "safetensors" if isinstance(err, SafetensorError) else "JSON"
        file = file_in_traceback(err, (".safetensors",) if kind == "safetensors" else (".json", ".jsonl"))
        if file:
            return f"error: {file} is damaged, not a valid {kind} file ({one_line(str(err))})", EXIT_ERROR
    return None


def _run(prog: str, make_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> int:
    """Parse and run one command; expected errors become one line on stderr (only from the main process
    of a multi-process launch: the others would repeat it), anything else keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # read before parsing, so a usage error under --debug also raises
    if "--quiet" not in argv:
        return _command(prog, make_parser, argv, debug)
    # read by the progress bars and loggers of every part (finetune.progress) and by worker processes; for this
    # command only: a notebook or test that calls main(["...", "--quiet"]) is not silenced for what follows
    before = os.environ.get(QUIET)
    os.environ[QUIET] = "1"
    try:
        return _command(prog, make_parser, argv, debug)
    finally:
        if before is None:
            os.environ.pop(QUIET, None)
        else:
            os.environ[QUIET] = before


def _command(prog: str, make_parser: Callable[[], argparse.ArgumentParser], argv: list[str], debug: bool) -> int:
    hide_library_bars()  # off a terminal or with --quiet
    hide_unactionable_warnings()  # per command: a caller's catch_warnings may have reset the filters
    try:
        args = make_parser().parse_args(argv)  # building the parser imports torch: Ctrl-C may come that early
        return args.handler(args)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        words = [a for a in argv if not a.startswith("-")][:1] if prog == "finetune" else []
        command = " ".join([prog, *words])  # "finetune predict", "finetune.py"
        described = describe(err, command)
        if described is None:
            traceback.print_exc()
            print(f"bug: {command} failed with an unexpected {type(err).__name__}: this is a bug in finetune, not "
                  f"a problem with your input; please report it to {REPORT_BUGS_TO} with the command and the "
                  "traceback above", file=sys.stderr)
            return EXIT_BUG
        line, status = described
        if is_main_process():
            print(line, file=sys.stderr, flush=True)
        return status


def main(argv: list[str] | None = None) -> int:
    return _run("finetune", build_parser, argv)


def _standalone(prog: str, description: str, add_args: Callable[[argparse.ArgumentParser], None],
                command: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """One command as its own script (scripts/finetune.py, scripts/sweep.py), with the same error funnel."""
    def make_parser() -> argparse.ArgumentParser:
        parser = Parser(prog=prog, description=description, epilog=_recipes_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(parser)
        _add_debug(parser)
        parser.set_defaults(handler=command)
        return parser

    return _run(prog, make_parser, argv)


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
