"""What a training step minimizes, as small modules wrapping a model (the model never holds its loss).

The trainer calls `objective(categorical, numeric, label, history_values, history_offsets) -> loss`,
and under DDP it is the objective that gets wrapped, so every objective's forward runs through
DDP's gradient synchronization. (torchrec's DLRMTrain plays the same role.)
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.losses import bce_with_logits, bpr, full_softmax, sampled_softmax_with_logq
from recforge.models.two_tower import TwoTower


class Pointwise(nn.Module):
    """Click prediction: BCE of the model's logit against the 0/1 label (rankers).

    With `id_dropout` > 0, each row's `id_columns` (user, item) are set to the unknown index 0 with that
    probability while training, the same replacement for every table of the model (DeepFM's first-order
    weights included), so the unknown rows are trained as the average new user or item.
    """

    def __init__(self, model: nn.Module, id_columns: tuple[int, ...] = (), id_dropout: float = 0.0):
        super().__init__()
        self.model = model
        self.register_buffer("id_columns", torch.tensor(id_columns, dtype=torch.long), persistent=False)
        self.id_dropout = id_dropout

    def forward(self, categorical, numeric, label, history_values, history_offsets):  # noqa: ANN001, ANN201
        if self.training and self.id_dropout > 0 and len(self.id_columns):
            categorical = unknown_ids(categorical, self.id_columns, self.id_dropout)
        return bce_with_logits(self.model(categorical, numeric, history_values, history_offsets), label)


def unknown_ids(categorical: torch.Tensor, columns: torch.Tensor, rate: float) -> torch.Tensor:
    """A copy of `categorical` with each (row, column in `columns`) set to 0 with probability `rate`."""
    out = categorical.clone()
    picked = out.index_select(1, columns)
    drop = torch.rand(picked.shape, device=picked.device) < rate
    out[:, columns] = picked.masked_fill(drop, 0)
    return out


class InBatchRetrieval(nn.Module):
    """Two-tower training on positive (user, item) rows: in-batch sampled softmax with logQ correction,
    BPR against another row's item, or a full softmax over the whole catalog.

    `item_log_q` holds log of each item's share of training positives (index = item vocabulary id);
    `catalog` ([items, 1 + item features], item index order) is needed by the full softmax only.
    """

    def __init__(self, model: TwoTower, item_log_q: torch.Tensor, item_column: int, loss: str = "softmax",
                 catalog: torch.Tensor | None = None):
        super().__init__()
        if loss not in ("softmax", "bpr", "full_softmax"):
            raise ValueError(f"unknown retrieval loss '{loss}' (expected softmax, bpr or full_softmax)")
        if loss == "full_softmax" and catalog is None:
            raise ValueError("retrieval_loss=full_softmax needs the item catalog")
        self.model = model
        self.register_buffer("item_log_q", item_log_q.float())
        self.register_buffer("catalog", catalog if catalog is not None else torch.zeros((0, 1), dtype=torch.long))
        self.item_column = item_column
        self.loss = loss

    def forward(self, categorical, numeric, label, history_values, history_offsets):  # noqa: ANN001, ANN201
        user = self.model.user_vector(categorical, numeric, history_values, history_offsets)
        item_ids = categorical[:, self.item_column]
        if self.loss == "full_softmax":
            return full_softmax(user, self.model.item_vector(self.catalog), item_ids, self.model.temperature)
        item = self.model.item_vector(categorical.index_select(1, self.model.item_columns))
        if self.loss == "bpr":
            negative = item.roll(1, dims=0)  # another row's item: an in-batch negative
            return bpr((user * item).sum(-1), (user * negative).sum(-1))
        return sampled_softmax_with_logq(user, item, item_ids, self.item_log_q[item_ids], self.model.temperature)
