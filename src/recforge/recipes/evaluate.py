"""`recforge evaluate`: a trained ranking run against the popularity baseline on a held-out split."""

from __future__ import annotations

import dataclasses

import torch

from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.evaluate import evaluate
from recforge.models.popularity import popularity_baseline
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
    data = SplitData.load(prepared, split)
    if len(data) == 0:
        raise ValueError(empty_split_message(prepared, split))
    if without_history and data.history_offsets is not None:
        data = dataclasses.replace(data, history_values=torch.zeros(0, dtype=torch.long),
                                   history_offsets=torch.zeros(len(data) + 1, dtype=torch.long))
    train_data = SplitData.load(prepared, "train")
    features = feature_layout(prepared)
    popularity = popularity_baseline(train_data, features)
    results = {
        "model": evaluate(model, data, cfg.train.eval_batch_size),
        "popularity": evaluate(popularity, data, cfg.train.eval_batch_size),
    }
    suffix = "_without_history" if without_history else ""
    write_json(run_dir / f"evaluation_{split}{suffix}.json", {"split": split, **results})
    return results
