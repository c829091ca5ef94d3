"""Multi-layer perceptron: Linear -> ReLU -> Dropout per hidden layer."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def expect_input(self, width: int, expected: str) -> None:
        """Refuse to be composed onto an input of another width: the mismatch would otherwise surface as a
        shape error on the first batch, far from the builder that caused it. (An MLP with no hidden layer
        passes its input through and takes any width.)"""
        if len(self.layers) and self.in_dim != width:
            raise ValueError(f"MLP input width {self.in_dim} != {expected}")


class Tower(nn.Module):
    """An MLP ending in a linear projection (no activation): the output is an embedding, not a feature."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.projection = nn.Linear(self.mlp.out_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.mlp(x))
