"""DeepFM (Guo et al. 2017): first-order weights + FM pairwise interactions + a DNN, one logit.

The FM and the DNN read the same field embeddings, so the low-order interactions the FM models
explicitly and the high-order ones the DNN learns share one representation, with no manual
feature crosses. The first-order term is a per-row scalar (a second, one-dimensional fused
table) plus a linear term over the numeric features; its bias is the model's global bias.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.nn import MLP, FactorizationMachine, FusedEmbedding


class DeepFM(nn.Module):
    def __init__(self, embeddings: FusedEmbedding, first_order: FusedEmbedding, mlp: MLP, num_numeric: int):
        super().__init__()
        if first_order.dim != 1 or first_order.cardinalities != embeddings.cardinalities:
            raise ValueError(
                "first_order must be a dim-1 FusedEmbedding over the same fields as embeddings, got dim "
                f"{first_order.dim} and cardinalities {first_order.cardinalities} vs {embeddings.cardinalities}"
            )
        expected = embeddings.num_fields * embeddings.dim + num_numeric
        mlp.expect_input(expected, f"fields*dim + numeric = {expected}")
        self.embeddings = embeddings
        self.first_order = first_order
        # Without numeric features there is nothing to weigh; None keeps a zero-width Linear out.
        self.numeric_linear: nn.Linear | None = nn.Linear(num_numeric, 1, bias=False) if num_numeric > 0 else None
        self.bias = nn.Parameter(torch.zeros(1))
        self.fm = FactorizationMachine()
        self.mlp = mlp
        self.head = nn.Linear(mlp.out_dim, 1)
        self.num_numeric = num_numeric

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: torch.Tensor | None = None,
        history_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """categorical [B, F] int64, numeric [B, N] float -> logits [B]. Histories are accepted (every
        model in MODELS takes the same arguments) and not used."""
        emb = self.embeddings(categorical)
        logit = self.first_order(categorical).sum(dim=1) + self.bias + self.fm(emb)
        flat = emb.flatten(1)
        numeric_linear = self.numeric_linear
        if numeric_linear is not None:
            x = numeric.to(flat.dtype)
            logit = logit + numeric_linear(x)
            flat = torch.cat([flat, x], dim=1)
        return (logit + self.head(self.mlp(flat))).squeeze(-1)
