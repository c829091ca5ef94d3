"""Losses as plain functions of logits and labels (models never compute their own loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Computed in fp32 even under autocast: the log-sigmoid of a bf16 logit loses the tail.
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
