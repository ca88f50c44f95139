"""The sweep section: what to search, how, for how long, and what to keep.

A sweep is a recipe plus a ``sweep:`` section, either in the recipe file itself or in a sweep
file that names its base recipe::

    base: sst2_minilm_lora          # a shipped recipe name, or a path relative to this file
    data: {max_train_samples: 8000} # optional recipe sections, merged over the base
    sweep:
      method: bayes
      n_trials: 12
      parameters:
        train.lr: {loguniform: [1.0e-5, 3.0e-3]}
        train.epochs: {int: [1, 3]}
        policy.lora.rank: {choice: [4, 8, 16, 32]}
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from finetune.config import (
    RecipeConfig,
    RecipeError,
    Strict,
    known_keys,
    parse_value,
    read_recipe_file,
)
from finetune.recipe_file import Origins
from finetune.schema import error_key, error_problem
from finetune.sweep.space import ParamSpec, covered_keys, grid_points

Method = Literal["grid", "random", "bayes", "gp"]
ARCHITECTURE_KEYS = ("backbone.", "head.", "prune.")  # recipe keys that can change what a trial's model computes


class Objective(Strict):
    metric: str | None = None
    """Validation metric to optimise (default: the recipe's eval.primary). A trial's value is its best evaluation."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: maximize for scores, minimize for loss."""


class PrunerConfig(Strict):
    kind: Literal["none", "median", "hyperband"] = "none"
    """Stop unpromising trials early, judged at each validation: median rule, or Hyperband (ASHA brackets)."""
    compare: Literal["budget", "steps"] = "budget"
    """median: compare trials at the same share of their own training budget (each reports its validations at
    per-mille of its optimizer steps), or at the same optimizer step. With train.epochs or train.max_steps in the
    space, equal steps favour short schedules: a 3-epoch trial is still warming up where a 1-epoch one ends."""
    warmup_steps: int = Field(default=0, ge=0)
    """median: never prune a trial before this optimizer step."""
    startup_trials: int = Field(default=2, ge=0)
    """median: never prune before this many trials have finished."""
    min_resource: int | None = Field(default=None, gt=0)
    """hyperband: optimizer steps before the first cut (default: the first evaluation's step)."""
    max_resource: int | None = Field(default=None, gt=0)
    """hyperband: optimizer steps of the longest trial (default: learned from the first finished trial,
    whose own evaluations are then not compared)."""
    reduction_factor: int = Field(default=3, ge=2)
    """hyperband: keep 1 in this many trials at each rung."""


SEARCHED_LENGTH = ("train.epochs", "train.max_steps")  # a space that sets these has no one full schedule


class SweepConfig(Strict):
    method: Method = "bayes"
    """grid (every combination), random, bayes (multivariate TPE) or gp (Gaussian process)."""
    preset: Literal["auto"] | None = None
    """auto: the search is chosen for you (see finetune.sweep.preset): TPE with successive halving (Hyperband)
    over the policy (full / LoRA / frozen lower layers), a learning-rate range per policy, label smoothing and
    the schedule, on the recipe's epochs; then a greedy ensemble of the kept trials. Needs a budget. Parameters
    given beside it replace the preset's ones of the same name."""
    parameters: dict[str, ParamSpec | list[Any]] = Field(default_factory=dict)
    """Dotted recipe key -> distribution; a plain list means choice."""
    objective: Objective = Objective()
    n_trials: int | None = Field(default=None, gt=0)
    """Trials in the whole study (re-running does not add more). Default: the grid size, or 20."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds after which this worker starts no new trial."""
    budget: float | None = Field(default=None, gt=0)
    """Wall-clock seconds for the whole search (or "90m", "2h"), counted over every run of this sweep folder: a
    resumed sweep has what is left. A running trial stops training when it runs out (its best evaluation so
    far is its result), and no trial starts with less left than the shortest trial so far took (see
    fill_budget). With preset auto it covers the ensemble too (the search gets 90 %)."""
    fill_budget: bool | None = None
    """With a budget: when less is left than the shortest whole trial took, give it to a trial on a schedule
    shortened (train.max_steps) to end in time, if that is at least a third of the full schedule, rather than
    leave the time idle or start a whole schedule the deadline would cut. Its value comes from fewer steps than the others' (the report says so); it may join an ensemble
    or, if validation says so, be the best. Default: on with preset auto, else off. Not with grid (each point is
    trained as written) or a space that sets train.epochs or train.max_steps."""
    seed: int = 0
    """Seed of the sampler: the same seed proposes the same settings."""
    startup_trials: int | None = Field(default=None, ge=0)
    """bayes/gp: random trials before the model guides (default: a quarter of n_trials, 1 to 10)."""
    repeats: int = Field(default=1, gt=0)
    """Train each setting with this many seeds (train.seed, +1, ...); the value is their mean."""
    pruner: PrunerConfig = PrunerConfig()
    dir: str | None = None
    """Sweep folder (default: the recipe's output.dir, else sweeps/<recipe name> under $FINETUNE_HOME or the current
    folder). Re-running with the same folder resumes."""
    storage: str | None = None
    """Optuna storage URL (postgresql://..., sqlite:///...) or a journal file; default: a journal file in dir."""
    study: str | None = None
    """Study name (default: the recipe name); workers with the same storage and study share the trials."""
    keep_top_k: int | None = Field(default=3, ge=1)
    """Keep the models of the best k trials (null keeps all); others keep their metrics and logs."""
    measure_cost: bool | None = None
    """Measure each completed trial's model: parameters and CPU inference latency (batch 32, LoRA merged),
    for the report's accuracy-vs-latency and accuracy-vs-size Pareto plot (a few seconds per trial). Default:
    only when the space changes the model's architecture (a backbone.*, head.* or prune.* key); between
    models of one architecture, latency differences are timing noise."""
    test: Literal["kept", "all", "none"] = "kept"
    """Which trials are scored on the recipe's test split: kept (the models keep_top_k keeps, when they are
    kept), all (every trial, inside its run), none. Trials are chosen on validation; test is the record of
    what was kept, and scoring every trial on it invites choosing on test (and costs time)."""
    heartbeat_seconds: float = Field(default=20.0, gt=0)
    """A running trial records a heartbeat this often; one silent for 3 beats is taken as dead and re-run."""
    warm_start: str | None = None
    """Start from an earlier sweep: its folder, or a storage URL / journal file. When the study is created, the
    earlier best settings are tried first and its finished trials inform the sampler, where the spaces agree.
    Same objective needed."""
    warm_start_study: str | None = None
    """The earlier study's name (default: the one its sweep folder records, else this sweep's study name)."""
    warm_start_top: int = Field(default=1, ge=0)
    """How many of the earlier best settings to try first (0: they only inform the sampler)."""

    @field_validator("warm_start")
    @classmethod
    def _warm_source_exists(cls, value: str | None) -> str | None:
        """A local source is kept as an absolute path: sweep.yaml then resumes from any folder."""
        if value is None:
            return None
        kind, where = warm_source(value)
        return where if kind == "url" else str(Path(where).resolve())

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, value):
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("parameters", mode="before")
    @classmethod
    def _lists_are_choices(cls, value):
        if isinstance(value, dict):
            return {k: {"choice": v} if isinstance(v, list) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check_space(self) -> SweepConfig:
        for key in ("warm_start_study", "warm_start_top"):
            if key in self.model_fields_set and self.warm_start is None:
                raise ValueError(f"{key} is set without warm_start (the earlier sweep folder or storage to start from)")
        if self.preset == "auto" and self.budget is None:
            raise ValueError("preset auto needs a budget: sweep.budget=2h (or seconds), or finetune auto --budget 2h")
        if not self.parameters and self.preset is None:
            raise ValueError("parameters: give at least one recipe key to search (or preset: auto)")
        if self.fill_budget:
            lengths = sorted(set(SEARCHED_LENGTH) & covered_keys(self.parameters))
            why = ("it needs a budget (sweep.budget)" if self.budget is None else
                   "grid search trains each point as written" if self.method == "grid" else
                   f"the space sets {lengths[0]}, so no one schedule is the full one" if lengths else None)
            if why:
                raise ValueError(f"fill_budget: {why}; remove fill_budget (or set it false)")
        recipe_keys = set(known_keys())
        seen: list[str] = []
        for key, spec in self.parameters.items():
            if spec.paired:
                for choice in spec.choice:
                    bad = [k for k in choice if k not in recipe_keys]
                    if bad:
                        raise ValueError(f"parameters.{key}: unknown recipe key {bad[0]!r} in a paired choice")
            elif spec.sets(key) not in recipe_keys or spec.sets(key).startswith(("sweep.", "output.")):
                named = f"{key!r}" if spec.key is None else f"{key}.key={spec.key!r}"
                raise ValueError(f"parameters: {named} is not a recipe key that can be searched")
            for cond in (spec.when or {}):
                if cond not in seen:
                    raise ValueError(f"parameters.{key}.when: {cond!r} must be a parameter listed before {key!r}")
            seen.append(key)
            if self.method == "grid" and spec.kind in ("uniform", "loguniform"):
                raise ValueError(f"parameters.{key}: grid search needs a list of values, not a continuous "
                                 f"{spec.kind} range; give choice: [...] or use method random/bayes/gp")
        setters: dict[str, list[str]] = {}
        for key, spec in self.parameters.items():
            if not spec.paired:
                setters.setdefault(spec.sets(key), []).append(key)
        for target, names in setters.items():
            if len(names) > 1 and any(not self.parameters[n].when for n in names):
                raise ValueError(f"parameters {names} all set {target}: give each a 'when' condition, so one "
                                 "trial samples only one of them")
        if self.method == "grid" and self.n_trials is not None:
            size = len(grid_points(self.parameters))
            if self.n_trials > size:
                raise ValueError(f"n_trials={self.n_trials} exceeds the grid's {size} combinations")
        return self

    def measures_cost(self) -> bool:
        """measure_cost as set, else whether some searched key can change the model's architecture."""
        if self.measure_cost is not None:
            return self.measure_cost
        keys = [k for key, spec in self.parameters.items()
                for k in ({k for choice in spec.choice for k in choice} if spec.paired else {spec.sets(key)})]
        return any(k.startswith(ARCHITECTURE_KEYS) for k in keys)

    def trials_total(self) -> int:
        if self.n_trials is not None:
            return self.n_trials
        if self.method == "grid":
            return len(grid_points(self.parameters))
        return 20

    def guided_after(self) -> int:
        """bayes/gp: how many finished trials the sampler waits for before it models the results."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(1, min(10, self.trials_total() // 4))


def parse_duration(text: str) -> float:
    """Seconds from "7200", "7200s", "90m", "2h" or "1.5h".

    Raises:
        ValueError: anything else (pydantic reports it under the key).
    """
    units = {"s": 1, "m": 60, "h": 3600}
    cleaned = text.strip().lower()
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units else (cleaned, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError("expected seconds or a duration such as 90m or 2h") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError("expected a positive duration")
    return seconds


WarmSource = tuple[Literal["folder", "journal", "url"], Path | str]


def warm_source(text: str) -> WarmSource:
    """What ``sweep.warm_start`` names: ("folder", the sweep folder), ("journal", the file) or ("url", the URL).

    Raises:
        ValueError: it names none of these.
    """
    expected = ("expected a sweep folder (holding sweep.yaml), an Optuna journal file (such as a sweep folder's "
                "study.journal), or a storage URL (sqlite:///..., postgresql://...)")
    if "://" in text:
        if text.startswith("sqlite:///") and not Path(text[len("sqlite:///"):]).is_file():
            raise ValueError(f"{text!r}: that database file does not exist; {expected}")
        return "url", text
    path = Path(text).expanduser()
    if path.name == "sweep.yaml" and path.is_file():
        path = path.parent
    if path.is_dir():
        if not (path / "sweep.yaml").is_file():
            raise ValueError(f"{text!r} is a folder without sweep.yaml, not a sweep folder; {expected}")
        return "folder", path
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.readline(65536)
        if head.strip() and b'"op_code"' not in head:  # each line of a journal is one JSON operation
            raise ValueError(f"{text!r} is neither a sweep folder nor an Optuna journal file; {expected}")
        return "journal", path
    raise ValueError(f"{text!r} does not exist; {expected} (a sweep already warm-started resumes without it: "
                     "drop sweep.warm_start)")


def load_sweep_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RecipeConfig, SweepConfig]:
    """Read a recipe file with a ``sweep:`` section (it may extend a ``base:`` recipe).

    Overrides starting with ``sweep.`` set the sweep section; the others the recipe.

    Raises:
        RecipeError: missing file or section, invalid recipe, invalid sweep.
    """
    origins = Origins()  # where each key was set, for errors naming file and line
    raw = read_recipe_file(path, origins=origins)
    if "sweep" not in raw:
        raise RecipeError(f"{path}: has no 'sweep:' section to run")
    sweep_raw = raw.pop("sweep")
    recipe_overrides = [o for o in overrides if not o.strip().startswith("sweep.")]
    sweep_overrides = [o.strip()[len("sweep."):] for o in overrides if o.strip().startswith("sweep.")]
    recipe = RecipeConfig.from_dict(raw, recipe_overrides, origins)
    return recipe, parse_sweep(sweep_raw, sweep_overrides)


def parse_sweep(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Validate a sweep section (after ``key=value`` overrides such as ``n_trials=3``)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"sweep: expected a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            raise RecipeError(f"override sweep.{text!r} must look like sweep.key=value")
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override sweep.{key}: '{part}' is not a section")
        node[leaf] = parse_value(f"sweep.{key.strip()}", value)
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_describe_sweep(err)) from None


def _describe_sweep(err: ValidationError) -> str:
    """Like the recipe's errors: the dotted key as the user wrote it, and the closest sweep key for a typo."""
    keys = known_keys(SweepConfig)
    lines = []
    errors = err.errors()
    spec_branch = {tuple(e["loc"][:2]): e for e in errors if any("ParamSpec" in str(p) for p in e["loc"])}
    for item in errors:
        where = tuple(item["loc"][:2])
        if "list[any]" in map(str, item["loc"]) and where in spec_branch:
            continue  # a parameter is a spec or a plain list: the spec's error says what is wrong
        if item is spec_branch.get(where) and item["type"] in ("model_type", "dict_type"):
            lines.append(f"sweep.{where[0]}.{where[1]}: expected a mapping with one of choice, uniform, loguniform, "
                         f"int, or a list of values (got {item.get('input')!r})")
            continue
        key = error_key(item)
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            lines.append(f"unknown sweep key 'sweep.{key}'" + (f" (did you mean 'sweep.{close[0]}'?)" if close else ""))
        else:
            lines.append(f"sweep{'.' + key if key else ''}: {error_problem(item)}")
    return "; ".join(dict.fromkeys(lines))
