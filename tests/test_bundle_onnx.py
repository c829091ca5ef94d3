"""ONNX export parity for every model in MODELS: eager, TorchScript and onnxruntime agree on
held-out rows (atol 1e-5), at batch sizes other than the one the graph was traced with.

Weights are re-drawn with larger embeddings first (std 0.3): a freshly built model's tiny embeddings
(std 0.01) make every output nearly constant, which would let a broken export pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx as onnx_format
import pytest
import torch

from recforge import bundle
from recforge import config as config_module
from recforge.config import ModelConfig
from recforge.data.batches import SplitData
from recforge.models import MODELS, build_model
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.recipes.retrieval import build_item_index
from recforge.recipes.runs import feature_layout, item_catalog

ATOL = 1e-5
# Batch sizes to score at: one row, an odd size, and every held-out row; none is the traced size.
BATCHES = (1, 37, None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("onnx")
    cfg = config_module.load(None, [f"workdir={work}", "data.generate.users=300", "data.generate.items=120",
                                    "data.generate.events=6000", "data.generate.days=4", "data.history_length=6"])
    generate(cfg)
    prepare_data(cfg)
    return cfg.resolved_prepared_dir


def _model(name: str, prepared: Path) -> torch.nn.Module:
    torch.manual_seed(7)
    model = build_model(feature_layout(prepared), ModelConfig(name=name, hidden=[32, 16]))
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if "embeddings" in module_name or "first_order" in module_name:
                param.normal_(0.0, 0.3)
    return model.eval()


def _export(name: str, prepared: Path, out: Path, *, with_history: bool = True) -> tuple[torch.nn.Module, Path]:
    model = _model(name, prepared)
    features = feature_layout(prepared)
    test = SplitData.load(prepared, "test")
    rows = test.batch(torch.arange(min(300, len(test))))
    if not with_history:
        rows = dataclasses.replace(rows, history_values=torch.zeros(0, dtype=torch.long),
                                   history_offsets=torch.zeros(len(rows) + 1, dtype=torch.long))
    index_dir = None
    if hasattr(model, "item_vector"):
        index_dir = out.parent / f"{name}-index"
        build_item_index(model, prepared, features, index_dir, kind="flat")
    path = bundle.write_bundle(
        model, out, model_name=name, features={}, vocab_dir=prepared / "vocab", config={}, metrics={},
        data_fingerprint={}, parity_inputs=(rows.categorical, rows.numeric, rows.history_values, rows.history_offsets),
        item_index_dir=index_dir, item_features=item_catalog(prepared, features).numpy(),
        formats=("torchscript", "onnx"))
    return model, path


def _slices(test: SplitData) -> list[tuple[torch.Tensor, ...]]:
    """Held-out rows the export never saw (it traced and checked the first 300), in several batch sizes."""
    start = min(300, len(test) - 1)
    out = []
    for size in BATCHES:
        stop = len(test) if size is None else min(start + size, len(test))
        batch = test.batch(torch.arange(start, stop))
        out.append((batch.categorical, batch.numeric, batch.history_values, batch.history_offsets))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eager_torchscript_and_onnx_agree(name: str, prepared: Path, tmp_path: Path) -> None:
    model, path = _export(name, prepared, tmp_path / name)
    manifest = bundle.read_manifest(path)
    assert manifest["formats"] == ["torchscript", "onnx"]
    assert max(manifest["onnx"]["parity_max_abs_diff"].values()) <= ATOL
    scripted = bundle.load_bundle(path)
    onnx = bundle.load_bundle(path, runtime="onnx", onnx_threads=1)
    assert scripted.onnx is None and onnx.onnx is not None
    test = SplitData.load(prepared, "test")
    sizes = []
    for inputs in _slices(test):
        with torch.no_grad():
            eager = model(*inputs)
        sizes.append(len(eager))
        assert len(eager) == 1 or eager.std() > 1e-2  # outputs that vary with the input, far above ATOL
        torch.testing.assert_close(scripted.score(*inputs), eager, atol=ATOL, rtol=0)
        torch.testing.assert_close(onnx.score(*inputs), eager, atol=ATOL, rtol=0)
        if hasattr(model, "item_vector"):
            with torch.no_grad():
                users = model.user_vector(*inputs)
            torch.testing.assert_close(scripted.user_vector(*inputs), users, atol=ATOL, rtol=0)
            torch.testing.assert_close(onnx.user_vector(*inputs), users, atol=ATOL, rtol=0)
    assert manifest["onnx"]["export_batch"] not in sizes and len(set(sizes)) == len(BATCHES)
    for graph in manifest["onnx"]["files"]:
        # Ragged pooling exports as gathers and scatter-adds, not as an ONNX Loop over users or bags.
        ops = {node.op_type for node in onnx_format.load(str(path / graph)).graph.node}
        assert "Loop" not in ops and "If" not in ops, (graph, sorted(ops))


def test_onnx_din_uses_the_history_and_scores_without_one(prepared: Path, tmp_path: Path) -> None:
    """A traced graph keeps the branches its example took: the DIN graph must still attend over
    histories (several rows per user, summed with duplicate indices), and take none at all."""
    model, path = _export("din", prepared, tmp_path / "din")
    parity = bundle.read_manifest(path)["onnx"]["parity_max_abs_diff"]
    assert set(parity) == {"logits", "logits_without_history"} and max(parity.values()) <= ATOL
    onnx = bundle.load_bundle(path, runtime="onnx")
    test = SplitData.load(prepared, "test")
    batch = test.batch(torch.arange(len(test)))
    lengths = batch.history_offsets[1:] - batch.history_offsets[:-1]
    assert (lengths > 1).sum() > 10  # the rows below really have multi-row histories
    with_history = onnx.score(batch.categorical, batch.numeric, batch.history_values, batch.history_offsets)
    without = onnx.score(batch.categorical, batch.numeric)
    with torch.no_grad():
        torch.testing.assert_close(without, model(batch.categorical, batch.numeric), atol=ATOL, rtol=0)
    assert (with_history - without)[lengths > 0].abs().min() > 0


def test_onnx_din_traced_on_rows_without_histories_still_attends(prepared: Path, tmp_path: Path) -> None:
    """Held-out rows with no histories at all must not export a graph that ignores histories."""
    model, path = _export("din", prepared, tmp_path / "din", with_history=False)
    assert set(bundle.read_manifest(path)["onnx"]["parity_max_abs_diff"]) == {"logits"}
    onnx = bundle.load_bundle(path, runtime="onnx")
    test = SplitData.load(prepared, "test")
    batch = test.batch(torch.arange(len(test)))
    inputs = (batch.categorical, batch.numeric, batch.history_values, batch.history_offsets)
    with torch.no_grad():
        torch.testing.assert_close(onnx.score(*inputs), model(*inputs), atol=ATOL, rtol=0)


def test_onnx_runtime_needs_an_onnx_export(prepared: Path, tmp_path: Path) -> None:
    model = _model("dnn", prepared)
    test = SplitData.load(prepared, "test").batch(torch.arange(16))
    path = bundle.write_bundle(model, tmp_path / "b", model_name="dnn", features={}, vocab_dir=prepared / "vocab",
                               config={}, metrics={}, data_fingerprint={},
                               parity_inputs=(test.categorical, test.numeric, None, None))
    manifest = bundle.read_manifest(path)
    assert manifest["formats"] == ["torchscript"] and manifest["onnx"] is None
    assert not (path / bundle.ONNX_FILE).exists()
    with pytest.raises(bundle.BundleError, match=r"no model\.onnx.*--format onnx"):
        bundle.load_bundle(path, runtime="onnx")
    assert np.isfinite(bundle.load_bundle(path).score(test.categorical, test.numeric).numpy()).all()
