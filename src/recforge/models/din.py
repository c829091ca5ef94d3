"""DIN (Zhou et al., KDD 2018): the user's history pooled with attention to the candidate item.

A user who clicked both cooking videos and football clips is a different user for a cooking
candidate than for a football one; target attention weighs each past click by its relevance to
the item being scored instead of averaging the history away. History items share the item-id
embedding rows, so the attention compares like with like.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recforge.nn import MLP, FusedEmbedding, TargetAttention


class DIN(nn.Module):
    def __init__(
        self,
        embeddings: FusedEmbedding,
        attention: TargetAttention,
        mlp: MLP,
        item_column: int,
        num_numeric: int,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.attention = attention
        self.mlp = mlp
        self.head = nn.Linear(mlp.out_dim, 1)
        self.item_column = item_column
        self.num_numeric = num_numeric

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        emb = self.embeddings(categorical)  # [B, F, D]
        query = emb[:, self.item_column]
        batch = categorical.shape[0]
        if history_values is not None and history_offsets is not None and history_offsets.numel() == batch + 1:
            rows = history_values + self.embeddings.offsets[self.item_column]
            pooled = self.attention(query, self.embeddings.table(rows), history_offsets)
        else:
            pooled = torch.zeros_like(query)
        parts = [emb.flatten(1), pooled]
        if self.num_numeric > 0:
            parts.append(numeric.to(emb.dtype))
        return self.head(self.mlp(torch.cat(parts, dim=1))).squeeze(-1)
