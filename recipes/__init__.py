"""Shipped recipes, one YAML file each, importable as functions.

    from recipes import sst2_minilm_lora
    recipe = sst2_minilm_lora()          # a validated finetune.Recipe
    recipe.train.lr = 1e-4
    result = recipe.run()

Each function takes optional dotted overrides: ``sst2_minilm_lora("train.epochs=1")``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from finetune import Recipe, RecipeError
from finetune.recipe_file import SHIPPED_DIR as RECIPES_DIR
from finetune.recipe_file import shipped_path


def available() -> dict[str, str]:
    """Shipped recipe names -> the first line of each file's header comment."""
    found = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        found[path.stem] = first.lstrip("# ").strip()
    return found


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the path of the shipped recipe with that name.

    Raises:
        RecipeError: neither a file nor a shipped recipe name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_path(name_or_path)
    if shipped is not None:
        return shipped
    if path.is_dir():
        raise RecipeError(f"--recipe: {name_or_path} is a folder; name a recipe .yaml file or a shipped recipe")
    close = difflib.get_close_matches(path.name.removesuffix(".yaml"), list(available()), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RecipeError(f"--recipe: {name_or_path!r} is neither a file nor a shipped recipe{hint}; "
                      f"shipped: {', '.join(available())}")


def load(name: str, *overrides: str) -> Recipe:
    """The recipe at a path, or the shipped recipe of that name, with dotted overrides."""
    return Recipe.from_yaml(recipe_path(name), overrides=list(overrides))


def _make(name: str):
    def build(*overrides: str) -> Recipe:
        return load(name, *overrides)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{available()[name]}\n\nReturns the validated recipe from recipes/{name}.yaml."
    return build


for _name in available():
    globals()[_name] = _make(_name)

__all__ = ["available", "load", "recipe_path", *available()]
