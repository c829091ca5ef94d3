"""The popularity baseline as a model: score = calibrated log(1 + training positives of the item).

Built as an nn.Module with the same (categorical, numeric) -> logit signature as every ranker,
so it is evaluated, scripted and served by exactly the same code. The two calibration numbers
are fit on the training split (Platt scaling), which makes its logloss an honest one.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from recforge.data.batches import SplitData
from recforge.features import FeatureLayout
from recforge.metrics import fit_platt


class PopularityRanker(nn.Module):
    def __init__(self, positives_per_item: torch.Tensor, item_column: int, scale: float, bias: float):
        super().__init__()
        self.register_buffer("log_positives", torch.log1p(positives_per_item.float()))
        self.item_column = item_column
        self.scale = scale
        self.bias = bias

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        items = categorical[:, self.item_column].clamp(0, self.log_positives.shape[0] - 1)
        return self.log_positives[items] * self.scale + self.bias


def popularity_baseline(train: SplitData, layout: FeatureLayout) -> PopularityRanker:
    """The baseline every model is compared with, fit on a prepared training split."""
    item_column = layout.item_column
    return fit_popularity(train.categorical.numpy(), train.label.numpy().astype(np.float64), item_column,
                          layout.cardinalities[item_column])


def fit_popularity(categorical: np.ndarray, labels: np.ndarray, item_column: int, num_items: int) -> PopularityRanker:
    """Count positives per item on the training rows and calibrate log1p(count) to probabilities.

    Index 0 (unknown items) keeps whatever count the training rows give it, normally zero.
    """
    return popularity_from_items(categorical[:, item_column], labels, item_column, num_items)


def popularity_from_items(items: np.ndarray, labels: np.ndarray, item_column: int, num_items: int
                          ) -> PopularityRanker:
    """fit_popularity from the training rows' item indices alone (what a split's shards give without
    loading its other columns); the ranker scores rows by their `item_column`."""
    positives = np.bincount(items, weights=labels, minlength=num_items)
    score = np.log1p(positives[items])
    scale, bias = fit_platt(score, labels)
    return PopularityRanker(torch.from_numpy(positives), item_column, float(scale), float(bias))
