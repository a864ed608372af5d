"""Layers point one way (docs/architecture.md): launch/ → methods/ → pipeline/, never back up.

Read from the source, not from what happens to be imported at run time: every ``import`` and
``from ... import`` in a file counts, also inside functions and ``TYPE_CHECKING`` blocks.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# the packages a layer may not import (anything above it)
FORBIDDEN = {"pipeline": {"methods", "launch"}, "methods": {"launch"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(layer: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {package}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for package, line in sorted(imported_packages(path))
        if package in FORBIDDEN[layer]
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_below_itself(layer):
    assert (ROOT / layer).is_dir()
    assert violations(layer) == []


def test_the_check_sees_imports_anywhere_in_a_file(tmp_path):
    code = tmp_path / "mod.py"
    code.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from methods.base import Method\n"
                    "def f():\n    import launch.recipe\n")
    assert {p for p, _ in imported_packages(code)} == {"typing", "methods", "launch"}


def test_recipe_sits_above_methods():
    # the recipe is the one place that knows a method by its configured name
    assert (ROOT / "launch" / "recipe.py").is_file() and not (ROOT / "pipeline" / "recipe.py").exists()
    assert "methods" in {p for p, _ in imported_packages(ROOT / "launch" / "recipe.py")}
