"""The package holds the layering declared in docs/architecture.md (read by tools/layering.py).

The test reads the same table the docs show and `make layering` prints, so the map and the rule
cannot drift apart. The self-tests break the rule on purpose, in a copy of the package, and expect
the checker to name the edge: a checker that sees nothing would otherwise pass forever.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("layering", ROOT / "tools" / "layering.py")
layering = importlib.util.module_from_spec(_spec)
sys.modules["layering"] = layering
_spec.loader.exec_module(layering)


def test_package_holds_its_declared_layering():
    problems = layering.check()
    assert not problems, "\n".join(problems)


def test_declaration_names_every_kind_of_rule():
    declared = layering.read_layering()
    assert {"config", "runtime", "storage", "arrays"} <= set(declared.leaves)
    assert [group for group in declared.flow if "data" in group] and [g for g in declared.flow if "serve" in g]
    assert "cli" in {m for group in declared.entries for m in group}
    assert {"train", "models", "nn", "data"} <= set(declared.server_never)
    assert "index" in declared.server_lazy


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "recforge"
    shutil.copytree(layering.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        ("serve/bad.py", "import recforge.train\n", "serve.bad -> train: the server never imports"),
        ("serve/bad.py", "def f():\n    from recforge.models import MODELS\n",
         "serve.bad -> models (lazy): the server never imports"),
        ("serve/bad.py", "from recforge.index import ItemIndex\n", "serve.bad -> index (server-lazy"),
        ("data/bad.py", "from recforge.train.trainer import train\n",
         "data.bad -> train.trainer: imports a layer to its right"),
        ("arrays_bad.py", "import recforge.data\n", "not placed in the layering table"),
        ("bundle_extra.py", "x = 1\n", "bundle_extra: not placed"),
        ("models/bad.py", "from recforge.cli import app\n", "the library never imports an entry point"),
        ("models/bad.py", "from recforge.storage import _private\n", "imports private name(s) _private"),
    ],
)
def test_checker_names_a_broken_rule(package_copy: Path, file: str, source: str, expected: str):
    (package_copy / file).write_text(source)
    problems = layering.check(package=package_copy)
    assert any(expected in problem for problem in problems), problems


def test_leaf_importing_the_flow_is_reported(package_copy: Path):
    with open(package_copy / "arrays.py", "a") as handle:
        handle.write("\nfrom recforge.metrics import auc\n")
    assert any("arrays -> metrics: a leaf imports only leaves" in p for p in layering.check(package=package_copy))


def test_the_server_process_loads_no_training_code_and_no_faiss():
    """What the static rules promise, observed in a real interpreter importing the ASGI app."""
    probe = (
        "import sys, recforge.serve.app\n"
        "banned = ('faiss', 'pyspark', 'recforge.train', 'recforge.models', 'recforge.nn', 'recforge.data',"
        " 'recforge.metrics', 'recforge.evaluate', 'recforge.index', 'recforge.recipes')\n"
        "print(sorted(m for m in sys.modules if m.startswith(banned)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
