"""HNSW searches asked for more results than efSearch (e.g. 200 candidates, efSearch 128) fill every slot."""

from __future__ import annotations

import numpy as np

from recforge.index import ItemIndex


def test_hnsw_returns_k_results_when_k_exceeds_ef_search() -> None:
    rng = np.random.default_rng(0)
    # Concentrated unit vectors (what an early two-tower item tower gives): the graph search stops after few
    # nodes, so an efSearch below k leaves slots empty unless the search is widened to k.
    items = np.eye(16)[0] + 0.03 * rng.normal(size=(3000, 16))
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    hnsw = ItemIndex.build(items, kind="hnsw", hnsw_m=4, ef_construction=40, ef_search=2, recall_queries=50)
    scores, ids = hnsw.search(queries, 100)
    assert (ids >= 0).all() and np.isfinite(scores).all()
    truth = ItemIndex.build(items, kind="flat").search(queries, 100)[1]
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ids, truth, strict=True)])
    assert recall > 0.5  # a sparse graph (m=4): the point is that every slot holds a real neighbour
