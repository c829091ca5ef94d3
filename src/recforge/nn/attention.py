"""DIN target attention (Zhou et al. 2018, "Deep Interest Network"): the local activation unit.

A user's history is pooled with weights that depend on the candidate item, so the same history
yields a different user vector per candidate. The weights come from a small MLP over
[h, q, h - q, h * q] and are deliberately not softmax-normalized: the DIN paper keeps the raw
weights so that the pooled vector's magnitude reflects how strongly the history relates to the
candidate.

Histories are jagged, given as values + offsets (like `nn.EmbeddingBag` and the data layer's
batches). The unit runs on the flat [total, D] rows directly: each row is paired with its user's
candidate by `repeat_interleave`, and the weighted rows are summed back per user with one
`index_add_`. Nothing is padded, so one long history does not inflate the whole batch, and there
is no Python loop over users.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recforge.nn.mlp import MLP


class TargetAttention(nn.Module):
    """query [B, D] + jagged history ([total, D] with offsets [B + 1] or lengths [B]) -> pooled [B, D]."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 32)):
        super().__init__()
        if dim < 1:
            raise ValueError(f"TargetAttention needs dim >= 1, got {dim}")
        self.dim = dim
        self.mlp = MLP(4 * dim, list(hidden))
        self.score = nn.Linear(self.mlp.out_dim, 1)

    def forward(
        self,
        query: torch.Tensor,
        history: torch.Tensor,
        offsets: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User b's history rows are history[offsets[b]:offsets[b + 1]]; offsets start at 0 and end
        at history.shape[0]. Pass either offsets or lengths (per-user row counts). Users with an
        empty history get a zero vector."""
        batch = query.shape[0]
        if lengths is None:
            if offsets is None:
                raise ValueError("TargetAttention needs offsets [B + 1] or lengths [B] for the history")
            if offsets.dim() != 1 or offsets.shape[0] != batch + 1:
                raise ValueError(
                    "offsets must be 1-d of length batch + 1 = " + str(batch + 1) + ", got shape "
                    + str(list(offsets.shape))
                )
            lengths = offsets[1:] - offsets[:-1]
        elif lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(
                "lengths must be 1-d of length batch = " + str(batch) + ", got shape " + str(list(lengths.shape))
            )
        owner = torch.repeat_interleave(torch.arange(batch, device=query.device), lengths.to(query.device))
        if owner.shape[0] != history.shape[0]:
            raise ValueError(
                "the offsets/lengths cover " + str(owner.shape[0]) + " history rows but history has "
                + str(history.shape[0])
            )
        pooled = torch.zeros_like(query)
        if owner.shape[0] == 0:
            return pooled
        q = query.index_select(0, owner)
        features = torch.cat([history, q, history - q, history * q], dim=1)
        weights = self.score(self.mlp(features))  # [total, 1], unnormalized on purpose (see module doc)
        return pooled.index_add_(0, owner, (weights * history).to(pooled.dtype))
