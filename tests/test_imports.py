"""The layering holds: no import cycles in finetune/ and recipes/, and the schema imports nothing above it.

Imports are read from the source (module level and inside functions alike: a lazy import that reaches
back up is still a cycle); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "recipes")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runs(node: ast.AST) -> bool:
    """False for ``if TYPE_CHECKING:`` blocks."""
    test = getattr(node, "test", None)
    return not (isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")


def imported(path: Path, modules: set[str], root: Path = REPO) -> set[str]:
    """The project modules a file imports (``from finetune import data`` counts as finetune.data)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        stack.extend(child for child in ast.iter_child_nodes(node) if _runs(child))
    return {m for m in found if m in modules} - {name}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (root / package).rglob("*.py")]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imported(p, modules, root) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")"
                       for c in found)
    assert not found, f"import cycles: {detail}"


# what the schema may stand on: the standard library, pydantic/yaml, and these finetune modules below it
SCHEMA_MAY_IMPORT = {"finetune.errors", "finetune.recipe_checks", "finetune.recipe_file", "finetune.metrics",
                     "finetune.schema", "finetune.data_config", "finetune.distill_config"}


def test_the_schema_imports_nothing_above_it():
    config = REPO / "finetune" / "config.py"
    project = imported(config, set(import_graph()))
    assert project <= SCHEMA_MAY_IMPORT, f"finetune/config.py imports {sorted(project - SCHEMA_MAY_IMPORT)}"
    third_party = set()
    for node in ast.walk(ast.parse(config.read_text())):
        if isinstance(node, ast.Import):
            third_party.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            third_party.add((node.module or "").split(".")[0])
    outside_stdlib = {m for m in third_party - set(PACKAGES) if m not in sys.stdlib_module_names and m != "__future__"}
    assert outside_stdlib <= {"pydantic", "yaml"}, f"finetune/config.py imports {sorted(outside_stdlib)}"


def test_the_check_sees_a_cycle_added_inside_a_function(tmp_path):
    """A lazy import that reaches back (as config -> loop once did) is found, and a TYPE_CHECKING one is not."""
    package = tmp_path / "finetune"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "schema.py").write_text("def run():\n    from finetune import engine\n    return engine\n")
    (package / "engine.py").write_text("from finetune.schema import run\n")
    (package / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from finetune.engine import run\nimport finetune.schema\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "__init__.py").write_text("import finetune.engine\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["finetune.engine", "finetune.schema"]]
    assert graph["finetune.typed"] == {"finetune.schema"}


@pytest.mark.parametrize("module", ["finetune.config", "finetune.recipe_file", "finetune.recipe_checks"])
def test_the_schema_layer_loads_without_the_training_stack(module):
    """Reading and validating a recipe does not pull in the loop, the sweep or the recipes package."""
    import subprocess

    code = (f"import sys, {module}\n"
            "above = [m for m in ('finetune.loop', 'finetune.run', 'finetune.sweep', 'finetune.prune', 'recipes')"
            " if m in sys.modules]\nprint(above)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
