"""FAISS item index: exact search equals brute force, approximate kinds keep recall, saved indexes
come back identical, and mistakes fail with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recforge.index import ItemIndex


def _clustered_catalog(n: int = 20_000, dim: int = 32, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Items around cluster centers (as learned item embeddings are: genres, categories)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    items = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))
    return items.astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> np.ndarray:
    return _clustered_catalog()


def _exact_ids(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


def test_flat_equals_brute_force(catalog):
    rng = np.random.default_rng(1)
    items = catalog[:3000]
    queries = rng.normal(size=(50, 32)).astype(np.float32)
    index = ItemIndex.build(items)  # small catalog: auto picks exact search
    assert index.kind == "flat" and index.build_recall == 1.0 and index.count == 3000
    scores, ids = index.search(queries, 10)
    assert np.array_equal(ids, _exact_ids(items, queries, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, ids, axis=1), rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_l2_and_cosine_scores_are_higher_is_better(catalog):
    items, queries = catalog[:2000], catalog[2000:2020]
    _, ids = ItemIndex.build(items, kind="flat", metric="l2").search(queries, 5)
    dist = ((queries[:, None, :].astype(np.float64) - items[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(ids, np.argsort(dist, axis=1, kind="stable")[:, :5])
    scores, ids = ItemIndex.build(items, kind="flat", metric="cosine").search(queries, 5)
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    assert np.array_equal(ids, _exact_ids(unit, queries / np.linalg.norm(queries, axis=1, keepdims=True), 5))
    assert np.all(scores <= 1.0 + 1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_keep_recall(catalog, kind):
    index = ItemIndex.build(catalog, kind=kind)
    assert index.kind == kind
    rng = np.random.default_rng(2)
    queries = catalog[rng.choice(catalog.shape[0], 500, replace=False)] + rng.normal(0, 0.1, (500, 32)).astype(
        np.float32)
    _, ids = index.search(queries, 10)
    assert _recall(ids, _exact_ids(catalog, queries, 10)) >= 0.9
    assert 0.9 <= index.build_recall <= 1.0


def test_build_recall_is_measured_not_assumed():
    """An IVF probing one of many cells on unclustered data misses neighbours: the build says so."""
    rng = np.random.default_rng(3)
    items = rng.normal(size=(8000, 16)).astype(np.float32)
    index = ItemIndex.build(items, kind="ivf", nlist=100, nprobe=1, recall_queries=500)
    queries = items[rng.choice(8000, 500, replace=False)]
    _, ids = index.search(queries, 10)
    independent = _recall(ids, _exact_ids(items, queries, 10))
    assert index.build_recall < 0.8
    assert index.build_recall == pytest.approx(independent, abs=0.08)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    items = _clustered_catalog(n=4000, dim=16, clusters=20, seed=4)
    index = ItemIndex.build(items, kind=kind, metric="ip")
    queries = items[:40] + 0.05
    before = index.search(queries, 7)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["schema_version"] == 1 and meta["kind"] == kind and meta["dim"] == 16 and meta["count"] == 4000
    assert not [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp-")]
    loaded = ItemIndex.load(tmp_path / "idx")
    assert (loaded.kind, loaded.metric, loaded.params, loaded.build_recall) == (
        kind, "ip", index.params, index.build_recall)
    after = loaded.search(queries, 7)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])


def test_load_refuses_a_torn_pair_or_a_newer_schema(tmp_path):
    items = _clustered_catalog(n=500, dim=8, clusters=5, seed=5)
    ItemIndex.build(items).save(tmp_path / "a")
    ItemIndex.build(items[:400]).save(tmp_path / "b")
    (tmp_path / "a" / "index.faiss").write_bytes((tmp_path / "b" / "index.faiss").read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        ItemIndex.load(tmp_path / "a")
    meta_path = tmp_path / "b" / "index.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        ItemIndex.load(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no item index"):
        ItemIndex.load(tmp_path / "missing")


def test_dimension_mismatch_and_bad_arguments_fail_clearly():
    index = ItemIndex.build(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="queries have dimension 3 but the index holds 4-dimensional"):
        index.search(np.zeros((2, 3), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="unknown index kind"):
        ItemIndex.build(np.eye(4, dtype=np.float32), kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        ItemIndex.build(np.full((3, 2), np.nan, dtype=np.float32))
    scores, ids = index.search(np.eye(4, dtype=np.float32)[:1], 6)  # more than the 4 items
    assert ids[0].tolist()[:1] == [0] and ids[0, 4:].tolist() == [-1, -1] and np.isneginf(scores[0, 4:]).all()


@pytest.mark.slow  # builds a 100k-item HNSW graph (~10 s): in make test, not in make test-fast
def test_default_settings_keep_recall_on_a_100k_catalog():
    """The issue's bar: at the default settings a 100k-item catalog gets the approximate index
    (auto -> HNSW) with recall@10 >= 0.95 against exact search."""
    items = _clustered_catalog(n=100_000, dim=32, clusters=300, seed=3)
    index = ItemIndex.build(items)
    assert index.kind != "flat"
    rng = np.random.default_rng(4)
    queries = items[rng.choice(len(items), 300, replace=False)] + 0.1 * rng.normal(size=(300, 32)).astype(np.float32)
    _, ids = index.search(queries, 10)
    assert _recall(ids, _exact_ids(items, queries, 10)) >= 0.95
    assert index.build_recall >= 0.95
