"""The training code stays readable in one sitting: short functions, shallow nesting, no closures in
the loop. These limits are what let a reader follow a step from batch to checkpoint."""

from __future__ import annotations

import ast
from pathlib import Path

import recforge.train

TRAIN_DIR = Path(recforge.train.__file__).parent
_BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match, ast.AsyncFor, ast.AsyncWith)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _depth(node: ast.AST, level: int = 0) -> int:
    """Deepest block nesting inside `node`, not counting nested functions or classes (checked on their own)."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, _SCOPES):
            deepest = max(deepest, _depth(child, level + isinstance(child, _BLOCKS)))
    return deepest


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(TRAIN_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{path.name}:{node.lineno} {node.name}", node))
    return found


def test_functions_are_short_and_shallow():
    too_long = [f"{name} ({node.end_lineno - node.lineno + 1} lines)" for name, node in _functions()
                if node.end_lineno - node.lineno + 1 > 100]
    too_deep = [f"{name} (depth {_depth(node)})" for name, node in _functions() if _depth(node) > 4]
    assert not too_long and not too_deep, (too_long, too_deep)


def test_the_training_loop_has_no_closures():
    (train,) = [node for name, node in _functions() if name.startswith("trainer.py") and node.name == "train"]
    nested = [f"line {n.lineno}" for n in ast.walk(train)
              if n is not train and isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    assert not nested, f"closures in train(): {nested}; make them named helpers"
