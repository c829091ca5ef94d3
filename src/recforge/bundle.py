"""Self-contained model bundles: what a server needs to score, in one checksummed directory.

A bundle holds the model as TorchScript (so loading it needs no model code), the vocabularies
that turn raw ids into embedding rows, the feature layout, the resolved run config, the
evaluation results, a fingerprint of the data and of the environment it came from, and, for a
retrieval model, its FAISS item index. Every bundle also carries what a server needs to score raw ids
without the training data: the item catalog (each item row's item-side features) and popularity
counts from the training positives (overall and per context value) for cold start. Optionally the
model is also exported as ONNX (for a two-tower model, its user tower too), checked against the
eager model with onnxruntime at export time. `manifest.json` lists every file with its sha256 and
is written last; which files must be listed follows from the schema (`required_files`), every listed
name stays inside the bundle, and loading reads only listed files (vocabularies too are enumerated
from the manifest), so a file dropped in beside them is never used. The whole directory is built
under a temporary sibling name and renamed into place, so a reader never sees a half-written bundle.

Loading (`load_bundle`) needs torch (plus numpy, and faiss for a retrieval bundle) and nothing of
recforge's training side: the server imports this module, so its imports stay to the leaves and
the index, and the writing side takes an already-built eager model as an argument. onnxruntime is
imported only when an ONNX runtime is asked for, so torch-only loading keeps working without it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.runtime import env_fingerprint
from recforge.storage import (
    StorageError,
    check_relative,
    current_umask,
    read_json,
    refuse_links,
    save_array,
    sha256_file,
    write_json,
)

if TYPE_CHECKING:
    from recforge.index import ItemIndex

# Schema 2: every bundle carries the item catalog and popularity tables; ONNX is optional. Schema 1
# bundles (catalog only for retrieval, no popularity, no ONNX) still load.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
USER_TOWER_ONNX_FILE = "user_tower.onnx"
INDEX_DIR = "index"
ITEM_FEATURES_FILE = "item_features.npy"
POPULARITY_DIR = "popularity"
POPULARITY_OVERALL = "overall"
VOCAB_DIR = "vocab"
# Files every bundle of every readable schema has; what else it needs follows from its manifest
# (kind, catalog, popularity, ONNX graphs). Nothing a loader reads may be missing from the manifest.
BASE_FILES = (MODEL_FILE, "features.json", "config.json", "metrics.json", "data.json", "env.json")
# recforge.index's META_FILE and INDEX_FILE under INDEX_DIR (not imported: that module needs faiss).
INDEX_FILES = (f"{INDEX_DIR}/index.json", f"{INDEX_DIR}/index.faiss")
FORMATS = ("torchscript", "onnx")
# The vocabulary file format this module reads (recforge.data.vocab writes it).
VOCAB_SCHEMA_VERSION = 1
PARITY_ATOL = 1e-5
ONNX_OPSET = 17
# Every ONNX graph is called with these inputs (those it does not use are dropped by the exporter).
# The ragged history is always given: empty values and all-zero offsets [B + 1] for no history.
ONNX_INPUTS = ("categorical", "numeric", "history_values", "history_offsets")
# The batch the ONNX graph is traced with; parity then runs on a different batch size, which is
# what proves the exported batch dimension is really dynamic.
ONNX_EXPORT_BATCH = 8


_UMASK = current_umask()

ModelInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class BundleError(ValueError):
    """A bundle that cannot be trusted or read: tampered, torn, or of an unknown version."""


@dataclass(frozen=True)
class VocabTable:
    """One field's raw id -> embedding row lookup, read from the vocabulary JSON.

    A copy of the rule in recforge.data.vocab (row i+1 for keys[i], 0 for unknown; hashed fields
    1 + blake2b-64 % buckets) kept here so that serving does not pull in pyarrow and the data layer.
    """

    field: str
    keys: tuple[str, ...] | None
    hash_buckets: int | None

    @property
    def size(self) -> int:
        """Embedding rows, the unknown row included."""
        return (len(self.keys) if self.keys is not None else int(self.hash_buckets or 0)) + 1

    def lookup(self, values: Sequence[str | None]) -> list[int]:
        """Embedding rows for raw ids: 0 (unknown) for ids not in the vocabulary and for None."""
        if self.hash_buckets is not None:
            return [0 if v is None else 1 + int.from_bytes(
                hashlib.blake2b(str(v).encode("utf-8"), digest_size=8).digest(), "little") % self.hash_buckets
                for v in values]
        positions = self._positions
        return [0 if v is None else positions.get(str(v), 0) for v in values]

    @property
    def _positions(self) -> dict[str, int]:
        cached = self.__dict__.get("_positions_cache")
        if cached is None:
            cached = {key: i + 1 for i, key in enumerate(self.keys or ())}
            object.__setattr__(self, "_positions_cache", cached)
        return cached


def _ragged_or_empty(batch: int, history_values: torch.Tensor | None,
                     history_offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The history as the ONNX graphs take it: given, or empty (no rows, offsets all zero)."""
    if history_values is not None and history_offsets is not None and history_offsets.numel() == batch + 1:
        return history_values, history_offsets
    return torch.zeros(0, dtype=torch.long), torch.zeros(batch + 1, dtype=torch.long)


class OnnxGraph:
    """One onnxruntime session over an exported graph, fed by name with the inputs it declares."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BundleError(f"runtime 'onnx' needs the onnxruntime package to read {path} "
                              "(pip install onnxruntime), or load with runtime='torchscript'") from exc
        options = onnxruntime.SessionOptions()
        # Errors only: graph-optimizer notes about loop subgraphs are warnings, not problems of the bundle.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def __call__(self, categorical: torch.Tensor, numeric: torch.Tensor, history_values: torch.Tensor | None = None,
                 history_offsets: torch.Tensor | None = None) -> torch.Tensor:
        values, offsets = _ragged_or_empty(categorical.shape[0], history_values, history_offsets)
        given = {"categorical": categorical, "numeric": numeric, "history_values": values, "history_offsets": offsets}
        feed = {name: given[name].detach().cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])


@dataclass
class Bundle:
    """A loaded, verified bundle: the scripted model (and, if asked, its ONNX sessions) and everything
    needed to feed it: vocabularies, the item catalog and cold-start popularity tables."""

    path: Path
    manifest: dict[str, Any]
    module: torch.jit.ScriptModule
    features: dict[str, Any]
    vocab: dict[str, VocabTable]
    config: dict[str, Any]
    index: ItemIndex | None = None
    # int64 [item rows, 1 + item feature columns]; row i = item vocabulary row i (0 = unknown item).
    item_features: np.ndarray | None = None
    # "overall": float32 [item rows]; "<context field>": float32 [field rows, item rows]. Empty for schema 1.
    popularity: dict[str, np.ndarray] = field(default_factory=dict)
    runtime: str = "torchscript"
    onnx: OnnxGraph | None = None
    onnx_user_tower: OnnxGraph | None = None

    @property
    def layout(self) -> FeatureLayout:
        """The feature layout the model was trained on (features.json, read in any version it was written in)."""
        return FeatureLayout.from_dict(self.features, str(self.path / FEATURES_FILE))

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    def score(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: torch.Tensor | None = None,
        history_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B] for encoded rows, in one batched call without autograd, on the loaded runtime."""
        if self.onnx is not None:
            return self.onnx(categorical, numeric, history_values, history_offsets)
        with torch.no_grad():
            return self.module(categorical, numeric, history_values, history_offsets)

    def user_vector(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: torch.Tensor | None = None,
        history_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User-tower vectors [B, D] of a retrieval bundle (what a request is searched with)."""
        if self.kind != "retrieval":
            raise BundleError(f"bundle {self.path} is a {self.kind}; only a retrieval bundle has a user tower")
        if self.onnx_user_tower is not None:
            return self.onnx_user_tower(categorical, numeric, history_values, history_offsets)
        with torch.no_grad():
            return self.module.user_vector(categorical, numeric, history_values, history_offsets)


def data_fingerprint(prepared_meta: Mapping[str, Any]) -> dict[str, Any]:
    """What data a model was trained on, from a prepared dataset's meta.json: enough to tell two
    bundles' data apart (and to find the source again) without shipping the data."""
    split = prepared_meta.get("split", {})
    source = prepared_meta.get("source", {}) or {}
    return {
        "rows": prepared_meta.get("rows"),
        "prepared_created_unix": prepared_meta.get("created_unix"),
        "split": {name: {k: split[name].get(k) for k in ("rows", "time_min", "time_max")}
                  for name in ("train", "valid", "test") if isinstance(split.get(name), Mapping)},
        "source": {"path": source.get("path"), "format": source.get("format"), "files": source.get("files", [])},
    }


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, what: str = "scripted") -> float:
    if a.shape != b.shape:
        raise BundleError(f"export parity failed: {what} output shape {tuple(b.shape)} != eager {tuple(a.shape)}")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _check_parity(eager: torch.nn.Module, scripted: torch.jit.ScriptModule, inputs: ModelInputs,
                  item_features: np.ndarray | None) -> dict[str, float]:
    """Scripting can silently change semantics (e.g. an Optional branch); refuse such an export."""
    with torch.no_grad():
        diffs = {"logits": _max_abs_diff(eager(*inputs), scripted(*inputs))}
        if item_features is not None and hasattr(eager, "item_vector"):
            catalog = torch.from_numpy(np.ascontiguousarray(item_features))
            diffs["item_vectors"] = _max_abs_diff(eager.item_vector(catalog), scripted.item_vector(catalog))
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_ATOL}
    if bad:
        raise BundleError(f"export parity failed: scripted model differs from eager by {bad} (atol {PARITY_ATOL})")
    return diffs


# --- ONNX export -------------------------------------------------------------------------------


class _OnnxEntry(torch.nn.Module):
    """A fixed four-tensor signature over one of the model's methods, so every graph has the same inputs."""

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor, history_values: torch.Tensor,
                history_offsets: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(categorical, numeric, history_values, history_offsets)


def _onnx_index_add(g: Any, self: Any, dim: Any, index: Any, source: Any, alpha: Any = None) -> Any:
    """aten::index_add along dim 0 as ScatterND(reduction="add").

    The stock symbolic emits a plain scatter, which keeps only the last of duplicate indices; DIN's
    attention sums each user's many history rows with index_add, so duplicates are the norm there.
    ScatterND adds whole rows (not element by element, as ScatterElements would), which is what
    makes it fast in onnxruntime.
    """
    from torch.onnx import symbolic_helper

    if symbolic_helper._get_const(dim, "i", "dim") != 0:
        raise BundleError("ONNX export supports index_add along dim 0 only")
    return _scatter_add_rows(g, self, index, source)


def _scatter_add_rows(g: Any, data: Any, rows: Any, updates: Any) -> Any:
    """data[rows[i]] += updates[i] for every i, duplicates summed."""
    last = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.long))
    return g.op("ScatterND", data, g.op("Unsqueeze", rows, last), updates, reduction_s="add")


def _segment_owner(g: Any, starts: Any, total: Any) -> Any:
    """For ragged rows [0, total) cut into segments starting at `starts` (non-decreasing, from 0):
    each row's segment, as a cumulative sum of segment-start marks. The stock exports of
    repeat_interleave and embedding_bag loop over segments in an ONNX Loop; this stays vectorized."""
    one = g.op("Constant", value_t=torch.tensor([1], dtype=torch.long))
    tail = g.op("Slice", starts, one, g.op("Constant", value_t=torch.tensor([2**62], dtype=torch.long)))
    marks = g.op("ConstantOfShape", g.op("Add", total, one), value_t=torch.tensor([0], dtype=torch.long))
    ones = g.op("ConstantOfShape", g.op("Shape", tail), value_t=torch.tensor([1], dtype=torch.long))
    marks = g.op("ScatterElements", marks, tail, ones, axis_i=0, reduction_s="add")
    owner = g.op("CumSum", marks, g.op("Constant", value_t=torch.tensor(0, dtype=torch.long)))
    zero = g.op("Constant", value_t=torch.tensor([0], dtype=torch.long))
    return g.op("Slice", owner, zero, total)


def _onnx_repeat_interleave(g: Any, self: Any, repeats: Any, dim: Any = None, output_size: Any = None) -> Any:
    """aten::repeat_interleave of a 1-d tensor by per-element counts (DIN's row -> user map), loop-free."""
    from torch.onnx import symbolic_helper

    if symbolic_helper._get_tensor_rank(self) != 1 or symbolic_helper._get_tensor_rank(repeats) != 1:
        raise BundleError("ONNX export supports repeat_interleave of a 1-d tensor by a 1-d repeats tensor only")
    zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.long))
    starts = g.op("CumSum", repeats, zero, exclusive_i=1)
    total = g.op("ReduceSum", repeats, g.op("Constant", value_t=torch.tensor([0], dtype=torch.long)), keepdims_i=1)
    return g.op("Gather", self, _segment_owner(g, starts, total), axis_i=0)


def _onnx_embedding_bag(g: Any, weight: Any, indices: Any, offsets: Any, scale_grad_by_freq: Any, mode: Any,
                        sparse: Any, per_sample_weights: Any, include_last_offset: Any,
                        padding_idx: Any = None) -> tuple[Any, None, None, None]:
    """aten::embedding_bag (sum or mean, 1-d indices + offsets) as one gather and one scatter-add,
    instead of the stock export's Loop over bags (the two-tower user tower's history pooling)."""
    from torch.onnx import symbolic_helper

    mode = symbolic_helper._maybe_get_const(mode, "i")
    last = symbolic_helper._maybe_get_const(include_last_offset, "i")
    pad = None if symbolic_helper._is_none(padding_idx) else symbolic_helper._maybe_get_const(padding_idx, "i")
    if mode not in (0, 1) or last or not symbolic_helper._is_none(per_sample_weights) or (pad is not None and pad >= 0):
        raise BundleError("ONNX export supports embedding_bag in sum or mean mode without per-sample weights, "
                          "include_last_offset or padding_idx only")
    total = g.op("Shape", indices)
    rows = g.op("Gather", weight, indices, axis_i=0)
    owner = _segment_owner(g, offsets, total)
    one = g.op("Constant", value_t=torch.tensor([1], dtype=torch.long))
    out_shape = g.op("Concat", g.op("Shape", offsets), g.op("Slice", g.op("Shape", weight), one,
                                                           g.op("Constant", value_t=torch.tensor([2]))), axis_i=0)
    zeros = g.op("ConstantOfShape", out_shape, value_t=torch.tensor([0.0]))
    pooled = _scatter_add_rows(g, zeros, owner, rows)
    if mode == 1:  # mean; an empty bag stays all zeros, as in torch
        ends = g.op("Concat", g.op("Slice", offsets, one, g.op("Constant", value_t=torch.tensor([2**62]))), total,
                    axis_i=0)
        counts = g.op("Cast", g.op("Sub", ends, offsets), to_i=int(torch.onnx.TensorProtoDataType.FLOAT))
        counts = g.op("Max", counts, g.op("Constant", value_t=torch.tensor(1.0)))
        pooled = g.op("Div", pooled, g.op("Unsqueeze", counts, one))
    return pooled, None, None, None


# The exporter's stock translations these replace: one wrong with duplicate indices, two looping.
_ONNX_SYMBOLICS = {"aten::index_add": _onnx_index_add, "aten::repeat_interleave": _onnx_repeat_interleave,
                   "aten::embedding_bag": _onnx_embedding_bag}


def _export_example(inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few rows to trace with, the longest histories first: a traced graph keeps the branches its
    example took, so an example whose histories are all empty would export a history-blind model."""
    from recforge.arrays import gather_ragged

    categorical, numeric, values, offsets = inputs
    batch = categorical.shape[0]
    values, offsets = _ragged_or_empty(batch, values, offsets)
    rows = torch.argsort(offsets[1:] - offsets[:-1], descending=True, stable=True)[:min(ONNX_EXPORT_BATCH, batch)]
    example_values, example_offsets = gather_ragged(values, offsets, rows)
    if example_values.numel() == 0:
        # No held-out row has a history: give the first example row one (the unknown item, row 0) so
        # the traced graph still takes the history path that real requests with histories need.
        example_values = torch.zeros(1, dtype=torch.long)
        example_offsets = example_offsets + (torch.arange(len(example_offsets)) > 0).long()
    return categorical[rows], numeric[rows], example_values, example_offsets


def _export_onnx(model: torch.nn.Module, method: str, path: Path, inputs: ModelInputs) -> None:
    import warnings

    entry = _OnnxEntry(model, method).eval()
    batch_dims = {"categorical": {0: "batch"}, "numeric": {0: "batch"}, "history_values": {0: "history_rows"},
                  "history_offsets": {0: "batch_plus_1"}, "output": {0: "batch"}}
    for name, symbolic in _ONNX_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, ONNX_OPSET)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about every shape check it freezes; parity below is the real check.
            warnings.simplefilter("ignore")
            torch.onnx.export(entry, _export_example(inputs), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=list(ONNX_INPUTS), output_names=["output"], dynamic_axes=batch_dims)
    finally:
        for name in _ONNX_SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, ONNX_OPSET)
        model.eval()  # export restores the wrapper's (training) mode onto the model; serving is eval


def _onnx_parity(model: torch.nn.Module, graphs: Mapping[str, tuple[str, Path]],
                 inputs: ModelInputs) -> dict[str, float]:
    """Each ONNX graph run by onnxruntime on all held-out rows (a batch size other than the traced
    one), with their histories and without, against the eager method it was exported from."""
    categorical, numeric, values, offsets = inputs
    values, offsets = _ragged_or_empty(categorical.shape[0], values, offsets)
    cases = {"": (values, offsets)}
    if values.numel():  # also as requests of users without a history (new users) arrive
        cases["_without_history"] = _ragged_or_empty(categorical.shape[0], None, None)
    diffs: dict[str, float] = {}
    for name, (method, path) in graphs.items():
        graph = OnnxGraph(path)
        for suffix, (case_values, case_offsets) in cases.items():
            with torch.no_grad():
                expected = getattr(model, method)(categorical, numeric, case_values, case_offsets)
            found = graph(categorical, numeric, case_values, case_offsets)
            diffs[name + suffix] = _max_abs_diff(expected, found, "onnx")
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_ATOL}
    if bad:
        raise BundleError(f"export parity failed: onnxruntime output differs from eager by {bad} "
                          f"(atol {PARITY_ATOL})")
    return diffs


# --- writing -----------------------------------------------------------------------------------


def _manifest_files(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): sha256_file(path)
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _check_tables(item_features: np.ndarray | None, popularity: Mapping[str, np.ndarray]) -> None:
    if item_features is not None and (item_features.ndim != 2 or item_features.dtype != np.int64):
        raise ValueError(f"item_features must be int64 [item rows, columns], got {item_features.dtype} "
                         f"{item_features.shape}")
    overall = popularity.get(POPULARITY_OVERALL)
    if popularity and overall is None:
        raise ValueError(f"popularity tables need an '{POPULARITY_OVERALL}' table")
    for name, table in popularity.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"popularity table name {name!r} cannot be a file name")
        expected_ndim = 1 if name == POPULARITY_OVERALL else 2
        if table.ndim != expected_ndim or (overall is not None and table.shape[-1] != overall.shape[0]):
            raise ValueError(f"popularity table '{name}' has shape {table.shape}; expected {expected_ndim}-d with "
                             f"{overall.shape[0] if overall is not None else '?'} item rows last")
        if item_features is not None and table.shape[-1] != item_features.shape[0]:
            raise ValueError(f"popularity table '{name}' covers {table.shape[-1]} item rows but the item catalog "
                             f"has {item_features.shape[0]}")


def write_bundle(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    model_name: str,
    features: FeatureLayout | Mapping[str, Any],
    vocab_dir: Path,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_fingerprint: Mapping[str, Any],
    parity_inputs: ModelInputs,
    item_index_dir: Path | None = None,
    item_features: np.ndarray | None = None,
    popularity: Mapping[str, np.ndarray] | None = None,
    formats: Sequence[str] = ("torchscript",),
) -> Path:
    """Script `model` (and, with "onnx" in `formats`, export it to ONNX), check each form against the
    eager model on `parity_inputs`, write the bundle.

    A retrieval bundle is one given `item_index_dir` (the FAISS index built from this model's item
    tower); it needs `item_features` (the item catalog the index rows come from), which any bundle
    may carry for serving. `popularity` maps "overall" and context field names to count tables.
    Returns `out_dir`, which must not exist yet: a bundle is immutable once written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; bundles are never overwritten, choose another --out")
    if item_index_dir is not None and item_features is None:
        raise ValueError("a retrieval bundle needs item_features (the catalog its index rows come from)")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or "torchscript" not in formats:
        raise ValueError(f"formats must include 'torchscript' and be among {FORMATS}, got {list(formats)}")
    popularity = dict(popularity or {})
    _check_tables(item_features, popularity)
    vocab_paths = sorted(Path(vocab_dir).glob("*.json"))
    if not vocab_paths:
        raise FileNotFoundError(f"no vocabulary files (*.json) in {vocab_dir}")
    model = model.cpu().eval()
    scripted = torch.jit.script(model)
    retrieval = item_index_dir is not None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        # mkdtemp creates 0700; a bundle is read by whoever serves it, so give it ordinary permissions.
        os.chmod(tmp, 0o777 & ~_UMASK)
        torch.jit.save(scripted, str(tmp / MODEL_FILE))
        # Parity is checked on the module read back from disk: that file is what will serve.
        parity = _check_parity(model, torch.jit.load(str(tmp / MODEL_FILE), map_location="cpu"),
                               parity_inputs, item_features)
        onnx_manifest = None
        if "onnx" in formats:
            graphs = {"logits": ("forward", tmp / ONNX_FILE)}
            if retrieval:
                graphs["user_vectors"] = ("user_vector", tmp / USER_TOWER_ONNX_FILE)
            for method, path in graphs.values():
                _export_onnx(model, method, path, parity_inputs)
            import onnxruntime

            onnx_manifest = {
                "opset": ONNX_OPSET, "inputs": list(ONNX_INPUTS), "export_batch": ONNX_EXPORT_BATCH,
                "files": {path.name: method for method, path in graphs.values()},
                "parity_rows": int(parity_inputs[0].shape[0]), "onnxruntime": onnxruntime.__version__,
                "parity_max_abs_diff": _onnx_parity(model, graphs, parity_inputs),
            }
        (tmp / VOCAB_DIR).mkdir()
        for path in vocab_paths:
            shutil.copyfile(path, tmp / VOCAB_DIR / path.name)
        write_json(tmp / FEATURES_FILE, features.to_dict() if isinstance(features, FeatureLayout) else dict(features))
        write_json(tmp / "config.json", dict(config))
        write_json(tmp / "metrics.json", dict(metrics))
        write_json(tmp / "data.json", dict(data_fingerprint))
        write_json(tmp / "env.json", env_fingerprint())
        if retrieval:
            shutil.copytree(item_index_dir, tmp / INDEX_DIR)
        if item_features is not None:
            save_array(tmp / ITEM_FEATURES_FILE, item_features)
        for name, table in popularity.items():
            save_array(tmp / POPULARITY_DIR / f"{name}.npy", table.astype(np.float32, copy=False))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "retrieval" if retrieval else "ranker",
            "model_name": model_name,
            "created_unix": int(time.time()),
            "formats": [f for f in FORMATS if f in formats],
            "parity_max_abs_diff": parity,
            "onnx": onnx_manifest,
            "item_features": ITEM_FEATURES_FILE if item_features is not None else None,
            "popularity": {name: f"{POPULARITY_DIR}/{name}.npy" for name in popularity},
            "files": _manifest_files(tmp),
        }
        write_json(tmp / MANIFEST, manifest)  # last: its presence means the rest is complete
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- reading -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, refused if missing or of a version this code cannot read."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a bundle: {MANIFEST} is missing (export it with `recforge export`)")
    manifest = read_json(manifest_path)
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
        raise BundleError(f"{manifest_path} has schema_version {version!r}; this recforge reads bundle "
                          f"schema_version {readable}")
    return manifest


def vocab_files(manifest: Mapping[str, Any]) -> list[str]:
    """The vocabulary files a bundle has: those its manifest lists under vocab/ (never a directory glob,
    which would pick up any file dropped in beside them)."""
    files = manifest.get("files")
    return sorted(name for name in files if name.startswith(f"{VOCAB_DIR}/") and name.endswith(".json")
                  and name.count("/") == 1) if isinstance(files, Mapping) else []


def required_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every file a loader reads from this bundle: fixed by its schema, kind and the tables it names."""
    kind = manifest.get("kind")
    required = list(BASE_FILES)
    if kind == "retrieval":
        required += INDEX_FILES
    # Schema 1 kept the catalog in retrieval bundles only, unnamed in the manifest.
    catalog = manifest.get("item_features", ITEM_FEATURES_FILE if kind == "retrieval" else None)
    if catalog:
        required.append(str(catalog))
    required += [str(f) for f in (manifest.get("popularity") or {}).values()]
    required += [str(f) for f in ((manifest.get("onnx") or {}).get("files") or {})]
    return required


def verify_bundle(path: Path, manifest: Mapping[str, Any], *, exact: bool = False,
                  allowed_extra: Sequence[str] = ()) -> None:
    """Every file the bundle needs must be listed in the manifest, and every listed file must stay
    inside the bundle, exist and hash to its recorded sha256.

    With `exact`, the directory must hold nothing else (besides `allowed_extra`, such as a registry's
    own records) and no symbolic link: what is published or promoted is then exactly what was hashed.
    """
    root = Path(path)
    files = manifest.get("files")
    if not isinstance(files, Mapping):
        raise BundleError(f"bundle {root}: {MANIFEST} has no 'files' table")
    try:
        for name in files:
            check_relative(name, root / MANIFEST)
    except StorageError as exc:
        raise BundleError(str(exc)) from None
    missing = [name for name in required_files(manifest) if name not in files]
    if not vocab_files(manifest):
        missing.append(f"{VOCAB_DIR}/*.json")
    if missing:
        raise BundleError(f"bundle {root}: {MANIFEST} does not list {', '.join(missing)}, which a "
                          f"{manifest.get('kind')} bundle of schema {manifest.get('schema_version')} needs; "
                          "the bundle is incomplete or was modified")
    if exact:
        check_only_listed(root, manifest, allowed_extra)
    for name, expected in files.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle {root} is incomplete: {name} is listed in {MANIFEST} but missing")
        found = sha256_file(file)
        if found != expected:
            raise BundleError(f"bundle {root}: {name} does not match {MANIFEST} (sha256 expected {expected}, "
                              f"found {found}); the bundle is corrupt or was modified")


def check_only_listed(path: Path, manifest: Mapping[str, Any], allowed_extra: Sequence[str] = ()) -> None:
    """The bundle directory holds its manifest's files (and `allowed_extra`) and nothing else, and no
    symbolic link. Cheap (no hashing): publish runs it before load_bundle, which hashes."""
    root = Path(path)
    try:
        refuse_links(root)
    except StorageError as exc:
        raise BundleError(str(exc)) from None
    known = {*manifest.get("files", {}), MANIFEST, *allowed_extra}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in known)
    if extra:
        raise BundleError(f"bundle {root} holds files its {MANIFEST} does not list: {', '.join(extra[:5])}"
                          f"{' ...' if len(extra) > 5 else ''}; the bundle was modified")


def _load_vocab(root: Path, manifest: Mapping[str, Any]) -> dict[str, VocabTable]:
    tables: dict[str, VocabTable] = {}
    for name in vocab_files(manifest):
        path = root / name
        data = read_json(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("field"), str):
            raise BundleError(f"{path} is not a vocabulary (no 'field')")
        if data["field"] in tables:
            raise BundleError(f"{path} is a second vocabulary for field {data['field']!r}; a bundle has one per field")
        if data.get("schema_version") != VOCAB_SCHEMA_VERSION:
            raise BundleError(f"{path} has vocabulary schema_version {data.get('schema_version')!r}; "
                              f"this recforge reads {VOCAB_SCHEMA_VERSION}")
        keys = data.get("keys")
        tables[data["field"]] = VocabTable(field=data["field"], keys=None if keys is None else tuple(keys),
                                           hash_buckets=data.get("hash_buckets"))
    return tables


def _listed(root: Path, manifest: Mapping[str, Any], name: str) -> Path:
    """A file the manifest names, which verify_bundle has therefore hashed: nothing unlisted is read."""
    if name not in manifest["files"]:
        raise BundleError(f"bundle {root}: {name} is named in {MANIFEST} but not listed with a sha256")
    return root / name


def load_bundle(path: str | Path, runtime: str = "torchscript", *, onnx_threads: int | None = None) -> Bundle:
    """Read and verify a bundle; any file that differs from the manifest is refused before use.

    runtime="onnx" scores with onnxruntime sessions over the bundle's ONNX graphs (exported with
    `--format onnx`); the TorchScript module is loaded either way, as every bundle has it.
    """
    if runtime not in FORMATS:
        raise ValueError(f"runtime must be one of {FORMATS}, got {runtime!r}")
    root = Path(path)
    manifest = read_manifest(root)
    verify_bundle(root, manifest)
    module = torch.jit.load(str(root / MODEL_FILE), map_location="cpu")
    module.eval()
    index = None
    if manifest["kind"] == "retrieval":
        # Only a retrieval bundle needs faiss; a ranker loads without it.
        from recforge.index import ItemIndex

        index = ItemIndex.load(root / INDEX_DIR)
    # Schema 1 kept the catalog in retrieval bundles only, unnamed in the manifest.
    catalog = manifest.get("item_features", ITEM_FEATURES_FILE if manifest["kind"] == "retrieval" else None)
    item_features = np.load(_listed(root, manifest, catalog), allow_pickle=False) if catalog else None
    popularity = {name: np.load(_listed(root, manifest, file), allow_pickle=False)
                  for name, file in (manifest.get("popularity") or {}).items()}
    onnx = onnx_user_tower = None
    if runtime == "onnx":
        files = (manifest.get("onnx") or {}).get("files", {})
        if ONNX_FILE not in files:
            raise BundleError(f"bundle {root} has no {ONNX_FILE}; export it with `recforge export --format onnx` "
                              "or load it with runtime='torchscript'")
        onnx = OnnxGraph(_listed(root, manifest, ONNX_FILE), onnx_threads)
        if USER_TOWER_ONNX_FILE in files:
            onnx_user_tower = OnnxGraph(_listed(root, manifest, USER_TOWER_ONNX_FILE), onnx_threads)
    return Bundle(path=root, manifest=manifest, module=module, features=read_json(root / "features.json"),
                  vocab=_load_vocab(root, manifest), config=read_json(root / "config.json"), index=index,
                  item_features=item_features, popularity=popularity, runtime=runtime, onnx=onnx,
                  onnx_user_tower=onnx_user_tower)
