"""`recforge evaluate` reads the held-out split one shard at a time (and only the training rows' items and
labels for the baseline), and its numbers are exactly those of the split evaluated in memory."""

from __future__ import annotations

import pytest

from recforge import config
from recforge.data.batches import SplitData
from recforge.data.shards import split_shards
from recforge.evaluate import evaluate
from recforge.models.popularity import popularity_baseline
from recforge.recipes.evaluate import evaluate_run
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.recipes.runs import feature_layout, load_trained_model
from recforge.recipes.train import train_model


def test_sharded_evaluation_equals_the_split_in_memory(tmp_path):
    cfg = config.load(None, [f"workdir={tmp_path}", "data.generate.users=300", "data.generate.items=120",
                             "data.generate.events=8000", "data.generate.days=6", "data.shard_rows=700",
                             "data.history_length=4", "model.name=din", "train.epochs=1", "train.progress=false",
                             "train.batch_size=512"])
    generate(cfg)
    prepare_data(cfg)
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
