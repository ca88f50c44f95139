"""Reading recipe files: safe YAML that also refuses what would lose or hide settings, and ``base:``.

PyYAML's safe loader keeps the last of two equal keys (a second ``train:`` silently replaces the first)
and names no file in its errors. Here every problem is one line naming the file and line: a repeated
key (both lines), a syntax error, text that is not UTF-8, a tag beyond plain data (``!!python/...``),
an empty file, a ``base:`` that is missing or forms a cycle. Nothing is ever evaluated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RecipeError


@dataclass
class Origins:
    """Where each dotted key of a recipe read from files was set: "FILE line N", and how deep in the
    ``base:`` chain (0: the file named, 1: its base, ...), so a nearer file may switch a deeper key off."""

    file: str = ""
    lines: dict[str, str] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)

    def at(self, key: str, overridden: set[str] | frozenset[str] = frozenset()) -> str:
        """Its own line, else its section's, else the file; "" for an override or a recipe from no file."""
        if not self.file or key in overridden:
            return ""
        parts = key.split(".")
        while parts and ".".join(parts) not in self.lines:
            parts.pop()
        return self.lines[".".join(parts)] if parts else self.file


# the tags PyYAML's safe loader resolves plain data to; anything else (!!python/..., !foo) is refused
PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map",
                                                        "timestamp", "merge")}


def load_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The file's data and the line (1-based) of every mapping key by dotted path (``train.lr``).

    Raises:
        RecipeError: unreadable or not UTF-8, a YAML syntax error, a repeated key (both lines named),
            or a tag that is not plain data. Each names the file and line.
    """
    text = _read_text(path)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks the characters here
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is not None:
            _check_node(node, path, "", lines, set())
        data = loader.construct_document(node) if node is not None else None
    except RecipeError:
        raise
    except yaml.MarkedYAMLError as err:
        raise RecipeError(_syntax_error(path, err)) from None
    except yaml.reader.ReaderError as err:
        line = text[: err.position].count("\n") + 1
        raise RecipeError(f"{path} line {line}: the character {chr(err.character)!r} is not allowed in YAML "
                          "(write it as an escape inside double quotes, e.g. \"\\x01\")") from None
    except (ValueError, TypeError) as err:  # e.g. `!!int abc`: an explicit plain tag on a value it cannot hold
        raise RecipeError(f"{path}: cannot read a value: {' '.join(str(err).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe file: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark some editors write is fine
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(f"{path} line {line}: not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}); "
                          "save the recipe as UTF-8") from None


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _check_node(node: yaml.Node, path: Path, prefix: str, lines: dict[str, int], visited: set[int]) -> None:
    """Refuse non-plain tags and repeated keys; record where each key is. Aliased nodes are walked once
    (an alias bomb must not expand here)."""
    if id(node) in visited:
        return
    visited.add(id(node))
    if node.tag not in PLAIN_TAGS:
        raise RecipeError(f"{path} line {node.start_mark.line + 1}: the tag {_tag_name(node.tag)} is not allowed in "
                          "a recipe; only plain data (mappings, lists, text, numbers, true/false, null)")
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            _check_node(key_node, path, prefix, lines, visited)
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                _check_node(value_node, path, prefix, lines, visited)
                continue
            key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
            if key_node.value in first_line:
                # YAML keeps the last value: a second `train:` would replace the first in silence
                first = first_line[key_node.value]
                raise RecipeError(f"{path} line {line}: duplicate key '{key}' (first at line {first}); YAML would keep "
                                  "only the second, so merge them into one")
            first_line[key_node.value] = lines[key] = line
            _check_node(value_node, path, f"{key}.", lines, visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_node(item, path, f"{prefix.removesuffix('.')}[{index}].", lines, visited)


def _syntax_error(path: Path, err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark else str(path)
    problem = " ".join(str(err.problem or "").split())
    context = " ".join(str(err.context or "").split())
    if context and err.context_mark is not None and err.context_mark is not mark:
        context += f" at line {err.context_mark.line + 1}"
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


# --- recipe files and their bases ----------------------------------------------------------

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""The shipped recipes (the ``recipes`` package lists them as functions; ``base:`` may name them)."""


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in SHIPPED_DIR.glob("*.yaml"))


def shipped_path(name: str) -> Path | None:
    """The shipped recipe called ``name`` (``sst2_minilm_lora`` or ``sst2_minilm_lora.yaml``), or None."""
    stem = name.removesuffix(".yaml")
    if not stem or Path(stem).name != stem:  # a plain name, never a path out of this folder
        return None
    path = SHIPPED_DIR / f"{stem}.yaml"
    return path if path.is_file() else None


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = (), origins: Origins | None = None) -> dict[str, Any]:
    """The raw mapping of a recipe file. ``base: NAME_OR_PATH`` (a file next to this one, a path, or a
    shipped recipe's name) is read first and this file's sections are merged over it, key by key.
    ``origins``, when given, records the file, line and base depth of each dotted key (the nearest file's).

    Raises:
        RecipeError: a file is missing, unreadable, not UTF-8, not valid or not safe YAML, empty or not a
            mapping, repeats a key, or its ``base:`` is missing or forms a cycle. Each names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw, lines = load_yaml(path)
    if raw is None:
        raise RecipeError(f"{path}: the file is empty; a recipe is a YAML mapping of sections "
                          "(backbone:, data:, train: ...)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a YAML mapping of recipe sections, got {type(raw).__name__}")
    located = {key: f"{path} line {line}" for key, line in lines.items()}
    if origins is not None and not _seen:
        origins.file = str(path)  # keys without a line of their own (a missing section) are the top file's
    if "base" in raw:
        base = raw.pop("base")
        base_path = _base_path(path, base, located.get("base", str(path)), _seen)
        parent = read_recipe_file(base_path, (*_seen, path.resolve()), origins)
        parent.pop("sweep", None)  # a base's own sweep doesn't carry over
        raw = _merge(parent, raw)
    if origins is not None:  # after the base's: this file's keys win, as its values do
        origins.lines.update(located)
        origins.depth.update(dict.fromkeys(located, len(_seen)))
    return raw


def _base_path(path: Path, base: Any, at: str, seen: tuple[Path, ...]) -> Path:
    """The file ``base:`` names: next to the recipe, a path, or a shipped recipe's name."""
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{at}: base: must name a recipe file or a shipped recipe, got {base!r}")
    found = next((p for p in (path.parent / base, Path(base).expanduser()) if p.is_file()), None)
    found = found or shipped_path(base)
    if found is None:
        raise RecipeError(f"{at}: base: {base!r} is neither a file next to {path.name} nor a shipped recipe "
                          f"({', '.join(shipped_recipes())})")
    chain = (*seen, path.resolve())
    if found.resolve() in chain:
        names = " -> ".join(p.name for p in (*chain, found.resolve()))
        raise RecipeError(f"{at}: base: {base!r} forms a cycle ({names})")
    return found


def _merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged
