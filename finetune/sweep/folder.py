"""A sweep folder's disk: which trials' models it holds, the ``keep_top_k`` budget, and ``best/``
(hard links to the best model this folder ran). Trials that ran in another worker's folder are theirs;
trials lent by a warm start are nobody's here."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from finetune import runs
from finetune.durable import link_or_copy
from finetune.runs import remove_model, replace_dir
from finetune.sweep.trials import own_trials


def run_folders(trial_dir: Path) -> list[Path]:
    """A trial's run folder, and one per seed when repeats > 1."""
    return [trial_dir, *sorted(trial_dir.glob("seed-*"))]


@dataclass
class SweepFolder:
    path: Path
    study_name: str
    direction: str
    id: str
    """host:path, recorded by each trial: workers on other machines keep theirs in their own sweep folders."""
    top_k: int | None
    """sweep.keep_top_k: the models of the best k trials are kept, the others removed."""

    def best(self, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        complete = own_trials(study, (TrialState.COMPLETE,))
        if not complete:
            return None
        return max(complete, key=lambda t: t.value if self.direction == "maximize" else -t.value)

    def keep_top_k(self, study: optuna.Study) -> None:
        """Keep the models of the best k distinct trials (a reused duplicate shares its original's folder)."""
        k = self.top_k
        if k is None:
            return
        # this folder's disk: other workers' trials are theirs
        complete = sorted((t for t in own_trials(study, (TrialState.COMPLETE,)) if self.ran_here(t)),
                          key=lambda t: t.value, reverse=self.direction == "maximize")
        folders = list(dict.fromkeys(t.user_attrs.get("run_dir", f"trials/{t.number:04d}") for t in complete))
        for run_dir in folders[k:]:
            owner = next(t for t in complete if t.user_attrs.get("run_dir", f"trials/{t.number:04d}") == run_dir)
            for folder in run_folders(self.path / run_dir):
                remove_model(folder, f"trial {owner.number} is not among the best {k} (sweep.keep_top_k)")

    def ran_here(self, trial: optuna.trial.FrozenTrial) -> bool:
        """The trial's folder is in this sweep folder (trials of older sweeps don't say: look for it)."""
        folder = trial.user_attrs.get("folder")
        if folder is not None:
            return folder == self.id
        return "model_dir" in trial.user_attrs and (self.path / trial.user_attrs["model_dir"]).is_dir()

    def model_here(self, trial: optuna.trial.FrozenTrial) -> bool:
        model = self.path / trial.user_attrs.get("model_dir", "-")
        return (self.ran_here(trial) and (model / runs.RECIPE).is_file()
                and not (model / runs.MODEL_REMOVED).exists())

    def held_by_best(self) -> dict | None:
        """What best/ holds: {"trial", "value", "overrides"} of this study, or None."""
        with contextlib.suppress(OSError, ValueError):
            held = json.loads((self.path / "best" / "sweep_trial.json").read_text())
            if held.get("study", self.study_name) == self.study_name:
                return held
        return None

    def update_best(self, study: optuna.Study) -> None:
        """Point best/ at the best model this folder holds (hard links: no extra disk, survives keep_top_k).
        A trial that ran in another worker's sweep folder never counts: its model is there, not here."""
        here = [t for t in own_trials(study, (TrialState.COMPLETE,)) if self.model_here(t)]
        if not here:
            return
        best = max(here, key=lambda t: t.value if self.direction == "maximize" else -t.value)
        held = self.held_by_best()
        if held is not None and held["trial"] == best.number:
            return
        tmp = self.path / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # the marker is written, not linked: writing through a hard link would change the trial's own copy
        shutil.copytree(self.path / best.user_attrs["model_dir"], tmp, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(".lock", "sweep_trial.json"))
        (tmp / "sweep_trial.json").write_text(json.dumps({"study": self.study_name, "trial": best.number,
                                                          "value": best.value,
                                                          "overrides": best.user_attrs.get("overrides", [])}))
        replace_dir(tmp, self.path / "best")
