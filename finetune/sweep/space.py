"""The search space: sampling a trial's settings, enumerating a grid, and turning settings into
the dotted ``key=value`` overrides a user would type (they go through the recipe's own parser)."""

from __future__ import annotations

import builtins
import json
from typing import Any

import optuna
import yaml
from pydantic import Field, model_validator

from finetune.config import Strict

PAIR_SEPARATOR = "; "  # between the overrides of a paired choice (values may hold commas)


class ParamSpec(Strict):
    """One searched dimension: exactly one of choice, uniform, loguniform or int."""

    choice: list[Any] | None = Field(default=None, min_length=1)
    """Values to pick from. Mappings of dotted keys set several recipe keys together (paired settings)."""
    uniform: tuple[float, float] | None = None
    """Float range [lo, hi]."""
    loguniform: tuple[float, float] | None = None
    """Float range [lo, hi] sampled on a log scale (learning rates)."""
    int: tuple[builtins.int, builtins.int] | None = None
    """Integer range [lo, hi], both ends included."""
    step: float | None = Field(default=None, gt=0)
    """Spacing of uniform / int values."""
    log: bool = False
    """int ranges: sample on a log scale."""
    when: dict[str, Any] | None = None
    """Only sample this parameter when earlier parameters have these values (a value or a list of values)."""

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        kinds = [k for k in ("choice", "uniform", "loguniform", "int") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, int; got {kinds or 'none'}")
        bounds = self.uniform or self.loguniform or self.int
        if bounds is not None and bounds[0] > bounds[1]:
            raise ValueError(f"range {list(bounds)} has lo > hi")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0; got {list(self.loguniform)}")
        if self.log and self.int is None:
            raise ValueError("log applies to int ranges; use loguniform for floats")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "int") if getattr(self, k) is not None)

    @property
    def paired(self) -> bool:
        """Each choice is a mapping of recipe keys set together."""
        return self.choice is not None and all(isinstance(v, dict) for v in self.choice)



def _choice_label(value: Any) -> Any:
    """Optuna stores str/int/float/bool/None choices; a paired choice is stored as its overrides."""
    if isinstance(value, dict):
        return PAIR_SEPARATOR.join(format_override(k, v) for k, v in value.items())
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _active(spec: ParamSpec, chosen: dict[str, Any]) -> bool:
    for key, wanted in (spec.when or {}).items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if key not in chosen or chosen[key] not in [_choice_label(o) for o in options]:
            return False
    return True


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.kind == "choice":
        return optuna.distributions.CategoricalDistribution([_choice_label(v) for v in spec.choice])
    if spec.kind == "int":
        return optuna.distributions.IntDistribution(*spec.int, log=spec.log, step=int(spec.step or 1))
    if spec.kind == "loguniform":
        return optuna.distributions.FloatDistribution(*spec.loguniform, log=True)
    return optuna.distributions.FloatDistribution(*spec.uniform, step=spec.step)


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Sample (or, for an enqueued trial, read back) every active parameter, in declaration order."""
    chosen: dict[str, Any] = {}
    for key, spec in space.items():
        if not _active(spec, chosen):
            continue
        if spec.kind == "choice":
            chosen[key] = trial.suggest_categorical(key, distribution(spec).choices)
        elif spec.kind == "int":
            chosen[key] = trial.suggest_int(key, *spec.int, step=int(spec.step or 1), log=spec.log)
        else:
            bounds = spec.loguniform or spec.uniform
            chosen[key] = trial.suggest_float(key, *bounds, step=spec.step, log=spec.kind == "loguniform")
    return chosen


def grid_points(space: dict[str, ParamSpec]) -> list[dict[str, Any]]:
    """Every combination, in declaration order; conditional parameters only where their condition holds."""
    points: list[dict[str, Any]] = [{}]
    for key, spec in space.items():
        if spec.kind == "int":
            lo, hi = spec.int
            values = list(range(lo, hi + 1, int(spec.step or 1)))
        elif spec.kind == "choice":
            values = [_choice_label(v) for v in spec.choice]
        else:
            raise ValueError(f"{key}: a {spec.kind} range has no grid")
        expanded = []
        for point in points:
            expanded.extend([{**point, key: v} for v in values] if _active(spec, point) else [point])
        points = expanded
    return points


def format_override(key: str, value: Any) -> str:
    text = value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)
    return f"{key}={text}"


def to_overrides(params: dict[str, Any], space: dict[str, ParamSpec]) -> list[str]:
    """A trial's settings as ``key=value`` strings; a paired choice expands to its keys."""
    overrides = []
    for key, value in params.items():
        spec = space[key]
        if spec.paired:
            overrides.extend(value.split(PAIR_SEPARATOR))
        elif spec.kind == "choice" and isinstance(value, str) and value.startswith("["):
            overrides.append(f"{key}={value}")  # a list-valued choice, stored as JSON
        else:
            overrides.append(format_override(key, value))
    return overrides
