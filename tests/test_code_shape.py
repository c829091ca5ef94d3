"""Limits that keep the code readable as it grows: no function in the package over 100 lines, and no
class in the server over 150 (the server is parts with one owner each, not one object that owns all)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "recforge"


def _lengths(kind: type[ast.AST] | tuple[type[ast.AST], ...], root: Path) -> dict[str, int]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, kind):
                found[f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return found


@pytest.mark.parametrize(("kind", "root", "limit"), [
    ((ast.FunctionDef, ast.AsyncFunctionDef), PACKAGE, 100),
    (ast.ClassDef, PACKAGE / "serve", 150),
])
def test_no_function_or_server_class_outgrows_its_limit(kind, root, limit):
    too_long = {name: lines for name, lines in _lengths(kind, root).items() if lines > limit}
    assert not too_long, f"over {limit} lines: {too_long}"


def test_the_limits_see_what_they_measure():
    """The walk finds the server's classes and the package's functions (an empty walk would pass anything)."""
    classes = _lengths(ast.ClassDef, PACKAGE / "serve")
    assert any(name.endswith(" Service") for name in classes) and len(classes) > 10
    assert len(_lengths((ast.FunctionDef, ast.AsyncFunctionDef), PACKAGE)) > 500
