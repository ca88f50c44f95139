"""Scoring combinations on the recipe's validation and test data: the candidate ``Pool`` (outputs
computed once), validation weights, greedy selection, and the report with its markdown table."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import RecipeConfig, RecipeError
from finetune.ensemble.combine import average, predict_ids
from finetune.ensemble.members import Member, member_outputs, shared_labels
from finetune.tasks import TASKS

log = logging.getLogger("finetune.ensemble")  # one logger for the package: setup_logging configures it


@dataclass
class Split:
    texts: list
    pairs: list | None
    gold: list  # label ids, or floats for regression


def load_eval_data(recipe: RecipeConfig, labels: list[str] | None) -> dict[str, Split]:
    """Validation and test (when the recipe has one) from the recipe's data section.

    Raises:
        RecipeError: missing files or columns, or a label the members don't know.
    """
    from finetune import data as data_lib

    recipe = recipe.model_copy(deep=True)
    # The train split isn't used; pointing it at validation spares reading a large training file
    # (unless validation is carved out of train, which needs train read).
    if recipe.data.splits.validation is not None:
        recipe.data.splits.train = recipe.data.splits.validation
    if labels:
        recipe.data.labels = labels
    raw = data_lib.load_splits(recipe.data)
    data_lib.label_names(recipe, raw)  # every gold label must be one the members know
    cols = recipe.data.columns
    splits = {}
    for split in ("validation", "test"):
        if split in raw:
            ds = raw[split]
            gold = [labels.index(data_lib.label_text(v)) for v in ds[cols.label]] if TASKS[recipe.task].classes \
                else [float(v) for v in ds[cols.label]]
            splits[split] = Split(list(ds[cols.text]), list(ds[cols.text_pair]) if cols.text_pair else None, gold)
    return splits


class Pool:
    """Candidate members with their outputs on each split, computed once; every combination is then
    scored in memory (greedy selection tries many)."""

    def __init__(self, members: list[Member], recipe: RecipeConfig, batch_size: int = 64,
                 deadline: float | None = None):
        """Score every member on validation and test, in the order given. With ``deadline`` (a
        ``time.monotonic()``), a member whose scoring would end past it, judged by the slowest member so far,
        is left out with the rest (``self.left_out``); the first member is always scored."""
        from finetune.metrics import MetricSuite

        self.recipe = recipe
        self.labels = shared_labels(members)
        self.task = TASKS[members[0].run.recipe.task]
        self.primary = recipe.eval.primary
        names = [m for m in recipe.eval.metrics if not self.task.classes or m != "accuracy"]
        self.suite = MetricSuite((["accuracy"] if self.task.classes else []) + names)
        self.splits = load_eval_data(recipe, self.labels)
        log.info("scoring %d members on %s", len(members),
                 ", ".join(f"{split} ({len(data.texts)} rows)" for split, data in self.splits.items()))
        by_path: dict[Path, dict[str, torch.Tensor]] = {}  # a member listed twice is computed once
        slowest, self.left_out = 0.0, []
        for i, member in enumerate(members):
            key = member.path.resolve()
            if key in by_path:
                continue
            if deadline is not None and i > 0 and time.monotonic() + slowest > deadline:
                self.left_out = [m.name for m in members[i:] if m.path.resolve() not in by_path]
                log.warning("%d of %d members left out: scoring them would pass the deadline", len(self.left_out),
                            len(members))
                break
            started = time.monotonic()
            by_path[key] = {split: member_outputs(member, data.texts, data.pairs, self.labels, batch_size,
                                                  f"{member.name} {split}") for split, data in self.splits.items()}
            slowest = max(slowest, time.monotonic() - started)
        self.members = [m for m in members if m.path.resolve() in by_path]
        self.outputs: dict[str, torch.Tensor] = {
            split: torch.stack([by_path[m.path.resolve()][split] for m in self.members]) for split in self.splits}

    def scores(self, weights: torch.Tensor, method: str, split: str) -> dict[str, float]:
        """Metrics of the combination on one split, plus ``loss`` (cross-entropy of the averaged
        probabilities, or mean squared error; not defined for a vote)."""
        outputs, gold = self.outputs[split], self.splits[split].gold
        if not self.task.classes:  # regression: the mean score and its squared error
            predicted = average(outputs, weights)
            target = torch.tensor(gold)
            return {"loss": float(((predicted - target) ** 2).mean()),
                    **self.suite.compute(predictions=predicted.tolist(), references=gold)}
        metrics = self.suite.compute(predictions=predict_ids(outputs, weights, method).tolist(), references=gold)
        if method != "vote":
            probs = average(outputs, weights)[torch.arange(len(gold)), torch.tensor(gold)]
            metrics["loss"] = float(-probs.clamp_min(1e-12).log().mean())
        return metrics

    def one_hot(self, index: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(index), len(self.members)).double()

    def member_scores(self, split: str) -> list[dict[str, float]]:
        return [self.scores(self.one_hot(i), "mean", split) for i in range(len(self.members))]

    def key(self, metrics: dict[str, float]) -> tuple[float, float]:
        """Sort key, larger is better: the primary metric, then the lower loss."""
        from finetune.metrics import greater_is_better

        if self.primary not in metrics:
            raise RecipeError(f"eval.primary={self.primary!r} is not defined for --combine vote; "
                              "pass eval.primary=accuracy (or another score)")
        sign = 1.0 if greater_is_better(self.primary) else -1.0
        return sign * metrics[self.primary], -metrics.get("loss", 0.0)

    def validation_weights(self) -> torch.Tensor:
        """w_m = s_m / sum_j s_j over validation eval.primary (1 / s_m when lower is better).

        Raises:
            RecipeError: a member's score is not positive (such weights would mean nothing).
        """
        from finetune.metrics import greater_is_better

        lower = not greater_is_better(self.primary)
        values = [metrics[self.primary] for metrics in self.member_scores("validation")]
        bad = [(m.name, v) for m, v in zip(self.members, values) if not v > 0]
        if bad:
            raise RecipeError(f"--combine weighted needs a positive validation {self.primary} for every member; "
                              f"{bad[0][0]} has {bad[0][1]:.4f}; use --combine mean")
        scores = torch.tensor([1.0 / v if lower else v for v in values], dtype=torch.float64)
        return scores / scores.sum()

    def greedy(self, method: str, steps: int) -> tuple[torch.Tensor, list[dict]]:
        """Forward selection with replacement (see the package docstring); returns the weights of the best
        bag (times chosen / bag size) and one record per pick."""
        counts = torch.zeros(len(self.members), dtype=torch.float64)
        best, best_key, trace = None, None, []
        for step in range(1, steps + 1):
            tried = []
            for i in range(len(self.members)):
                bag = counts + self.one_hot(i)
                metrics = self.scores(bag / bag.sum(), method, "validation")
                tried.append((self.key(metrics), -i, metrics))
            key, negative_index, metrics = max(tried, key=lambda t: (t[0], t[1]))
            counts += self.one_hot(-negative_index)
            trace.append({"step": step, "added": self.members[-negative_index].name, "validation": metrics})
            log.info("greedy step %d: + %s -> validation %s %.4f", step, self.members[-negative_index].name,
                     self.primary, metrics.get(self.primary, float("nan")))
            if best_key is None or key > best_key:  # strictly better: on a tie the smaller bag stays
                best, best_key = counts.clone(), key
        return best / best.sum(), trace

    def report(self, weights: torch.Tensor, method: str, selection: list[dict] | None = None) -> dict:
        """Each member and the ensemble on every split."""
        members = [{"name": m.name, "path": str(m.path), "weight": round(float(w), 6)} for m, w in
                   zip(self.members, weights)]
        ensemble = {}
        for split in self.outputs:
            for row, metrics in zip(members, self.member_scores(split)):
                row[split] = metrics
            ensemble[split] = self.scores(weights, method, split)
        return {"combine": method, "greedy": selection is not None, "primary": self.primary,
                "rows": {split: len(data.gold) for split, data in self.splits.items()},
                "members": members, "ensemble": ensemble, "selection": selection}


def markdown(report: dict) -> str:
    """The report as one table: a row per member, then the ensemble."""
    splits = list(report["rows"])
    names = list(dict.fromkeys(k for split in splits for k in report["ensemble"][split]))
    names += [k for k in report["members"][0].get(splits[0], {}) if k not in names]
    header = "| model | weight | " + " | ".join(f"{s} {n}" for s in splits for n in names) + " |"
    lines = [header, "|---" * (2 + len(splits) * len(names)) + "|"]

    def cells(row: dict) -> str:
        return " | ".join(f"{row[s][n]:.4f}" if n in row.get(s, {}) else "" for s in splits for n in names)

    for member in report["members"]:
        lines.append(f"| {member['name']} | {member['weight']:.3f} | {cells(member)} |")
    method = report["combine"] + (" (greedy)" if report["greedy"] else "")
    lines.append(f"| **ensemble: {method}** | 1.000 | {cells(report['ensemble'])} |")
    rows = ", ".join(f"{n} {s}" for s, n in report["rows"].items())
    return "\n".join(lines) + f"\n\nRows: {rows}. Validation chose the members (and the greedy bag): its scores " \
                              "are optimistic; compare on test.\n"
