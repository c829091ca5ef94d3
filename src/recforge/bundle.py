"""Self-contained model bundles: what a server needs to score, in one checksummed directory.

A bundle holds the model as TorchScript (so loading it needs no model code), the vocabularies
that turn raw ids into embedding rows, the feature layout, the resolved run config, the
evaluation results, a fingerprint of the data and of the environment it came from, and, for a
retrieval model, its FAISS item index and item catalog. `manifest.json` lists every file with its
sha256 and is written last; the whole directory is built under a temporary sibling name and
renamed into place, so a reader never sees a half-written bundle.

Loading (`load_bundle`) needs torch (plus numpy, and faiss for a retrieval bundle) and nothing of
recforge's training side: the server imports this module, so its imports stay to the leaves and
the index, and the writing side takes an already-built eager model as an argument.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recforge.runtime import env_fingerprint
from recforge.storage import read_json, save_array, sha256_file, write_json

if TYPE_CHECKING:
    from recforge.index import ItemIndex

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
INDEX_DIR = "index"
ITEM_FEATURES_FILE = "item_features.npy"
# The vocabulary file format this module reads (recforge.data.vocab writes it).
VOCAB_SCHEMA_VERSION = 1
PARITY_ATOL = 1e-5


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

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


@dataclass
class Bundle:
    """A loaded, verified bundle: the scripted model and everything needed to feed it."""

    path: Path
    manifest: dict[str, Any]
    module: torch.jit.ScriptModule
    features: dict[str, Any]
    vocab: dict[str, VocabTable]
    config: dict[str, Any]
    index: ItemIndex | None = None
    item_features: np.ndarray | None = None

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
        """Logits [B] for encoded rows, in one batched call without autograd."""
        with torch.no_grad():
            return self.module(categorical, numeric, history_values, history_offsets)


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


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise BundleError(f"export parity failed: scripted output shape {tuple(b.shape)} != eager {tuple(a.shape)}")
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


def _manifest_files(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): sha256_file(path)
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST}


def write_bundle(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    model_name: str,
    features: Mapping[str, Any],
    vocab_dir: Path,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data_fingerprint: Mapping[str, Any],
    parity_inputs: ModelInputs,
    item_index_dir: Path | None = None,
    item_features: np.ndarray | None = None,
) -> Path:
    """Script `model`, check it against the eager model on `parity_inputs`, write the bundle.

    A retrieval bundle is one given `item_index_dir` (the FAISS index built from this model's item
    tower) and `item_features` (the item catalog the index rows come from). Returns `out_dir`,
    which must not exist yet: a bundle is immutable once written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; bundles are never overwritten, choose another --out")
    if (item_index_dir is None) != (item_features is None):
        raise ValueError("a retrieval bundle needs both item_index_dir and item_features")
    vocab_files = sorted(Path(vocab_dir).glob("*.json"))
    if not vocab_files:
        raise FileNotFoundError(f"no vocabulary files (*.json) in {vocab_dir}")
    model = model.cpu().eval()
    scripted = torch.jit.script(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        # mkdtemp creates 0700; a bundle is read by whoever serves it, so give it ordinary permissions.
        os.chmod(tmp, 0o777 & ~_UMASK)
        torch.jit.save(scripted, str(tmp / MODEL_FILE))
        # Parity is checked on the module read back from disk: that file is what will serve.
        parity = _check_parity(model, torch.jit.load(str(tmp / MODEL_FILE), map_location="cpu"),
                               parity_inputs, item_features)
        (tmp / "vocab").mkdir()
        for path in vocab_files:
            shutil.copyfile(path, tmp / "vocab" / path.name)
        write_json(tmp / "features.json", dict(features))
        write_json(tmp / "config.json", dict(config))
        write_json(tmp / "metrics.json", dict(metrics))
        write_json(tmp / "data.json", dict(data_fingerprint))
        write_json(tmp / "env.json", env_fingerprint())
        if item_index_dir is not None and item_features is not None:
            shutil.copytree(item_index_dir, tmp / INDEX_DIR)
            save_array(tmp / ITEM_FEATURES_FILE, item_features)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "retrieval" if item_index_dir is not None else "ranker",
            "model_name": model_name,
            "created_unix": int(time.time()),
            "parity_max_abs_diff": parity,
            "files": _manifest_files(tmp),
        }
        write_json(tmp / MANIFEST, manifest)  # last: its presence means the rest is complete
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the bundle at `path`, refused if missing or of a version this code cannot read."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a bundle: {MANIFEST} is missing (export it with `recforge export`)")
    manifest = read_json(manifest_path)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{manifest_path} has schema_version {version!r}; this recforge reads bundle "
                          f"schema_version {SCHEMA_VERSION}")
    return manifest


def verify_bundle(path: Path, manifest: Mapping[str, Any]) -> None:
    """Every file the manifest lists must exist and hash to its recorded sha256."""
    root = Path(path)
    for name, expected in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle {root} is incomplete: {name} is listed in {MANIFEST} but missing")
        found = sha256_file(file)
        if found != expected:
            raise BundleError(f"bundle {root}: {name} does not match {MANIFEST} (sha256 expected {expected}, "
                              f"found {found}); the bundle is corrupt or was modified")


def _load_vocab(directory: Path) -> dict[str, VocabTable]:
    tables: dict[str, VocabTable] = {}
    for path in sorted(directory.glob("*.json")):
        data = read_json(path)
        if data.get("schema_version") != VOCAB_SCHEMA_VERSION:
            raise BundleError(f"{path} has vocabulary schema_version {data.get('schema_version')!r}; "
                              f"this recforge reads {VOCAB_SCHEMA_VERSION}")
        keys = data.get("keys")
        tables[data["field"]] = VocabTable(field=data["field"], keys=None if keys is None else tuple(keys),
                                           hash_buckets=data.get("hash_buckets"))
    return tables


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle; any file that differs from the manifest is refused before use."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_bundle(root, manifest)
    module = torch.jit.load(str(root / MODEL_FILE), map_location="cpu")
    module.eval()
    index = None
    item_features = None
    if manifest["kind"] == "retrieval":
        # Only a retrieval bundle needs faiss; a ranker loads without it.
        from recforge.index import ItemIndex

        index = ItemIndex.load(root / INDEX_DIR)
        item_features = np.load(root / ITEM_FEATURES_FILE, allow_pickle=False)
    return Bundle(path=root, manifest=manifest, module=module, features=read_json(root / "features.json"),
                  vocab=_load_vocab(root / "vocab"), config=read_json(root / "config.json"), index=index,
                  item_features=item_features)
