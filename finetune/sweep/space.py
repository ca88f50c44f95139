"""The search space: sampling a trial's settings, enumerating a grid, turning settings into the
dotted ``key=value`` overrides a user would type (they go through the recipe's own parser), and back:
re-expressing a trial of another space in this one (warm starts, widened sweeps)."""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable
from typing import Any

import optuna
import yaml
from pydantic import Field, model_validator

from finetune.config import Strict
from finetune.schema import parse_value

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
    key: str | None = None
    """The recipe key this parameter sets (default: the parameter's name). With ``when``, one key can be searched
    in different ranges under different conditions: ``lr_lora: {loguniform: [1e-4, 2e-3], key: train.lr,
    when: {policy.kind: lora}}`` beside ``lr_full`` for full fine-tuning."""

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

    def sets(self, name: str) -> str:
        """The recipe key a parameter called ``name`` sets."""
        return self.key or name

    @property
    def paired(self) -> bool:
        """Each choice is a mapping of recipe keys set together."""
        return self.choice is not None and all(isinstance(v, dict) for v in self.choice)



def choice_label(value: Any) -> Any:
    """Optuna stores str/int/float/bool/None choices; a paired choice is stored as its overrides."""
    if isinstance(value, dict):
        return PAIR_SEPARATOR.join(format_override(k, v) for k, v in value.items())
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _active(spec: ParamSpec, chosen: dict[str, Any]) -> bool:
    for key, wanted in (spec.when or {}).items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if key not in chosen or chosen[key] not in [choice_label(o) for o in options]:
            return False
    return True


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.kind == "choice":
        return optuna.distributions.CategoricalDistribution([choice_label(v) for v in spec.choice])
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
        values = _grid_values(key, spec)
        expanded = []
        for point in points:
            expanded.extend([{**point, key: v} for v in values] if _active(spec, point) else [point])
        points = expanded
    return points


def grid_point(partial: dict[str, Any], space: dict[str, ParamSpec], recipe: Lookup) -> dict[str, Any]:
    """The grid point with ``partial``'s values; other parameters take the recipe's value when it is a
    grid value, else their first value."""
    point: dict[str, Any] = {}
    for key, spec in space.items():
        if not _active(spec, point):
            continue
        if key in partial:
            point[key] = partial[key]
            continue
        found, value = recipe(spec.sets(key))
        label = choice_label(value) if found and spec.kind == "choice" else value
        inside, stored = contained(spec, label) if found and not spec.paired else (False, None)
        point[key] = stored if inside else _grid_values(key, spec)[0]
    return point


def _grid_values(key: str, spec: ParamSpec) -> list[Any]:
    if spec.kind == "int":
        lo, hi = spec.int
        return list(range(lo, hi + 1, int(spec.step or 1)))
    if spec.kind == "choice":
        return [choice_label(v) for v in spec.choice]
    raise ValueError(f"{key}: a {spec.kind} range has no grid")


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
            overrides.append(f"{spec.sets(key)}={value}")  # a list-valued choice, stored as JSON
        else:
            overrides.append(format_override(spec.sets(key), value))
    return overrides


# --- re-expressing trials of another space ------------------------------------------------

Lookup = Callable[[str], tuple[bool, Any]]
"""A recipe key -> (found, value): the values of the recipe a trial ran on."""


def recipe_values(tree: dict[str, Any] | None) -> Lookup:
    """Look dotted keys up in a recipe's ``to_dict()`` (None: nothing is known)."""
    def value(key: str) -> tuple[bool, Any]:
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node
    return value


def describe(spec: ParamSpec) -> str:
    if spec.kind == "choice":
        return f"choice {[choice_label(v) for v in spec.choice]}"
    return f"{spec.kind} {list(getattr(spec, spec.kind))}" + (f" step {spec.step:g}" if spec.step else "")


def contained(spec: ParamSpec, value: Any) -> tuple[bool, Any]:
    """Whether a value (a choice's label) lies in the spec's distribution, and the value as Optuna
    stores it there (an int for an int range, the choice itself for a choice)."""
    dist = distribution(spec)
    try:
        internal = dist.to_internal_repr(value)
    except (ValueError, TypeError):
        return False, None
    if not dist._contains(internal):
        return False, None
    return True, dist.to_external_repr(internal)


def settings_of(params: dict[str, Any], space: dict[str, ParamSpec] | None) -> dict[str, Any]:
    """A trial's params as the recipe keys and values it trained with (a paired choice sets several);
    without its space (a study this project did not write), each param is taken as a recipe key."""
    settings = {}
    for key, value in params.items():
        spec = (space or {}).get(key)
        overrides = to_overrides({key: value}, {key: spec}) if spec else [format_override(key, value)]
        for text in overrides:
            name, _, raw = text.partition("=")
            settings[name] = parse_value(name, raw)
    return settings


def express(settings: dict[str, Any], space: dict[str, ParamSpec], ran_on: Lookup | None = None,
            partial: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """The params, in ``space``'s own distributions, of a trial that trained with ``settings``.

    A key the trial did not set had the value of the recipe it ran on (``ran_on``). Returns
    ``(params, None)``, or ``(None, why)`` when the trial lies outside the space. ``partial`` keeps
    only the keys the trial set that lie inside (settings to try first) and never fails.
    """
    def value_of(key: str) -> tuple[bool, Any]:
        if key in settings:
            return True, settings[key]
        return ran_on(key) if ran_on is not None and not partial else (False, None)

    params: dict[str, Any] = {}
    for key, spec in space.items():
        if not partial and not _active(spec, params):
            continue
        if spec.paired:
            label = next((choice_label(c) for c in spec.choice
                          if all(value_of(k) == (True, v) for k, v in c.items())), None)
            found, shown = label is not None, "its settings"
        else:
            found, value = value_of(spec.sets(key))
            label = choice_label(value) if found and spec.kind == "choice" else value
            shown = f"{spec.sets(key)}={value!r}" if found else ""
        inside, stored = contained(spec, label) if found else (False, None)
        if inside:
            params[key] = stored
        elif not partial:
            return None, (f"{shown} lies outside {key}'s {describe(spec)}" if found
                          else f"{key} is unknown (not set, and the recipe it ran on is unknown)")
    return params, None


def complete(params: dict[str, Any], space: dict[str, ParamSpec]) -> bool:
    """Whether ``params`` hold every parameter of the space that is active for them (a whole point)."""
    return all(key in params for key, spec in space.items() if _active(spec, params))


def covered_keys(space: dict[str, ParamSpec]) -> set[str]:
    """The recipe keys a space sets (a paired choice sets its keys)."""
    return {s.sets(k) for k, s in space.items() if not s.paired} | {
        k for s in space.values() if s.paired for choice in s.choice for k in choice}


def covers(old: ParamSpec, new: ParamSpec) -> str | None:
    """None when every value ``old`` can take lies in ``new`` (a widening); else why not."""
    if (old.when or None) != (new.when or None):
        return f"its condition changed ({old.when} -> {new.when})"
    if old.key != new.key:
        return f"the recipe key it sets changed ({old.key} -> {new.key})"
    if old.kind in ("choice", "int"):
        if old.kind == "int" and new.kind == "int" and (old.int[1] - old.int[0]) // int(old.step or 1) > 10_000:
            values = [old.int[0], old.int[1]]  # the ends of a long range; the step is compared below
            if int(old.step or 1) % int(new.step or 1) or (old.int[0] - new.int[0]) % int(new.step or 1):
                return f"step {new.step} does not hit every value of {describe(old)}"
        else:
            values = ([choice_label(v) for v in old.choice] if old.kind == "choice"
                      else list(range(old.int[0], old.int[1] + 1, int(old.step or 1))))
        missing = [v for v in values if not contained(new, v)[0]]
        return f"{describe(new)} leaves out {missing[:5]} of the earlier {describe(old)}" if missing else None
    lo, hi = getattr(old, old.kind)
    if new.kind not in ("uniform", "loguniform"):
        return f"a {new.kind} can't hold the earlier continuous {describe(old)}"
    new_lo, new_hi = getattr(new, new.kind)
    if new_lo > lo or new_hi < hi:
        return f"{describe(new)} does not contain the earlier {describe(old)}"
    if new.step is not None and (old.step is None or not contained(new, lo)[0]
                                 or abs(old.step / new.step - round(old.step / new.step)) > 1e-9):
        return f"step {new.step} does not hit every value of the earlier {describe(old)}"
    return None
