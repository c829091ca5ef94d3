"""Second-order factorization machine interaction (Rendle 2010), as used in DeepFM.

sum_{i<j} <v_i, v_j> over F fields costs O(F^2 D) written as pairs, but equals
0.5 * ((sum_i v_i)^2 - sum_i v_i^2) summed over the embedding dimension, which is O(F D):
that identity is why FM scales to many fields.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizationMachine(nn.Module):
    """Field embeddings [B, F, D] -> pairwise interaction logit [B, 1]. No parameters of its own."""

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        total = fields.sum(dim=1)
        squares = (fields * fields).sum(dim=1)
        return 0.5 * (total * total - squares).sum(dim=1, keepdim=True)
