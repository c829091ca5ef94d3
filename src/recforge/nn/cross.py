"""DCN-V2 cross network (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network").

Each layer computes x_{l+1} = x0 * (W x_l + b) + x_l. The elementwise product with the input x0
raises the polynomial degree of the feature interactions by one per layer, explicitly and with
few parameters, which an MLP can only approximate with many; the residual keeps lower-order
terms (and gradients) flowing. A low-rank W = U V^T cuts the in_dim^2 weights per layer to
2 * in_dim * rank, which the paper found loses little because learned cross matrices are
numerically low rank.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossNetwork(nn.Module):
    """Stacked cross layers over a flat input [B, in_dim] -> [B, in_dim]."""

    def __init__(self, in_dim: int, num_layers: int, low_rank: int | None = None):
        super().__init__()
        if in_dim < 1 or num_layers < 1:
            raise ValueError(f"CrossNetwork needs in_dim >= 1 and num_layers >= 1, got {in_dim}, {num_layers}")
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"low_rank must be a positive rank or None (full rank), got {low_rank}")
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if low_rank is None:
                layers.append(nn.Linear(in_dim, in_dim))
            else:
                # V^T projects down without a bias; U projects back up and carries the layer's bias b.
                layers.append(nn.Sequential(nn.Linear(in_dim, low_rank, bias=False), nn.Linear(low_rank, in_dim)))
        self.layers = nn.ModuleList(layers)
        self.in_dim = in_dim
        self.out_dim = in_dim
        self.low_rank = low_rank

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x
