"""Imports run one way (../DESIGN.md): a module imports only what stands to its left, plus leaves.

Parsed statically from the source, so the rule holds for lazily imported modules too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "recforge"

# Leaves: anything may import them; they import only each other.
LEAVES = {"config", "runtime", "storage", "metrics", "losses"}
# The data flow, left to right. `simulate` is the synthetic source the data layer reads.
FLOW = ["simulate", "data", "nn", "models", "train", "evaluate", "index", "recommend", "bundle", "registry",
        "serve", "experiments"]
# Entry points compose the library; nothing in the library may import them.
ENTRY_POINTS = {"cli", "jobs", "retrieval_jobs", "pipeline", "scenarios", "doctor", "serve.app", "__main__"}
# The server loads bundles with torch alone: no training-side code.
SERVER_FORBIDDEN = {"train", "models", "nn", "data.prepare", "data.validate", "data.sources", "jobs"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "recforge" or name.startswith("recforge."):
                found.add(name.removeprefix("recforge").lstrip("."))
    return {name for name in found if name}


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_entry(name: str) -> bool:
    return (name in ENTRY_POINTS or _top(name) in ENTRY_POINTS or name.startswith("serve.app")
            or name.endswith(".__main__"))


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _resolve(imported: str, modules: dict[str, set[str]]) -> str:
    """`from recforge.data import batches` names a module; `from recforge.models import X` a symbol."""
    return imported if imported in modules else imported.rsplit(".", 1)[0] if "." in imported else imported


def test_library_never_imports_entry_points():
    modules = _modules()
    bad = [
        f"{mod} imports {imp}"
        for mod, imports in modules.items()
        if not _is_entry(mod)
        for imp in imports
        if _is_entry(_resolve(imp, modules))
    ]
    assert not bad, bad


def test_leaves_import_only_leaves():
    modules = _modules()
    bad = [
        f"{mod} imports {imp}"
        for mod, imports in modules.items()
        if mod in LEAVES
        for imp in imports
        if _top(_resolve(imp, modules)) not in LEAVES
    ]
    assert not bad, bad


def test_data_flows_one_way():
    modules = _modules()
    rank = {name: i for i, name in enumerate(FLOW)}
    bad = []
    for mod, imports in modules.items():
        top = _top(mod)
        if top not in rank or _is_entry(mod):
            continue
        for imp in imports:
            target = _top(_resolve(imp, modules))
            if target in LEAVES or target == top:
                continue
            if target not in rank or rank[target] > rank[top]:
                bad.append(f"{mod} ({top}) imports {imp} ({target}), which stands to its right")
    assert not bad, bad


def test_server_imports_no_training_code():
    modules = _modules()
    bad = [
        f"{mod} imports {imp}"
        for mod, imports in modules.items()
        if _top(mod) == "serve"
        for imp in imports
        if any(_resolve(imp, modules) == f or _resolve(imp, modules).startswith(f + ".") for f in SERVER_FORBIDDEN)
    ]
    assert not bad, bad


def test_every_module_is_placed():
    """A new top-level module must be given a place in the flow (or be a leaf / entry point)."""
    known = LEAVES | set(FLOW) | {_top(e) for e in ENTRY_POINTS} | {""}
    unplaced = sorted({_top(m) for m in _modules()} - known)
    assert not unplaced, f"add these to FLOW, LEAVES or ENTRY_POINTS in this test: {unplaced}"


def test_checker_catches_a_backwards_import(tmp_path, monkeypatch):
    """The rule itself must bite: a fake data module importing the trainer is reported."""
    fake = tmp_path / "recforge"
    (fake / "data").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "data" / "bad.py").write_text("from recforge.train.trainer import train\n")
    (fake / "train" / "trainer.py").write_text("def train():\n    pass\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_data_flows_one_way()
    except AssertionError as exc:
        assert "data.bad" in str(exc)
    else:
        raise AssertionError("a backwards import went unnoticed")
