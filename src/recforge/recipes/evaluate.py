"""`recforge evaluate`: a trained ranking run against the popularity baseline on a held-out split."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.data.shards import split_shards
from recforge.evaluate import evaluate_parts
from recforge.models.popularity import popularity_from_items
from recforge.recipes.runs import (
    Log,
    empty_split_message,
    feature_layout,
    load_run_config,
    load_trained_model,
    warn_environment_drift,
)
from recforge.storage import write_json


def evaluate_run(
    cfg: Config, split: str = "test", without_history: bool = False, log: Log = print
) -> dict[str, dict[str, float]]:
    """Model vs popularity on the same held-out split, written to run_dir/evaluation_<split>.json.

    `without_history` scores with every user history emptied: the ablation that shows how much a
    sequence model (DIN) takes from the history.
    """
    run_dir = cfg.resolved_run_dir
    run_cfg = load_run_config(run_dir)
    prepared = run_cfg.resolved_prepared_dir
    model = load_trained_model(run_dir)
    warn_environment_drift(run_dir, log)
    if sum(shard.rows for shard in split_shards(prepared, split)) == 0:
        raise ValueError(empty_split_message(prepared, split))
    features = feature_layout(prepared)
    # The baseline needs each training row's item and label only, not the split's other columns.
    item_column = features.item_column
    items, labels = [], []
    for shard in split_shards(prepared, "train"):
        columns = shard.load()
        items.append(np.asarray(columns["categorical"][:, item_column]))
        labels.append(np.asarray(columns["label"], dtype=np.float64))
    popularity = popularity_from_items(np.concatenate(items), np.concatenate(labels), item_column,
                                       features.cardinalities[item_column])

    def parts() -> Iterator[SplitData]:
        """The split one shard at a time: memory holds one shard, plus 24 bytes a row for the metrics."""
        for part in SplitData.each_shard(prepared, split):
            if without_history and part.history_offsets is not None:
                part = dataclasses.replace(part, history_values=torch.zeros(0, dtype=torch.long),
                                           history_offsets=torch.zeros(len(part) + 1, dtype=torch.long))
            yield part

    results = {
        "model": evaluate_parts(model, parts(), cfg.train.eval_batch_size),
        "popularity": evaluate_parts(popularity, parts(), cfg.train.eval_batch_size),
    }
    suffix = "_without_history" if without_history else ""
    write_json(run_dir / f"evaluation_{split}{suffix}.json", {"split": split, **results})
    return results
