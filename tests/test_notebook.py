"""notebooks/quickstart.ipynb runs headless, end to end, on a tiny world, and shows what it promises.

The notebook is executed by a real Jupyter kernel of this environment's Python (a kernel spec written
to a temporary JUPYTER_PATH, so a `python3` kernel installed elsewhere on the machine cannot be picked
up instead), with smaller sizes injected after its parameters cell, as papermill does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
TINY = {"USERS": 800, "ITEMS": 300, "EVENTS": 20_000, "DAYS": 6, "EPOCHS": 2, "BATCH_SIZE": 512}
KERNEL = "recforge-notebook-test"


def parameters_cell(nb: nbformat.NotebookNode) -> int:
    found = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(found) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return found[0]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {number} has outputs: clear them"


def test_default_parameters_are_the_quickstarts():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tree = ast.parse(nb.cells[parameters_cell(nb)].source)
    params = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    generate, train = quickstart["data"]["generate"], quickstart["train"]
    assert params == {"USERS": generate["users"], "ITEMS": generate["items"], "EVENTS": generate["events"],
                      "DAYS": generate["days"], "EPOCHS": train["epochs"], "BATCH_SIZE": train["batch_size"],
                      "WORKDIR": None}


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(kernel_name=KERNEL, prefix=str(prefix))  # argv: this interpreter (the project's .venv)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


@pytest.mark.slow
def test_notebook_runs_tiny_and_shows_plots_and_an_auc_above_chance(tmp_path, kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    injected = "\n".join(f"{name} = {value!r}" for name, value in {**TINY, "WORKDIR": str(tmp_path / "work")}.items())
    nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected"]}))
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert len(images) == 2, "expected the training-curve and the model-vs-popularity figures"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    auc = re.search(r"model AUC (\d\.\d+)", text)
    assert auc and float(auc.group(1)) > 0.5, text[-2000:]
    assert "popularity AUC" in text and (tmp_path / "work" / "run" / "metrics.jsonl").is_file()
