"""train.soup: average the weights of a run's best evaluations (Wortsman et al. 2022, "Model soups").

While training, the trainable weights of the ``train.soup_size`` best evaluations so far are kept in
``checkpoints/soup/step-N.safetensors`` (one file per evaluation, written before that evaluation's checkpoint;
a resumed run drops the files its checkpoint does not know). At the end, with the candidates best first:

- ``uniform``: the mean of all of them;
- ``greedy``: start from the best, add each next one only if validation of the mean does not get worse.

The soup replaces the best single evaluation only when its validation score is at least as good, so the
choice is made on validation, like every other choice of a run. Frozen weights are the same in every
candidate, so only trainable ones are averaged. LoRA factors are not averaged (the mean of A and of B is
not the mean of the updates BA): the recipe refuses the combination.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune import runs
from finetune.weights import save_trainable

log = logging.getLogger("finetune")

SOUP = Path(runs.CHECKPOINTS) / "soup"


class SoupPool:
    """The best ``size`` evaluations so far (by the primary metric), each with its weights on disk."""

    def __init__(self, run_dir: Path, size: int, greater: bool):
        self.folder, self.size, self.greater = run_dir / SOUP, size, greater
        self.entries: list[tuple[float, int]] = []  # (value, step), best first

    def _ranked(self, entries: list[tuple[float, int]]) -> list[tuple[float, int]]:
        # best first; among equal scores the earlier step
        return sorted(entries, key=lambda e: (-e[0] if self.greater else e[0], e[1]))[:self.size]

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step}.safetensors"

    def offer(self, step: int, value: float, model: torch.nn.Module, writer: bool) -> None:
        """Keep this evaluation's weights if it ranks among the best ``size``; ``writer``: the main process."""
        if math.isnan(value):
            return
        ranked = self._ranked(self.entries + [(value, step)])
        if (value, step) not in ranked:
            return
        dropped = [e for e in self.entries if e not in ranked]
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_trainable(model, self.path(step))
            for _, old in dropped:
                self.path(old).unlink(missing_ok=True)
        self.entries = ranked

    def restore(self, history: list[dict], primary: str, writer: bool) -> None:
        """After a resume: the candidates among the evaluations the checkpoint knows; other files go."""
        known = {r["step"]: r[primary] for r in history}
        on_disk = {int(p.stem.removeprefix("step-")): p for p in self.folder.glob("step-*.safetensors")}
        self.entries = self._ranked([(known[s], s) for s in on_disk if s in known and not math.isnan(known[s])])
        if writer:
            kept = {s for _, s in self.entries}
            for step, path in on_disk.items():
                if step not in kept:
                    path.unlink()


def cook(pool: SoupPool, method: str, model: torch.nn.Module, best: dict, primary: str,
         evaluate: Callable[[], dict]) -> dict:
    """Make the soup in ``model`` (its weights: the best evaluation's on entry) and say what it holds.

    ``best``: the best evaluation's validation metrics; ``evaluate()`` scores the model as it is on validation.
    The model is left with the soup's weights when the soup scored at least as well on ``primary``, else with
    the best evaluation's again; ``metrics`` in the answer are the validation metrics of what it is left with."""
    best_value = best[primary]
    candidates = [step for _, step in pool.entries]
    report = {"method": method, "candidates": candidates, "best_single": best_value}
    if len(candidates) < 2:
        log.info("train.soup: %d evaluation(s) to average; keeping the best evaluation (evaluate more often: "
                 "train.eval_every)", len(candidates))
        return {**report, "members": candidates[:1], "validation": best_value, "kept": False, "metrics": best}
    states = {step: load_file(str(pool.path(step))) for step in candidates}
    params = dict(model.named_parameters())
    best_state = {name: params[name].detach().clone() for name in states[candidates[0]]}

    def load_mean(steps: list[int]) -> None:
        with torch.no_grad():
            for name in best_state:
                params[name].copy_(torch.stack([states[s][name].float() for s in steps]).mean(0))

    better_or_equal = (lambda a, b: a >= b) if pool.greater else (lambda a, b: a <= b)
    if method == "uniform":
        members = candidates
        load_mean(members)
        metrics = evaluate()
    else:  # greedy, best first; each addition must not lower validation
        members, metrics = candidates[:1], best
        for step in candidates[1:]:
            load_mean(members + [step])
            tried_metrics = evaluate()
            tried, value = tried_metrics[primary], metrics[primary]
            log.info("train.soup greedy: steps %s -> validation %.4f (%s)", members + [step], tried,
                     "added" if better_or_equal(tried, value) else "left out")
            if better_or_equal(tried, value):
                members, metrics = members + [step], tried_metrics
        load_mean(members)
    value = metrics[primary]
    kept = len(members) > 1 and better_or_equal(value, best_value)
    if not kept:
        with torch.no_grad():
            for name, tensor in best_state.items():
                params[name].copy_(tensor)
    log.info("train.soup %s of steps %s: validation %.4f vs the best evaluation's %.4f: %s", method, members, value,
             best_value, "the soup is the model" if kept else "keeping the best evaluation")
    return {**report, "members": members, "validation": value, "kept": kept, "metrics": metrics if kept else best}
