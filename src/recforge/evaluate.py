"""Honest evaluation: the same metrics for any scorer on the same held-out split.

`evaluate` takes anything with the model signature (categorical, numeric) -> logits: an eager
model, a scripted or loaded bundle, or the popularity baseline, so the numbers reported for a
model in training, in export and in serving come from one function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from recforge.data.batches import SplitData, iterate_batches
from recforge.metrics import auc, gauc_detail, logloss, sigmoid

# (categorical, numeric, history_values, history_offsets) -> logits: every model's signature.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_logits(
    scorer: Scorer, data: SplitData, batch_size: int = 65536, device: torch.device | str | None = None
) -> np.ndarray:
    if isinstance(scorer, torch.nn.Module):
        scorer.eval()
        if device is None:
            tensors = [*scorer.parameters(), *scorer.buffers()]
            device = tensors[0].device if tensors else "cpu"
    device = device or "cpu"
    out = []
    for batch in iterate_batches(data, batch_size, shuffle=False):
        batch = batch.to(device)
        out.append(scorer(batch.categorical, batch.numeric, batch.history_values, batch.history_offsets)
                   .float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def ranking_metrics(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUC, impression-weighted per-user GAUC, logloss, and how much of the data GAUC covers."""
    probs = sigmoid(logits)
    detail = gauc_detail(labels, logits, groups)
    return {
        "auc": auc(labels, logits),
        "gauc": detail["gauc"],
        "logloss": logloss(labels, probs),
        "gauc_users": float(detail["groups_used"]),
        "rows": float(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def evaluate(
    scorer: Scorer, data: SplitData, batch_size: int = 65536, device: torch.device | str | None = None
) -> dict[str, float]:
    logits = predict_logits(scorer, data, batch_size, device)
    return ranking_metrics(data.label.numpy().astype(np.float64), logits, data.user_key)
