"""The teacher: a finished run or an ensemble, and its outputs on the student's training rows.

Targets are what the task averages across ensemble members (``Task.scores``): class probabilities (N, C),
per-label sigmoid probabilities (N, C), scores (N,), or per-token class probabilities (token classification,
one run only). They are computed once per teacher and input set and cached under $FINETUNE_CACHE/teacher,
keyed by the teacher's files and the inputs, so a sweep over distillation settings runs the teacher once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import runs
from finetune.config import RecipeError
from finetune.features import cache_root
from finetune.progress import bar

log = logging.getLogger("finetune")


@dataclass
class Teacher:
    path: Path
    task: str
    labels: list[str] | None
    members: list  # finetune.ensemble.members.Member
    weights: list[float]
    fingerprint: str

    @property
    def kind(self) -> str:
        return f"ensemble of {len(self.members)}" if self.is_ensemble else "run"

    @property
    def is_ensemble(self) -> bool:
        from finetune.ensemble import is_ensemble

        return is_ensemble(self.path)


def _files_fingerprint(folder: Path, names: list[str]) -> list:
    found = []
    for name in names:
        file = folder / name
        if file.is_file():
            stat = file.stat()
            found.append([name, stat.st_size, stat.st_mtime_ns])
    return found


def _run_fingerprint(run_dir: Path) -> list:
    return [str(run_dir.resolve()), _files_fingerprint(run_dir, [*runs.WEIGHTS, runs.RECIPE, runs.LABEL_MAP])]


def check_teacher(path: str | Path) -> Path:
    """The teacher folder, checked before anything loads.

    Raises:
        RecipeError: missing, neither a finished run nor an ensemble folder.
    """
    from finetune.ensemble import is_ensemble
    from finetune.predict import check_run_folder

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"distill.teacher: {folder} does not exist (expected a finished run folder or an "
                          "ensemble folder)")
    if not is_ensemble(folder):
        check_run_folder(folder, flag="distill.teacher")
    return folder


def load_teacher(path: str | Path) -> Teacher:
    """Load a run (adapters merged in) or an ensemble's members with their weights.

    Raises:
        RecipeError: not a finished run or ensemble folder, or a member without its model.
    """
    from finetune.ensemble import Ensemble, is_ensemble
    from finetune.ensemble.members import Member, _merged
    from finetune.predict import load_run

    folder = check_teacher(path)
    if is_ensemble(folder):
        ensemble = Ensemble.load(folder)
        key = [(folder / "ensemble.json").read_text(), [_run_fingerprint(m.path) for m in ensemble.members]]
        return Teacher(folder, ensemble.recipe.task, ensemble.labels, ensemble.members, list(ensemble.weights),
                       _digest(key))
    run = _merged(load_run(folder))
    return Teacher(folder, run.recipe.task, run.labels, [Member(folder.name, folder, run)], [1.0],
                   _digest(_run_fingerprint(folder)))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def check_fits(teacher: Teacher, task: str, labels: list[str] | None) -> None:
    """The student learns the teacher's outputs: same task, same label set (columns are matched by name).

    Raises:
        RecipeError: another task or another label set.
    """
    if teacher.task != task:
        raise RecipeError(f"distill.teacher: {teacher.path} is a {teacher.task} model; the student's task is {task}")
    if set(teacher.labels or []) != set(labels or []):
        raise RecipeError(f"distill.teacher: {teacher.path} predicts labels {teacher.labels}; the student's data "
                          f"has {labels}: a student learns the teacher's label set")


def sequence_targets(teacher: Teacher, texts: list, pairs: list | None, labels: list[str] | None,
                     batch_size: int = 128) -> torch.Tensor:
    """The weighted average of the members' ``Task.scores`` over inputs, columns in ``labels`` order."""
    from finetune.ensemble.members import member_outputs

    total = None
    for member, weight in zip(teacher.members, teacher.weights):
        outputs = member_outputs(member, texts, pairs, labels, batch_size, desc=f"teacher {member.name}")
        total = outputs * weight if total is None else total + outputs * weight
    return total / sum(teacher.weights)


@torch.inference_mode()
def token_targets(teacher: Teacher, tokenised, student_tokenizer, labels: list[str], batch_size: int = 64) -> list:
    """Per-token class probabilities (tokens x C, columns in ``labels`` order) on the student's own tokens,
    which the teacher reads as they are: the two tokenizers must be the same.

    Raises:
        RecipeError: an ensemble teacher, or a teacher with another vocabulary.
    """
    if teacher.is_ensemble:
        raise RecipeError("distill.teacher: token classification distils from one run, not an ensemble")
    run = teacher.members[0].run
    if run.tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise RecipeError(f"distill.teacher: {teacher.path} tokenises with another vocabulary than the student's "
                          "backbone; token classification distils per token, so both need the same tokenizer")
    columns = [run.labels.index(label) for label in labels]
    out: list = [None] * len(tokenised)
    order = sorted(range(len(tokenised)), key=lambda i: len(tokenised[i]["input_ids"]))
    for start in bar(range(0, len(order), batch_size), desc="teacher", leave=False):
        rows = order[start:start + batch_size]
        width = max(len(tokenised[i]["input_ids"]) for i in rows)
        ids = torch.full((len(rows), width), student_tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            row = tokenised[i]["input_ids"]
            ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
        probs = run.model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., columns]
        for j, i in enumerate(rows):
            out[i] = probs[j, :int(mask[j].sum())]
    return out


def cached(teacher: Teacher, inputs_key, compute, describe: str):
    """Targets from the cache, else computed and stored (a tensor, or a list of per-row tensors); and whether
    they came from the cache."""
    from safetensors.torch import load_file, save_file

    key = _digest([teacher.fingerprint, inputs_key])
    file = cache_root().parent / "teacher" / f"{key}.safetensors"  # beside features/: $FINETUNE_CACHE/teacher
    if file.is_file():
        try:
            stored = load_file(str(file))
            log.info("teacher targets for %s read from the cache %s", describe, file)
            return _unpack(stored), True
        except Exception as err:  # a damaged cache file is computed again, not trusted
            log.warning("teacher cache %s is unreadable (%s): computing the targets again", file, err)
    targets = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    save_file(_pack(targets), str(tmp))
    os.replace(tmp, file)
    log.info("teacher targets for %s cached in %s", describe, file)
    return targets, False


def _pack(targets) -> dict[str, torch.Tensor]:
    if isinstance(targets, torch.Tensor):
        return {"targets": targets.contiguous()}
    lengths = torch.tensor([len(t) for t in targets])
    return {"flat": torch.cat(targets).contiguous(), "lengths": lengths}


def _unpack(stored: dict[str, torch.Tensor]):
    if "targets" in stored:
        return stored["targets"]
    return list(torch.split(stored["flat"], stored["lengths"].tolist()))


def texts_key(texts: list, pairs: list | None) -> str:
    return _digest([texts, pairs])
