"""Ensembles of finished runs: ``finetune ensemble --from-sweep SWEEP_DIR --top-k 3`` or ``--models A B C``.

    ENSEMBLE_DIR/
      ensemble.json          members (paths relative to this folder, and absolute), weights, combine method,
                             labels, the recipe whose data section describes the inputs, config, report
      ensemble_report.json   each member and the ensemble on validation and test
      ensemble_report.md     the same, as a table

Members are not copied unless ``--copy-members`` (hard links where possible): the artefact points at
their run folders. Each member tokenises the inputs itself (its own tokenizer and max_length), so
members with different backbones combine; their label sets must match (columns are matched by name).

Combination, with p_m member m's probabilities and weights w_m summing to 1:
  mean      sum_m w_m p_m, w_m = 1/M (with --greedy: times chosen / number of picks)
  weighted  the same sum with w_m = s_m / sum_j s_j, s_m the member's validation score on the recipe's
            eval.primary (1/s_m when lower is better, e.g. loss)
  vote      each member gives weight w_m to its argmax label; a tie goes to the tied label with the
            largest sum_m w_m p_m, then to the lowest label id. ``predict`` reports sum_m w_m p_m as the
            probabilities and the vote shares under ``votes``.
Regression averages the scores (mean or weighted); voting does not apply.

Greedy selection (Caruana et al. 2004, "Ensemble selection from libraries of models"): start empty,
add the member (with replacement) that gives the best validation eval.primary, ties to the lower
validation loss, then the lower member index; after ``--top-k`` picks keep the best bag seen. The
validation split chose the sweep's trials and the greedy bag, so the ensemble's validation scores are
optimistic; test is the honest comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from finetune.config import Recipe, RecipeError
from finetune.predict import LoadedRun, load_run

log = logging.getLogger("finetune.ensemble")
METHODS = ("mean", "weighted", "vote")
ARTEFACT = "ensemble.json"


# --- members ------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    path: Path
    run: LoadedRun


def has_model(run_dir: Path) -> bool:
    """A run folder whose model files are still there (a sweep removes those outside keep_top_k)."""
    return ((run_dir / "label_map.json").is_file() and not (run_dir / "MODEL_REMOVED.txt").exists()
            and ((run_dir / "model.safetensors").is_file() or (run_dir / "adapter_model.safetensors").is_file()))


def load_members(paths: list[Path], names: list[str] | None = None, flag: str = "--models") -> list[Member]:
    """Load each run once (a path listed twice shares its model), LoRA adapters merged for speed.

    Raises:
        RecipeError: a path is missing, is not a run folder, or its model was removed.
    """
    names = names or _unique_names(paths)
    loaded: dict[Path, LoadedRun] = {}
    members = []
    for name, path in zip(names, paths):
        path = Path(path)
        if not path.is_dir():
            raise RecipeError(f"{flag}: member {path} does not exist")
        if (path / "MODEL_REMOVED.txt").exists():
            raise RecipeError(f"{flag}: member {path} has no model: {(path / 'MODEL_REMOVED.txt').read_text().strip()}")
        if not has_model(path):
            raise RecipeError(f"{flag}: {path} is not a finished run folder (no label_map.json and model files)")
        key = path.resolve()
        if key not in loaded:
            log.info("loading %s (%s)", name, path)
            loaded[key] = _merged(load_run(path))
        if loaded[key].recipe.task == "token_classification":
            raise RecipeError(f"{flag}: {path} is a token_classification run; ensembles combine classification "
                              "and regression runs only")
        members.append(Member(name, path, loaded[key]))
    return members


def _merged(run: LoadedRun) -> LoadedRun:
    """Fold LoRA adapters into the weights: the same function, fewer matrix products per layer."""
    from peft import PeftModel

    if isinstance(run.model, PeftModel):
        run.model = run.model.merge_and_unload().eval()
    return run


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = Path(path).name or str(path)
        names.append(name if name not in names else f"{name}#{names.count(name) + 1}")
    return names


def shared_labels(members: list[Member]) -> list[str] | None:
    """The first member's labels; every other member must have the same task and label set.

    Raises:
        RecipeError: tasks or label sets differ (the message names the member and both sets).
    """
    first = members[0].run
    for member in members[1:]:
        run = member.run
        if run.recipe.task != first.recipe.task:
            raise RecipeError(f"members differ in task: {members[0].name} is {first.recipe.task}, "
                              f"{member.name} is {run.recipe.task}")
        if set(run.labels or []) != set(first.labels or []):
            raise RecipeError(f"members have different label sets: {members[0].name} has {first.labels}, "
                              f"{member.name} has {run.labels}; an ensemble needs the same labels in every member")
    return first.labels


@torch.inference_mode()
def member_outputs(member: Member, texts: list, pairs: list | None, labels: list[str] | None,
                   batch_size: int = 64, desc: str = "") -> torch.Tensor:
    """Probabilities (N, C) with columns in ``labels`` order, or scores (N,) for regression, rows in input
    order. Inputs are batched by length (little padding); each member uses its own tokenizer and max_length."""
    run, n = member.run, len(texts)
    max_length = run.recipe.data.max_length
    lengths = [len(ids) for ids in run.tokenizer(list(texts), list(pairs) if pairs else None, truncation=True,
                                                 max_length=max_length)["input_ids"]]
    order = sorted(range(n), key=lengths.__getitem__)
    columns = [run.labels.index(label) for label in labels] if labels else None
    out = torch.empty((n, len(labels)) if labels else (n,))
    for start in tqdm(range(0, n, batch_size), desc=desc or member.name, leave=False):
        rows = order[start:start + batch_size]
        enc = run.tokenizer([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None, truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
        logits = run.model(**enc).logits.float()
        out[rows] = logits.softmax(-1)[:, columns] if columns else logits[:, 0]
    return out


# --- combination (pure functions of the members' outputs) ---------------------------------


def average(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over members: (M, N, C) probabilities or (M, N) scores -> (N, C) or (N,)."""
    return torch.tensordot(weights.to(outputs.dtype), outputs, dims=1)


def vote_shares(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, C): the summed weight of the members whose argmax is each label (float64, so equal shares
    summed in another order still compare equal)."""
    picks = torch.nn.functional.one_hot(outputs.argmax(-1), outputs.shape[-1]).double()  # (M, N, C)
    return average(picks, weights.double())


def vote(outputs: torch.Tensor, weights: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """Majority (weighted) vote, (N,) label ids. Ties go to the tied label with the largest summed
    probability, then to the lowest label id, so the result never depends on member order."""
    shares, mean = vote_shares(outputs, weights), average(outputs.double(), weights.double())
    tied = shares >= shares.max(-1, keepdim=True).values - tolerance
    mean = torch.where(tied, mean, torch.full_like(mean, -1.0))
    best = mean >= mean.max(-1, keepdim=True).values - tolerance
    return best.to(torch.int8).argmax(-1)  # argmax returns the first (lowest) id among equal maxima


def predict_ids(outputs: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    return vote(outputs, weights) if method == "vote" else average(outputs, weights).argmax(-1)


# --- evaluation data and scoring ------------------------------------------------------------


@dataclass
class Split:
    texts: list
    pairs: list | None
    gold: list  # label ids, or floats for regression


def load_eval_data(recipe: Recipe, labels: list[str] | None) -> dict[str, Split]:
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
            gold = [labels.index(data_lib.label_text(v)) for v in ds[cols.label]] if labels else [float(v) for v in ds[cols.label]]
            splits[split] = Split(list(ds[cols.text]), list(ds[cols.text_pair]) if cols.text_pair else None, gold)
    return splits


class Pool:
    """Candidate members with their outputs on each split, computed once; every combination is then
    scored in memory (greedy selection tries many)."""

    def __init__(self, members: list[Member], recipe: Recipe, batch_size: int = 64):
        from finetune.metrics import MetricSuite

        self.members, self.recipe = members, recipe
        self.labels = shared_labels(members)
        self.task = members[0].run.recipe.task
        self.primary = recipe.eval.primary
        names = [m for m in recipe.eval.metrics if self.task != "classification" or m != "accuracy"]
        self.suite = MetricSuite((["accuracy"] if self.task == "classification" else []) + names)
        self.splits = load_eval_data(recipe, self.labels)
        self.outputs: dict[str, torch.Tensor] = {}
        for split, data in self.splits.items():
            log.info("%s: %d rows, %d members", split, len(data.texts), len(members))
            by_path: dict[Path, torch.Tensor] = {}  # a member listed twice is computed once
            for member in members:
                key = member.path.resolve()
                if key not in by_path:
                    by_path[key] = member_outputs(member, data.texts, data.pairs, self.labels, batch_size,
                                                  f"{member.name} {split}")
            self.outputs[split] = torch.stack([by_path[m.path.resolve()] for m in members])

    def scores(self, weights: torch.Tensor, method: str, split: str) -> dict[str, float]:
        """Metrics of the combination on one split, plus ``loss`` (cross-entropy of the averaged
        probabilities, or mean squared error; not defined for a vote)."""
        outputs, gold = self.outputs[split], self.splits[split].gold
        if self.task == "regression":
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
        sign = 1.0 if self.primary != "loss" and greater_is_better(self.primary) else -1.0
        return sign * metrics[self.primary], -metrics.get("loss", 0.0)

    def validation_weights(self) -> torch.Tensor:
        """w_m = s_m / sum_j s_j over validation eval.primary (1 / s_m when lower is better).

        Raises:
            RecipeError: a member's score is not positive (such weights would mean nothing).
        """
        from finetune.metrics import greater_is_better

        lower = self.primary == "loss" or not greater_is_better(self.primary)
        values = [metrics[self.primary] for metrics in self.member_scores("validation")]
        bad = [(m.name, v) for m, v in zip(self.members, values) if not v > 0]
        if bad:
            raise RecipeError(f"--combine weighted needs a positive validation {self.primary} for every member; "
                              f"{bad[0][0]} has {bad[0][1]:.4f}; use --combine mean")
        scores = torch.tensor([1.0 / v if lower else v for v in values], dtype=torch.float64)
        return scores / scores.sum()

    def greedy(self, method: str, steps: int) -> tuple[torch.Tensor, list[dict]]:
        """Forward selection with replacement (see the module docstring); returns the weights of the best
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


# --- the artefact -------------------------------------------------------------------------


class Ensemble:
    """A saved ensemble: ``Ensemble.load(DIR).predict(texts)`` returns what ``finetune.predict.predict``
    returns for one run (``label`` and ``probabilities``, or ``score``; plus ``votes`` for a vote)."""

    def __init__(self, members: list[Member], weights: list[float], method: str, recipe: Recipe,
                 report: dict | None = None, config: dict | None = None):
        if not members:
            raise RecipeError("an ensemble needs at least one member")
        if method not in METHODS:
            raise RecipeError(f"--combine: expected one of {', '.join(METHODS)}, got {method!r}")
        self.members, self.weights, self.method, self.recipe = members, weights, method, recipe
        self.labels = shared_labels(members)
        if method == "vote" and self.labels is None:
            raise RecipeError("--combine vote does not apply to regression; use mean or weighted")
        self.report, self.config = report, config or {}

    @torch.inference_mode()
    def predict(self, texts: list, pairs: list | None = None, batch_size: int = 64) -> list[dict]:
        """One dict per input, like ``finetune.predict.predict``."""
        texts = list(texts)
        outputs = torch.stack([member_outputs(m, texts, pairs, self.labels, batch_size) for m in self.members])
        weights = torch.tensor(self.weights, dtype=torch.float64)
        if self.labels is None:
            return [{"score": float(s)} for s in average(outputs, weights)]
        mean, ids = average(outputs, weights), predict_ids(outputs, weights, self.method)
        shares = vote_shares(outputs, weights) if self.method == "vote" else None
        results = []
        for i in range(len(texts)):
            result = {"label": self.labels[int(ids[i])],
                      "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, mean[i])}}
            if shares is not None:
                result["votes"] = {name: round(float(v), 6) for name, v in zip(self.labels, shares[i])}
            results.append(result)
        return results

    def save(self, folder: Path) -> Path:
        """Write ensemble.json atomically; members are referenced, not copied."""
        from finetune.runs import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        members = [{"name": m.name, "path": os.path.relpath(m.path.resolve(), folder.resolve()),
                    "absolute_path": str(m.path.resolve()), "weight": w} for m, w in zip(self.members, self.weights)]
        artefact = {"format": "finetune-ensemble/1", "combine": self.method, "labels": self.labels,
                    "task": self.recipe.task, "members": members, "config": self.config,
                    "recipe": self.recipe.to_dict(), "report": self.report}
        atomic_write_text(folder / ARTEFACT, json.dumps(artefact, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Ensemble:
        """Load a saved ensemble and its members (each by its relative path, else its absolute one).

        Raises:
            RecipeError: not an ensemble folder, a member missing or without its model, or members whose
                label sets differ.
        """
        folder = Path(folder)
        if not is_ensemble(folder):
            raise RecipeError(f"--model: {folder} holds no {ARTEFACT}")
        raw = json.loads((folder / ARTEFACT).read_text())
        paths = []
        for entry in raw["members"]:
            candidates = [folder / entry["path"], Path(entry["absolute_path"])]
            found = next((p for p in candidates if p.is_dir()), None)
            if found is None:
                raise RecipeError(f"ensemble {folder}: member {entry['name']} is missing (looked in "
                                  f"{candidates[0]} and {candidates[1]}); members are referenced, not copied")
            paths.append(found)
        members = load_members(paths, [e["name"] for e in raw["members"]], flag=f"ensemble {folder}")
        ensemble = cls(members, [e["weight"] for e in raw["members"]], raw["combine"],
                       Recipe.from_dict(raw["recipe"]), raw.get("report"), raw.get("config"))
        if raw.get("labels") and set(raw["labels"]) != set(ensemble.labels or []):
            raise RecipeError(f"ensemble {folder}: its members now have labels {ensemble.labels}, "
                              f"not the saved {raw['labels']}")
        return ensemble


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ARTEFACT).is_file()


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
    maximize = objective.get("direction", "maximize" if metric != "loss" and greater_is_better(metric)
                             else "minimize") == "maximize"
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
    parser.add_argument("--output", help="ensemble folder (default: ensembles/<name>-<timestamp>)")
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
    output = Path(args.output or Path("ensembles") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from finetune.runs import check_output_folder

    check_output_folder(output, "--output")
    _check_output(output, args.overwrite)  # before the slow part; the old ensemble goes only once the new one is ready
    members = load_members(paths, names, "--from-sweep" if args.from_sweep else "--models")
    recipe = members[0].run.recipe.with_overrides(overrides)
    if args.combine == "vote" and recipe.task == "regression":
        raise RecipeError("--combine vote does not apply to regression runs; use mean or weighted")
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
            shutil.copytree(member.path, copies[key], copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("checkpoints", ".*"))
        result.append(Member(member.name, copies[key], member.run))
    return result


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def setup_logging() -> None:
    """INFO lines on stderr, once (a fresh handler per command: a notebook or test may swap stderr)."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [ensemble] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False  # the "finetune" logger prints training lines; these would appear twice
