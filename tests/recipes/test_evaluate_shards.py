"""`recforge evaluate` reads the held-out split one shard at a time (and only the training rows' items and
labels for the baseline), and its numbers are exactly those of the split evaluated in memory; `recforge
export` builds its cold-start tables shard by shard, equal to counting the split in memory."""

from __future__ import annotations

import numpy as np
import pytest

from recforge import config
from recforge.data.batches import SplitData
from recforge.data.shards import split_shards
from recforge.evaluate import evaluate
from recforge.models.popularity import popularity_baseline
from recforge.recipes.evaluate import evaluate_run
from recforge.recipes.export import parity_rows_of, popularity_tables
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.recipes.runs import feature_layout, load_trained_model
from recforge.recipes.train import train_model


def _prepared(tmp_path) -> config.Config:
    cfg = config.load(None, [f"workdir={tmp_path}", "data.generate.users=300", "data.generate.items=120",
                             "data.generate.events=8000", "data.generate.days=6", "data.shard_rows=700",
                             "data.history_length=4", "model.name=din", "train.epochs=1", "train.progress=false",
                             "train.batch_size=512"])
    generate(cfg)
    prepare_data(cfg)
    return cfg


def test_export_tables_counted_shard_by_shard_equal_the_split_in_memory(tmp_path):
    cfg = _prepared(tmp_path)
    prepared = cfg.resolved_prepared_dir
    features = feature_layout(prepared)
    train = SplitData.load(prepared, "train")
    positives = train.categorical[train.label > 0].numpy()
    items = positives[:, features.item_column]
    tables = popularity_tables(prepared, features)
    n_items = features.cardinalities[features.item_column]
    np.testing.assert_array_equal(tables["overall"], np.bincount(items, minlength=n_items))
    assert features.columns("context")
    for col in features.columns("context"):
        expected = np.zeros((features.cardinalities[col], n_items))
        np.add.at(expected, (positives[:, col], items), 1)
        np.testing.assert_array_equal(tables[features.categorical[col]], expected)
    rows = parity_rows_of(prepared, 2048)
    test = SplitData.load(prepared, "test")
    assert len(rows) == min(2048, len(split_shards(prepared, "test")[0].load()["label"]))
    assert np.array_equal(rows.categorical.numpy(), test.categorical[:len(rows)].numpy())


def test_sharded_evaluation_equals_the_split_in_memory(tmp_path):
    cfg = _prepared(tmp_path)
    prepared = cfg.resolved_prepared_dir
    assert len(split_shards(prepared, "test")) >= 2 and len(split_shards(prepared, "train")) >= 2
    train_model(cfg, log=lambda line: None)
    test = SplitData.load(prepared, "test")
    model = load_trained_model(cfg.resolved_run_dir)
    expected = {"model": evaluate(model, test),
                "popularity": evaluate(popularity_baseline(SplitData.load(prepared, "train"),
                                                           feature_layout(prepared)), test)}
    got = evaluate_run(cfg, "test", log=lambda line: None)
    for scorer in ("model", "popularity"):
        for metric in ("auc", "gauc", "logloss"):
            assert got[scorer][metric] == pytest.approx(expected[scorer][metric], abs=1e-12), (scorer, metric)
    emptied = evaluate_run(cfg, "test", without_history=True, log=lambda line: None)
    assert emptied["model"]["auc"] != got["model"]["auc"]  # the histories were emptied in every shard
