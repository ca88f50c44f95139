"""What every config schema here shares: the strict base model, dotted keys, ``key=value`` overrides,
and pydantic's errors as one line that names the key the user wrote (recipes, sweeps, command flags)."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from finetune.errors import RecipeError
from finetune.recipe_checks import suggest
from finetune.recipe_file import Origins


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts, e.g. ``train.lr`` and ``policy.lora.rank``."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, key + "."))
    return keys


def did_you_mean(key: str, keys: list[str]) -> str:
    hint = suggest(key, keys)  # by the last part and common aliases (see finetune.recipe_checks)
    return f" (did you mean '{hint}'?)" if hint else ""


# --- dotted overrides -------------------------------------------------------------

FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str, keys: list[str]) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as a YAML scalar or list (never evaluated)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key=value, e.g. train.lr=3e-4")
    key, _, value = text.partition("=")
    key = key.strip()
    if key not in keys:
        raise RecipeError(f"unknown recipe key '{key}'{did_you_mean(key, keys)}")
    return key, parse_value(key, value)


def parse_value(key: str, value: str) -> Any:
    """An override's value as a YAML scalar or list (never evaluated); empty means null."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {key}: cannot parse value {value!r}: {err}") from None
    if isinstance(parsed, str) and FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 3e-4 (no dot) as text; users mean a number
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], keys: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` set at its dotted path."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text, keys)
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {key}: '{part}' is not a section")
            node = child
        node[leaf] = value
    return raw


def remove_key(raw: dict[str, Any], key: str) -> None:
    """Delete a dotted key from a raw mapping, so its default applies."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


# --- validation errors ------------------------------------------------------------


def error_key(item: dict) -> str:
    """The dotted key of one pydantic error, without its union-member and validator tags."""
    return ".".join(str(p) for p in item["loc"]
                    if str(p) not in ("int", "str", "float", "list[any]")
                    and not str(p).startswith(("function-", "literal[")) and "ParamSpec" not in str(p))


def error_problem(item: dict) -> str:
    """What one pydantic error says, in one line, with the value the user gave."""
    if item["type"] == "missing":
        return "required but missing"
    got = item.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return " ".join(item["msg"].removeprefix("Value error, ").split()) + shown


def describe(err: ValidationError, keys: list[str], origins: Origins | None = None,
             overridden: set[str] | frozenset[str] = frozenset()) -> str:
    """One line: each problem with the dotted key (and, from a file, its file and line), joined by '; '."""
    parts = []
    for item in err.errors():
        key = error_key(item)
        at = (origins or Origins()).at(key, overridden)
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown recipe key '{key}'" + (f" at {at}" if at else "") + did_you_mean(key, keys))
            continue
        # "KEY: problem" first: a sweep recognises a searched key's own errors by that start
        parts.append(f"{key or 'recipe'}: {error_problem(item)}" + (f", at {at}" if at else ""))
    return "; ".join(dict.fromkeys(parts))
