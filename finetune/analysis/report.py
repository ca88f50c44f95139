"""The analysis folder: each task's analysis of one model's outputs, written as ``report.md``,
``analysis.json`` and PNGs, and a one-screen summary for the console.

    OUTPUT/                  (default RUN/analysis/, or ENSEMBLE/analysis/)
      report.md              title (model, split, rows), then each section; figures linked by file name
      analysis.json          the same numbers (per class, confusion counts, examples, calibration bins, ...)
      confusion.png, reliability.png, ...

The folder is written whole under a temporary name, then moved into place, so a report is never half
written and files of an earlier analysis don't linger.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from finetune import runs
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.text import clean
from finetune.durable import atomic_write_text, replace_dir
from finetune.errors import RecipeError, RunFolderError

log = logging.getLogger("finetune.analysis")
REPORT, SUMMARY = "report.md", "analysis.json"
# task -> module of finetune.analysis with analyze(outputs, folder, k) -> Analysis
MODULES = {"classification": "classification", "multi_label_classification": "multi_label",
           "regression": "regression", "token_classification": "token_classification"}


def analyze_outputs(outputs: SplitOutputs, folder: str | Path, k: int = 10, slices: Sequence[str] = (),
                    extra: dict[str, Callable[[Path], Analysis]] | None = None) -> Analysis:
    """Analyse one model's outputs with its task's analysis and write the report into ``folder``.

    ``slices``: columns of ``outputs.columns`` to break the metric down by (single-label classification).
    ``extra``: further sections by name (a comparison, a fitted temperature): each is called with the folder
    its figures go to, and its analysis is appended to the report and to analysis.json under that name.
    Returns the task's analysis, its console lines ending with where the report is.

    Raises:
        RecipeError: no analysis for this task, a slice column the outputs lack, or ``folder`` holds
            files that are not an analysis (nothing is deleted then).
    """
    folder = Path(folder)
    check_output(folder)
    module = _task_module(outputs.task)
    missing = [c for c in slices if c not in outputs.columns]
    if missing:
        raise RecipeError(f"--slice {missing[0]}: the {outputs.split} split has no such column; its other columns "
                          f"are {sorted(outputs.columns) or 'none'}")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        takes_slices = "slices" in inspect.signature(module.analyze).parameters
        options = {"slices": list(slices)} if slices and takes_slices else {}
        if slices and not options:
            log.warning("--slice: the %s analysis has no slices; ignored", outputs.task)
        analysis = module.analyze(outputs, tmp, k, **options)
        sections = {"analysis": analysis, **{name: make(tmp) for name, make in (extra or {}).items()}}
        atomic_write_text(tmp / REPORT, _markdown(outputs, sections))
        atomic_write_text(tmp / SUMMARY, json.dumps(clean(_summary(outputs, sections), digits=None), indent=2) + "\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    figures = sorted(p.name for p in folder.glob("*.png"))
    console = [*analysis.console, *[line for name, s in sections.items() if name != "analysis" for line in s.console],
               f"report: {folder / REPORT}" + (f" (figures: {', '.join(figures)})" if figures else "")]
    return Analysis(analysis.summary, analysis.markdown, console, [folder / name for name in figures])


def _task_module(task: str):
    if task not in MODULES:
        raise RecipeError(f"analyze: no analysis for task {task!r}")
    try:
        return importlib.import_module(f"finetune.analysis.{MODULES[task]}")
    except ModuleNotFoundError as err:
        if err.name != f"finetune.analysis.{MODULES[task]}":
            raise
        raise RecipeError(f"analyze: the analysis of {task} models is not available yet") from None


def check_output(folder: Path, flag: str = "--output") -> None:
    """An analysis folder is new, empty, or an earlier analysis (replaced); anything else is refused.

    Raises:
        RunFolderError: ``folder`` is a file, or a non-empty folder without analysis.json.
    """
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{flag}: {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SUMMARY).is_file():
        raise RunFolderError(f"{flag}: {folder} is not empty and holds no analysis ({SUMMARY}); choose an empty "
                             "or new folder")
    theirs = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())
              if p.is_dir() or not any(fnmatchcase(p.name, pattern) for pattern in runs.ANALYSIS_FILES)] \
        if folder.is_dir() else []
    if theirs:  # replacing the analysis would delete them
        raise RunFolderError(f"{flag}: {folder} holds files finetune analyze did not write ({', '.join(theirs[:5])}); "
                             "move them out, or choose another folder")


def _markdown(outputs: SplitOutputs, sections: dict[str, Analysis]) -> str:
    name = Path(outputs.model).name or outputs.model
    lines = [f"# Analysis of {name}: {outputs.split} split, {len(outputs)} rows", "",
             f"Model: `{outputs.model}`; task: {outputs.task}"
             + (f"; {len(outputs.labels)} classes" if outputs.labels else "") + ".", ""]
    return "\n".join(lines) + "\n" + "\n\n".join(s.markdown.strip() for s in sections.values()) + "\n"


def _summary(outputs: SplitOutputs, sections: dict[str, Analysis]) -> dict:
    head = {"model": outputs.model, "task": outputs.task, "split": outputs.split, "rows": len(outputs),
            "labels": outputs.labels}
    return {**head, **sections["analysis"].summary, **{name: s.summary for name, s in sections.items()
                                                       if name != "analysis"}}
