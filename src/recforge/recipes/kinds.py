"""What a model's kind (its MODELS entry) decides in the recipes, declared once.

A ranking model learns pointwise click probabilities and is validated by AUC on the valid split; a
retrieval model learns in-batch from positive rows, is validated over the full catalog, and ships
an item index. The models layer only names a model's kind (it stands left of train and evaluate);
this table maps a kind to its objective, its validation and its index, so no recipe branches on a
model's class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.data.shards import split_column, split_shards
from recforge.data.stream import ShardStream
from recforge.evaluate import RetrievalTask, evaluate_parts, full_catalog_metrics, retrieval_task
from recforge.features import FeatureLayout
from recforge.models import ModelKind, model_entry
from recforge.recipes.runs import item_catalog
from recforge.train.objectives import InBatchRetrieval, Pointwise

# The most logits a full-softmax step may hold (items x batch; 1 GiB of fp32 with their gradients).
_FULL_SOFTMAX_LOGITS = 1 << 27

Validator = Callable[[nn.Module], dict[str, float]]
# The train split in memory, or streamed from its shards (train.data_loading).
TrainSplit = SplitData | ShardStream
# (model, train split, features, config) -> (the rows it trains on, the objective wrapping it)
Objective = Callable[[nn.Module, TrainSplit, FeatureLayout, Config], tuple[TrainSplit, nn.Module]]


@dataclass(frozen=True)
class KindRecipe:
    """How the recipes train, validate and export a model of one kind."""

    objective: Objective
    validator: Callable[[Path, FeatureLayout, Config], Validator]
    reports: Callable[[str], bool]  # whether `validator` reports a metric (train.early_stopping_metric)
    item_index: bool  # trained runs build an item index, and their bundles carry it


def pointwise(model: nn.Module, train_data: TrainSplit, features: FeatureLayout,
              cfg: Config) -> tuple[TrainSplit, nn.Module]:
    """A ranker trains on every row: BCE of its logit against the click label (train.id_dropout: the
    user and item ids of some rows replaced by unknown)."""
    return train_data, Pointwise(model, (features.column("user"), features.item_column), cfg.train.id_dropout)


def in_batch_retrieval(model: nn.Module, train_data: TrainSplit, features: FeatureLayout,
                       cfg: Config) -> tuple[TrainSplit, nn.Module]:
    """Two-tower training sees the positive (user, item) rows; logQ comes from their item frequencies.

    A streamed split keeps its positives shard by shard, and counts their items one shard at a time.
    """
    item_column = features.item_column
    positives: TrainSplit
    if isinstance(train_data, ShardStream):
        positives = train_data.positives()
        counts = torch.from_numpy(positives.column_counts(item_column, features.cardinalities[item_column]))
    else:
        positives = train_data.select(torch.nonzero(train_data.label > 0).squeeze(1))
        counts = torch.bincount(positives.categorical[:, item_column], minlength=features.cardinalities[item_column])
    if len(positives) == 0:
        raise ValueError("the training split has no positive rows to train a retrieval model on")
    log_q = torch.log((counts.double() + 1.0) / (counts.sum() + len(counts)))
    catalog = None
    if cfg.model.retrieval_loss == "full_softmax":
        catalog = item_catalog(cfg.resolved_prepared_dir, features)
        logits = len(catalog) * cfg.train.batch_size
        if logits > _FULL_SOFTMAX_LOGITS:
            raise ValueError(f"retrieval_loss=full_softmax would score {len(catalog):,} items x batch "
                             f"{cfg.train.batch_size:,} = {logits:,} logits each step; lower train.batch_size "
                             "or use retrieval_loss=softmax (in-batch, logQ-corrected)")
    return positives, InBatchRetrieval(model, log_q, item_column, cfg.model.retrieval_loss, catalog)


def ranking_validator(prepared: Path, features: FeatureLayout, cfg: Config) -> Validator:
    """Validation on the prepared valid split: under DDP only rank 0 calls it. In memory it is loaded
    on first use and kept; a streamed run (train.data_loading=stream) reads it one shard at a time
    each epoch instead, so validation, too, holds one shard whatever the split's size."""
    loaded: list[SplitData] = []
    batch_size = cfg.train.eval_batch_size

    def run(model: nn.Module) -> dict[str, float]:
        if cfg.train.data_loading == "stream":
            parts: Iterable[SplitData] = SplitData.each_shard(prepared, "valid")
        else:
            if not loaded:
                loaded.append(SplitData.load(prepared, "valid"))
            parts = loaded
        metrics = evaluate_parts(model, parts, batch_size)
        return {k: metrics[k] for k in ("auc", "gauc", "logloss")}

    return run


def retrieval_cutoff(metric: str) -> int | None:
    """K of a recall@K / ndcg@K metric name; None for any other metric."""
    name, _, k = metric.partition("@")
    return int(k) if name in ("recall", "ndcg") and k.isdigit() else None


def retrieval_validator(prepared: Path, features: FeatureLayout, cfg: Config) -> Validator:
    """Full-catalog Recall/NDCG@K on the valid split's train.retrieval_users (a two-tower model's own goal),
    K from train.early_stopping_metric (20 when it is a ranking metric), loaded on first use."""
    # Refused when the validator is made, before training starts, not after the first epoch.
    if model_entry(cfg.model.name).kind != "retrieval":
        raise ValueError(f"train.early_stopping_metric={cfg.train.early_stopping_metric} needs a retrieval model "
                         "(two_tower, sasrec)")
    k = retrieval_cutoff(cfg.train.early_stopping_metric) or 20
    item_column = features.item_column
    loaded: list[tuple[RetrievalTask, torch.Tensor]] = []

    def run(model: nn.Module) -> dict[str, float]:
        if not loaded:
            valid = SplitData.load(prepared, "valid")
            times = split_column(prepared, "valid", "timestamp")
            loaded.append((retrieval_task(_train_for_exclusion(prepared, cfg), valid, times, item_column,
                                          cfg.train.retrieval_users),
                           item_catalog(prepared, features)))
        task, catalog = loaded[0]
        device = next(model.parameters()).device
        batch = task.queries.batch(torch.arange(len(task.queries))).to(device)
        with torch.no_grad():
            users = model.user_vector(batch.categorical, batch.numeric, batch.history_values,
                                      batch.history_offsets).float().cpu().numpy()
            items = model.item_vector(catalog.to(device)).float().cpu().numpy()
        metrics = full_catalog_metrics(lambda a, b: users[a:b] @ items.T, len(task.users), task.truth,
                                       task.exclude, len(items), ks=(k,))
        return {f"recall@{k}": metrics[f"recall@{k}"], f"ndcg@{k}": metrics[f"ndcg@{k}"]}

    return run


def _train_for_exclusion(prepared: Path, cfg: Config) -> SplitData:
    """What retrieval validation excludes (items each user clicked in training): the train split, or,
    when it is streamed, only its positive rows' user and item ids, read one shard at a time."""
    if cfg.train.data_loading == "memory":
        return SplitData.load(prepared, "train")
    users, items = [], []
    for shard in split_shards(prepared, "train"):
        columns = shard.load()
        positive = np.asarray(columns["label"]) > 0
        users.append(np.asarray(columns["user_key"])[positive])
        items.append(np.asarray(columns["categorical"])[positive])
    categorical = torch.from_numpy(np.concatenate(items))
    return SplitData("train", categorical, torch.zeros((len(categorical), 0)), torch.ones(len(categorical)),
                     np.concatenate(users))


KIND_RECIPES: dict[ModelKind, KindRecipe] = {
    "ranking": KindRecipe(pointwise, ranking_validator, lambda m: m in ("auc", "gauc", "logloss"), item_index=False),
    "retrieval": KindRecipe(in_batch_retrieval, retrieval_validator, lambda m: retrieval_cutoff(m) is not None,
                            item_index=True),
}


def kind_recipe(model_name: str) -> KindRecipe:
    """The recipe of the configured model's kind (an unknown model name is a clear ValueError)."""
    return KIND_RECIPES[model_entry(model_name).kind]


def validator_for(prepared: Path, features: FeatureLayout, cfg: Config) -> Validator:
    """The validation that reports train.early_stopping_metric: a ranking metric on any model, or the
    full-catalog retrieval metric (which only a retrieval model can report)."""
    metric = cfg.train.early_stopping_metric
    recipe = next((r for r in KIND_RECIPES.values() if r.reports(metric)), KIND_RECIPES["ranking"])
    return recipe.validator(prepared, features, cfg)
