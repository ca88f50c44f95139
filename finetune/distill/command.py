"""``finetune distill``: a student recipe built from the teacher's (or given), trained with ``distill.teacher``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.config import RecipeError
from finetune.distill.teacher import check_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="finished run folder or ensemble folder to learn from")
    parser.add_argument("--student", metavar="RECIPE",
                        help="the student's recipe (YAML file or shipped name); default: the teacher's recipe with "
                             "its encoder cut to --layers")
    parser.add_argument("--layers", type=int,
                        help="encoder layers the student keeps (backbone.num_layers; default 3 without --student)")
    parser.add_argument("--init", choices=["teacher", "pretrained"], default="teacher",
                        help="without --student: start from the teacher's fine-tuned lower layers and its head "
                             "(an ensemble's best member on validation), or from the teacher's own pretrained "
                             "backbone with a new head")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. distill.temperature=4 distill.alpha=0.9 train.epochs=2")


def student_recipe(teacher: str | Path, student: str | None = None, layers: int | None = None,
                   init: str = "teacher", overrides: list[str] | tuple[str, ...] = ()):
    """The student's recipe: ``student`` with the teacher set, or the teacher's own recipe with its encoder cut
    to ``layers`` (default 3), starting from the teacher's fine-tuned layers and head (``backbone.keep_head``;
    an override may turn it off) or from its pretrained backbone with a new head.

    Raises:
        RecipeError: a teacher that is not a finished run or ensemble, or --layers below 1.
    """
    import recipes
    from finetune.recipe import Recipe

    folder = check_teacher(teacher)
    if layers is not None and layers < 1:
        raise RecipeError(f"--layers {layers}: a student keeps at least 1 encoder layer")
    given = [o.partition("=")[0].strip() for o in overrides]
    if "distill.teacher" in given:
        raise RecipeError("--teacher and distill.teacher= both name the teacher; pass --teacher only")
    wanted = [f"distill.teacher={folder}"] + ([f"backbone.num_layers={layers}"] if layers is not None else [])
    if student is not None:
        return recipes.load(student, *wanted, *overrides)
    raw, init_run = _teacher_recipe(folder)
    base_name = raw["backbone"]["name"]
    kept = layers or 3
    raw = {**raw, "name": f"{raw.get('name', 'recipe')}_student_L{kept}", "prune": {}, "output": {},
           "backbone": {**{k: v for k, v in raw["backbone"].items() if k not in ("source", "keep_head",
                                                                                 "warm_optimizer")},
                        "name": str(init_run) if init == "teacher" else base_name, "num_layers": kept}}
    if init == "teacher":  # its own head on its own lower layers starts closer than a new one (benchmarks/lean)
        raw["backbone"]["keep_head"] = True
    if init == "pretrained" and isinstance(raw["backbone"].get("source"), dict):
        raw["backbone"]["name"] = raw["backbone"]["source"].get("backbone") or base_name
    return Recipe.from_dict(raw, overrides=[*wanted[:1], *overrides])


def _teacher_recipe(folder: Path) -> tuple[dict, Path]:
    """The teacher's recipe as a dict, and the run whose layers a student starts from: for an ensemble, the
    member with the best validation score on the ensemble's own data (its report), else in its metrics.json."""
    from finetune.config import RecipeConfig
    from finetune.ensemble import is_ensemble
    from finetune.metrics import greater_is_better

    if not is_ensemble(folder):
        return RecipeConfig.from_yaml(folder / "recipe.yaml").to_dict(), folder
    artefact = json.loads((folder / "ensemble.json").read_text())
    primary = RecipeConfig.from_dict(artefact["recipe"]).eval.primary
    reported = {entry["name"]: entry.get("validation", {}).get(primary)
                for entry in (artefact.get("report") or {}).get("members", [])}
    scored = []
    for entry in artefact["members"]:
        path = next((p for p in (folder / entry["path"], Path(entry["absolute_path"])) if p.is_dir()), None)
        if path is None:
            raise RecipeError(f"--teacher: ensemble member {entry['name']} of {folder} is missing")
        value = reported.get(entry["name"])
        if value is None and (path / "metrics.json").is_file():
            value = json.loads((path / "metrics.json").read_text()).get("validation", {}).get(primary)
        if value is not None:
            scored.append((value if greater_is_better(primary) else -value, str(path.resolve())))
    if not scored:
        raise RecipeError(f"--teacher: no member of {folder} has validation scores to pick a starting run from; "
                          "use --init pretrained or --student RECIPE")
    best = Path(max(scored)[1])
    return RecipeConfig.from_yaml(best / "recipe.yaml").to_dict(), best


def command(args: argparse.Namespace) -> int:
    from finetune.processes import end_processes
    from finetune.progress import quiet

    recipe = student_recipe(args.teacher, args.student, args.layers, args.init, args.overrides)
    if not quiet():
        print("# student recipe\n" + recipe.to_yaml(), flush=True)
    result = recipe.run(overwrite=args.overwrite or None)
    metrics = result.metrics
    print(json.dumps({"run_dir": str(result.run_dir), **metrics}))
    teacher_test, student_test = metrics.get("distill", {}).get("teacher_test"), metrics.get("test")
    primary = recipe.eval.primary
    if teacher_test and student_test and primary in teacher_test and primary in student_test:
        change = student_test[primary] - teacher_test[primary]
        print(f"student test {primary} {student_test[primary]:.4f} vs teacher {teacher_test[primary]:.4f} "
              f"({change:+.4f}); {metrics['total_parameters']:,} parameters", file=sys.stderr)
    end_processes()
    return 0
