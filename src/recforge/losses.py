"""Losses as plain functions of logits and labels (models never compute their own loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Computed in fp32 even under autocast: the log-sigmoid of a bf16 logit loses the tail.
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def sampled_softmax_with_logq(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """In-batch sampled softmax: row i's positive is item i, the other items of the batch are negatives.

    In-batch negatives are drawn in proportion to popularity, which pushes popular items down;
    subtracting log q (the item's sampling probability) corrects that bias (Yi et al., RecSys 2019).
    The same item appearing twice in a batch is not a negative for itself: those logits are masked.
    """
    logits = (user @ item.T).float() / temperature - log_q.float().unsqueeze(0)
    duplicate = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    targets = torch.arange(user.shape[0], device=user.device)
    return F.cross_entropy(logits, targets)


def full_softmax(user: torch.Tensor, catalog: torch.Tensor, item_ids: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """Softmax over every item of the catalog: row i's positive is item_ids[i], all others negatives.

    No sampling, so no sampling bias to correct; the cost is a [batch, items] logit matrix per step,
    which suits catalogs up to ~1e5 items (the SASRec-with-full-CE setting that beats sampled losses).
    """
    logits = (user @ catalog.T).float() / temperature
    return F.cross_entropy(logits, item_ids)


def bpr(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalized ranking: maximize P(positive scored above negative) (Rendle et al. 2009)."""
    return -F.logsigmoid(positive_scores.float() - negative_scores.float()).mean()
