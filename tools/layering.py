"""The declared layering of recforge (docs/architecture.md) and every import edge measured against it.

`python tools/layering.py` prints the layers as declared, then each import edge of the package with
the rule that allows or forbids it; it exits 1 when any edge breaks a rule. tests/test_architecture.py
runs the same check, so the map in the docs, this report and the test can never disagree: all three
read the one table in docs/architecture.md.

Imports are parsed statically from the source, so a lazy import (inside a function) counts too; the
server rules tell the two apart, because "the server never loads FAISS until a retrieval bundle
arrives" is a rule about module-level imports only.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "recforge"
DECLARATION = ROOT / "docs" / "architecture.md"
TABLE_START, TABLE_END = "<!-- layering:start -->", "<!-- layering:end -->"
KINDS = ("leaf", "flow", "entry", "server-never", "server-lazy")


@dataclass(frozen=True)
class Layer:
    kind: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "serve.inference"
    target: str  # imported module (a symbol import resolved to its module), e.g. "bundle"
    lazy: bool  # imported inside a function, not at module level
    names: tuple[str, ...] = ()  # names taken with `from target import ...`


@dataclass
class Layering:
    leaves: list[str] = field(default_factory=list)
    flow: list[tuple[str, ...]] = field(default_factory=list)  # left to right
    entries: list[tuple[str, ...]] = field(default_factory=list)  # left to right
    server_never: list[str] = field(default_factory=list)
    server_lazy: list[str] = field(default_factory=list)


def read_layering(path: Path = DECLARATION) -> Layering:
    """The table between the layering markers: `| kind | modules | why |`, one row per layer, in order."""
    text = path.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path}: no layering table between {TABLE_START} and {TABLE_END}")
    body = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    layering = Layering()
    for number, line in enumerate(body.splitlines(), 1):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("kind", "") or set(cells[0]) <= {"-", ":"}:
            continue
        kind, modules = cells[0], tuple(m.strip().strip("`") for m in cells[1].split(",") if m.strip())
        if kind not in KINDS:
            raise ValueError(f"{path}: layering row {number}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "leaf":
            layering.leaves.extend(modules)
        elif kind == "flow":
            layering.flow.append(modules)
        elif kind == "entry":
            layering.entries.append(modules)
        elif kind == "server-never":
            layering.server_never.extend(modules)
        else:
            layering.server_lazy.extend(modules)
    return layering


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes that sit inside a function (run when called, not when the module loads)."""
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(inner) for inner in ast.walk(node) if isinstance(inner, ast.Import | ast.ImportFrom))
    return lazy


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of imports under `if TYPE_CHECKING:`: annotations only, never executed."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.update(id(inner) for inner in ast.walk(node) if isinstance(inner, ast.Import | ast.ImportFrom))
    return found


def import_edges(package: Path = PACKAGE) -> list[Edge]:
    files = sorted(package.rglob("*.py"))
    modules = {module_name(file, package) for file in files}
    edges: list[Edge] = []
    for file in files:
        source = module_name(file, package)
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        lazy, typing_only = _lazy_nodes(tree), _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = _from_targets(node, modules)
            else:
                continue
            for name, names in targets:
                if name == "recforge" or name.startswith("recforge."):
                    target = name.removeprefix("recforge").lstrip(".")
                    if target:
                        edges.append(Edge(source, target, id(node) in lazy, names))
    return edges


def _from_targets(node: ast.ImportFrom, modules: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """`from recforge.data import batches` imports a module; `from recforge.models import X` a name of one."""
    base = node.module.removeprefix("recforge").lstrip(".") if node.module else ""
    out: list[tuple[str, tuple[str, ...]]] = []
    symbols: list[str] = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in modules:
            out.append((f"recforge.{sub}", ()))
        else:
            symbols.append(alias.name)
    if symbols or not out:
        out.append((node.module or "", tuple(symbols)))
    return out


def _owner(module: str, groups: list[tuple[str, ...]]) -> int | None:
    """Index of the group that declares `module` (or a package above it); the longest match wins."""
    best, best_len = None, -1
    for index, group in enumerate(groups):
        for declared in group:
            if (module == declared or module.startswith(declared + ".")) and len(declared) > best_len:
                best, best_len = index, len(declared)
    return best


def _is_in(module: str, names: list[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def placement(module: str, layering: Layering) -> str | None:
    """'leaf', 'flow N' or 'entry N' for a module; None when the declaration does not place it."""
    entry = _owner(module, layering.entries)
    if entry is not None:
        return f"entry {entry}"
    if _is_in(module, layering.leaves):
        return "leaf"
    flow = _owner(module, layering.flow)
    return None if flow is None else f"flow {flow}"


def judge(edge: Edge, layering: Layering) -> str | None:
    """None when the layering allows `edge`, else the rule it breaks."""
    private = [name for name in edge.names if name.startswith("_")]
    if private:
        return f"imports private name(s) {', '.join(private)} of another module"
    source, target = placement(edge.source, layering), placement(edge.target, layering)
    if source is None:
        return f"{edge.source} is not placed in the layering table"
    if target is None:
        return f"{edge.target} is not placed in the layering table"
    if _is_in(edge.source, ["serve"]) and _is_in(edge.target, layering.server_never):
        return "the server never imports training-side code (server-never)"
    if source == "leaf":
        return None if target == "leaf" else "a leaf imports only leaves"
    if target == "leaf":
        return None
    source_kind, source_rank = source.split()
    target_kind, target_rank = target.split()
    if source_kind == "flow":
        if target_kind == "entry":
            return "the library never imports an entry point"
        return None if int(target_rank) <= int(source_rank) else "imports a layer to its right"
    if target_kind == "entry" and int(target_rank) > int(source_rank):
        return "an entry point imports only entry points to its left"
    return None


def server_lazy_breaks(edges: list[Edge], layering: Layering) -> list[str]:
    """Module-level import chains from a serve module to a server-lazy module (FAISS before it is needed)."""
    eager: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.lazy:
            eager.setdefault(edge.source, set()).add(edge.target)
    breaks = []
    for start in sorted({e.source for e in edges if e.source == "serve" or e.source.startswith("serve.")}):
        seen, stack = {start: [start]}, [start]
        while stack:
            current = stack.pop()
            for nxt in sorted(eager.get(current, ())):
                if nxt in seen:
                    continue
                seen[nxt] = [*seen[current], nxt]
                if _is_in(nxt, layering.server_lazy):
                    chain = " -> ".join(seen[nxt])
                    breaks.append(f"{chain} (server-lazy: import it inside the function that needs it)")
                stack.append(nxt)
    return breaks


def unplaced(layering: Layering, package: Path = PACKAGE) -> list[str]:
    names = {module_name(file, package) for file in package.rglob("*.py")} - {""}
    return sorted(name for name in names if placement(name, layering) is None)


def check(package: Path = PACKAGE, declaration: Path = DECLARATION) -> list[str]:
    """Every way the package breaks its declared layering, one line each (empty: it holds)."""
    layering = read_layering(declaration)
    edges = import_edges(package)
    problems = [f"{name}: not placed in the layering table ({declaration.name})"
                for name in unplaced(layering, package)]
    for edge in edges:
        verdict = judge(edge, layering)
        if verdict:
            problems.append(f"{edge.source} -> {edge.target}{' (lazy)' if edge.lazy else ''}: {verdict}")
    return sorted(set(problems)) + server_lazy_breaks(edges, layering)


def main() -> int:
    layering = read_layering()
    print(f"declared in {DECLARATION.relative_to(ROOT)}")
    print(f"  leaves (anyone may import): {', '.join(layering.leaves)}")
    for index, group in enumerate(layering.flow):
        print(f"  flow {index:>2}: {', '.join(group)}")
    for index, group in enumerate(layering.entries):
        print(f"  entry {index:>2}: {', '.join(group)}")
    print(f"  server never imports: {', '.join(layering.server_never)}")
    print(f"  server imports only lazily: {', '.join(layering.server_lazy)}")
    edges = import_edges()
    print(f"\n{len(edges)} import edges:")
    for edge in sorted(edges, key=lambda e: (e.source, e.target)):
        verdict = judge(edge, layering)
        where = f"{placement(edge.source, layering)} -> {placement(edge.target, layering)}"
        print(f"  {'BAD ' if verdict else 'ok  '}{edge.source} -> {edge.target}{' (lazy)' if edge.lazy else ''}"
              f"  [{where}]{'  ' + verdict if verdict else ''}")
    problems = check()
    print(f"\n{len(problems)} edge(s) against the layering")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
