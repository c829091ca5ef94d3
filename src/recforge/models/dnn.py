"""The DNN ranker: every categorical field embedded, numeric features appended, MLP, one logit.

The model maps tensors to logits and nothing else; the loss, optimizer and device live in the
trainer, so the same module is what gets scripted and served.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recforge.nn import MLP, FusedEmbedding


class DNNRanker(nn.Module):
    def __init__(self, embeddings: FusedEmbedding, mlp: MLP, num_numeric: int):
        super().__init__()
        expected = embeddings.num_fields * embeddings.dim + num_numeric
        mlp.expect_input(expected, f"fields*dim + numeric = {expected}")
        self.embeddings = embeddings
        self.mlp = mlp
        self.head = nn.Linear(mlp.out_dim, 1)
        self.num_numeric = num_numeric

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """categorical [B, F] int64, numeric [B, N] float -> logits [B]. (No use for histories.)"""
        emb = self.embeddings(categorical).flatten(1)
        x = torch.cat([emb, numeric.to(emb.dtype)], dim=1) if self.num_numeric > 0 else emb
        return self.head(self.mlp(x)).squeeze(-1)
