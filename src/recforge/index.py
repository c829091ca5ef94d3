"""FAISS item index: nearest items to a query vector over the whole catalog.

Retrieval scores every item for a user vector; exact search is one matrix product per query
batch, which is the right choice up to tens of thousands of items. Beyond that an approximate
index trades a little recall for a lot of speed: IVF (k-means cells, search the `nprobe`
nearest cells) or HNSW (a navigable small-world graph). Because "a little recall" is a number
that depends on the data, the build measures it: recall@k of the approximate index against
exact search, on a sample of item vectors used as queries, stored as `build_recall` and saved
with the index, so a bad index is visible before it serves.

Scores are always "higher is better": inner product, cosine similarity, or the negative squared
L2 distance, so results from any metric merge and rank the same way. Item ids are the row
numbers of the embedding matrix (the item vocabulary indices for a recforge model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from numpy.typing import ArrayLike, NDArray

from recforge.storage import atomic_open, read_json, sha256_file, write_json

SCHEMA_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "cosine", "l2")
# kind="auto" searches exactly below this many items: a flat scan of 50k vectors takes milliseconds
# per query batch and needs no training or tuning.
AUTO_FLAT_BELOW = 50_000

Kind = Literal["auto", "flat", "ivf", "hnsw"]
Metric = Literal["ip", "cosine", "l2"]


def _as_vectors(x: ArrayLike, name: str) -> NDArray[np.float32]:
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-d [n, dim] array, got shape {a.shape}")
    # A float64 sum of float32 values cannot overflow, so it is finite exactly when every value is;
    # unlike np.isfinite(a).all() it needs no catalog-sized temporary.
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN: still reported below, without a warning
        total = a.sum(dtype=np.float64)
    if not np.isfinite(total):
        raise ValueError(f"{name} contain NaN or infinite values")
    return a


def _normalized(x: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _default_nlist(count: int) -> int:
    # ~4 sqrt(n) cells is the usual FAISS guidance; k-means wants >= 39 training points per cell.
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


def _apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Search-time knobs are plain attributes; set them explicitly so a loaded index behaves as built."""
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


def _recall(approx_ids: NDArray[np.int64], exact_ids: NDArray[np.int64]) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k, vectorized (ids are row-wise distinct)."""
    k = exact_ids.shape[1]
    # Rows sorted side by side: a shared id appears exactly once in each row.
    both = np.concatenate([np.sort(approx_ids, axis=1), np.sort(exact_ids, axis=1)], axis=1)
    both.sort(axis=1)
    shared = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
    return float(shared.sum() / (exact_ids.shape[0] * k))


@dataclass
class ItemIndex:
    """A built (or loaded) FAISS index plus what it is: kind, metric, size and measured recall."""

    index: faiss.Index
    kind: str
    metric: str
    dim: int
    count: int
    params: dict[str, Any] = field(default_factory=dict)
    # recall@recall_k against exact search, measured at build time; 1.0 for flat (exact) indexes.
    build_recall: float = 1.0
    recall_k: int = 10

    @classmethod
    def build(
        cls,
        embeddings: ArrayLike,
        kind: Kind = "auto",
        metric: Metric = "ip",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        recall_queries: int = 1000,
        recall_k: int = 10,
        seed: int = 0,
    ) -> ItemIndex:
        """Index item vectors [num_items, dim] (row i is item i).

        kind: "flat" is exact; "ivf" and "hnsw" are approximate; "auto" is flat below
        AUTO_FLAT_BELOW items and HNSW above (good recall without training, at some memory).
        metric: "ip" (inner product, what a dot-product two-tower model scores), "cosine" (vectors
        and queries L2-normalized first), or "l2". For approximate kinds, `recall_queries` random
        items (seeded) are searched both ways to measure recall@recall_k.
        """
        x = _as_vectors(embeddings, "embeddings")
        if kind not in ("auto", *KINDS):
            raise ValueError(f"unknown index kind '{kind}'; choose one of auto, {', '.join(KINDS)}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
        if metric == "cosine":
            x = _normalized(x)
        count, dim = x.shape
        if kind == "auto":
            kind = "flat" if count < AUTO_FLAT_BELOW else "hnsw"
        faiss_metric = _faiss_metric(metric)
        params: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlat(dim, faiss_metric)
        elif kind == "ivf":
            nlist = _default_nlist(count) if nlist is None else nlist
            if not 1 <= nlist <= count:
                raise ValueError(f"nlist must lie in [1, {count}] (the number of items), got {nlist}")
            # Searching ~1/16 of the cells (at least 8) keeps recall high on clustered catalogs.
            nprobe = min(nlist, max(8, nlist // 16)) if nprobe is None else nprobe
            if not 1 <= nprobe <= nlist:
                raise ValueError(f"nprobe must lie in [1, nlist = {nlist}], got {nprobe}")
            quantizer = faiss.IndexFlat(dim, faiss_metric)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
            index.cp.seed = seed
            # k-means on at most 256 points per cell: FAISS subsamples beyond that anyway.
            rng = np.random.default_rng(seed)
            sample = x if count <= 256 * nlist else x[np.sort(rng.choice(count, 256 * nlist, replace=False))]
            index.train(sample)  # (the faiss wrapper keeps `quantizer` alive as long as `index`)
            params = {"nlist": nlist, "nprobe": nprobe}
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss_metric)
            index.hnsw.efConstruction = ef_construction
            params = {"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        index.add(x)
        _apply_search_params(index, kind, params)
        built = cls(index=index, kind=kind, metric=metric, dim=dim, count=count, params=params, recall_k=recall_k)
        if kind != "flat":
            built.build_recall = built.measure_recall(x, recall_queries, recall_k, seed)
        return built

    def measure_recall(self, embeddings: ArrayLike, queries: int = 1000, k: int = 10, seed: int = 0) -> float:
        """recall@k of this index against exact search, with `queries` random rows of `embeddings` as
        queries. Exact search runs on the raw vectors (faiss.knn: no second index is built)."""
        x = _as_vectors(embeddings, "embeddings")
        if self.metric == "cosine":
            x = _normalized(x)
        k = min(k, self.count)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(x.shape[0], min(queries, x.shape[0]), replace=False))
        _, exact = faiss.knn(x[rows], x, k, metric=_faiss_metric(self.metric))
        _, approx = self.index.search(x[rows], k)
        return _recall(approx, exact)

    def search(self, queries: ArrayLike, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Top-k items for each query [n, dim] -> (scores [n, k], item ids [n, k]), best first.

        Scores are higher-is-better for every metric (L2 gives the negative squared distance). When
        fewer than k items can be returned (k > count, or an IVF search probing too few cells) the
        missing slots hold id -1 and score -inf.
        """
        q = _as_vectors(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(
                f"queries have dimension {q.shape[1]} but the index holds {self.dim}-dimensional item vectors"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.metric == "cosine":
            q = _normalized(q)
        ef_search = int(self.params.get("ef_search", 0)) if self.kind == "hnsw" else 0
        if k > ef_search > 0:
            # HNSW returns at most efSearch results: asking for more (e.g. 200 candidates with efSearch 128)
            # left a quarter of the slots empty. Widening the search to k keeps every slot filled.
            scores, ids = self.index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=k))
        else:
            scores, ids = self.index.search(q, k)
        if self.metric == "l2":
            scores = -scores
        scores[ids < 0] = -np.inf
        return scores, ids

    def save(self, directory: str | Path) -> None:
        """Write index.faiss (atomically: temp file + rename) and then index.json, which describes it
        and carries the index file's checksum, so a reader can tell the two belong together."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        with atomic_open(target / INDEX_FILE, "wb") as handle:
            # Streams the serialized index into the temporary file; no second in-memory copy.
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(handle.write))
        write_json(
            target / META_FILE,
            {
                "schema_version": SCHEMA_VERSION,
                "kind": self.kind,
                "metric": self.metric,
                "dim": self.dim,
                "count": self.count,
                "params": self.params,
                "build_recall": self.build_recall,
                "recall_k": self.recall_k,
                "faiss_version": faiss.__version__,
                "sha256": sha256_file(target / INDEX_FILE),
            },
        )

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> ItemIndex:
        """Read an index written by `save`; `verify` checks the index file against its recorded checksum."""
        source = Path(directory)
        meta_path, index_path = source / META_FILE, source / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise FileNotFoundError(f"no item index in {source}: expected {META_FILE} and {INDEX_FILE}")
        meta = read_json(meta_path)
        version = meta.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(
                f"{meta_path} has schema_version {version!r}; this recforge reads up to {SCHEMA_VERSION} "
                "(upgrade recforge, or rebuild the index)"
            )
        if verify and sha256_file(index_path) != meta["sha256"]:
            raise ValueError(f"{index_path} does not match the checksum in {meta_path}: the pair is torn or corrupt")
        index = faiss.read_index(str(index_path))
        if index.d != meta["dim"] or index.ntotal != meta["count"]:
            raise ValueError(
                f"{index_path} holds {index.ntotal} vectors of dimension {index.d}, but {meta_path} says "
                f"{meta['count']} of dimension {meta['dim']}"
            )
        params = dict(meta.get("params", {}))
        _apply_search_params(index, meta["kind"], params)
        return cls(
            index=index,
            kind=meta["kind"],
            metric=meta["metric"],
            dim=int(meta["dim"]),
            count=int(meta["count"]),
            params=params,
            build_recall=float(meta.get("build_recall", 1.0)),
            recall_k=int(meta.get("recall_k", 10)),
        )
