"""A causal self-attention encoder over a user's item sequence (SASRec's blocks, Kang & McAuley 2018).

Histories arrive jagged (values + offsets, oldest first, like the data layer's batches) and are laid
out right-aligned in a [B, L + 1] grid: the most recent item at position L - 1 and a learnt query
token at position L, whose output is the sequence's summary. Positions count back from the query,
so "the last item" always has the same position embedding whatever the history's length, and an
empty history still has a summary (the query token attends to itself). Attention is written out
(matmul, mask, softmax) rather than through nn.MultiheadAttention, so TorchScript and the ONNX
exporter see plain ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)) with a causal and padding mask, then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding_dim {dim} must be a multiple of model.heads {heads}")
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; blocked [B, T, T] True where query t may not see key s."""
        batch, steps, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        head_dim = dim // self.heads
        q = q.reshape(batch, steps, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, steps, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, steps, self.heads, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        scores = scores.masked_fill(blocked.unsqueeze(1), -1e9)
        attended = (self.dropout(F.softmax(scores, dim=-1)) @ v).transpose(1, 2).reshape(batch, steps, dim)
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SequenceEncoder(nn.Module):
    """Jagged item sequences (already embedded) -> one [B, D] summary per sequence."""

    def __init__(self, dim: int, max_len: int, blocks: int, heads: int, dropout: float):
        super().__init__()
        if max_len < 1:
            raise ValueError("a sequence encoder needs max_len >= 1 (data.history_length)")
        self.max_len = max_len
        self.query = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.query, std=0.02)
        # Every position is used every step: a dense parameter (the dense optimizer's), not a sparse table.
        self.positions = nn.Parameter(torch.zeros(max_len + 1, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList([CausalBlock(dim, heads, dropout) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embedded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """embedded [total, D] (row r's items at offsets[r]:offsets[r + 1], oldest first) -> [B, D]."""
        batch = offsets.shape[0] - 1
        steps = self.max_len + 1
        dim = embedded.shape[1]
        lengths = (offsets[1:] - offsets[:-1]).clamp(max=self.max_len)
        # Keep each row's last max_len items: the element at index j of row r goes to column
        # max_len - (end_r - j), and an element further back than max_len is dropped.
        rows = torch.repeat_interleave(torch.arange(batch, device=offsets.device), offsets[1:] - offsets[:-1])
        columns = self.max_len - (offsets[1:][rows] - torch.arange(embedded.shape[0], device=offsets.device))
        keep = columns >= 0
        history = torch.zeros(batch, self.max_len, dim, dtype=embedded.dtype, device=embedded.device)
        history[rows[keep], columns[keep]] = embedded[keep]
        # Broadcast, not expand(batch, ...): an exported graph keeps the batch size symbolic.
        query = torch.zeros_like(history[:, :1]) + self.query.to(embedded.dtype)
        grid = torch.cat([history, query], dim=1)
        position = torch.arange(steps, device=offsets.device)
        grid = self.dropout(grid + self.positions.to(embedded.dtype).unsqueeze(0))
        padding = position.unsqueeze(0) < (self.max_len - lengths).unsqueeze(1)  # [B, T]: empty slots
        future = position.unsqueeze(0) > position.unsqueeze(1)  # [T, T]: key after query
        blocked = future.unsqueeze(0) | padding.unsqueeze(1)
        for block in self.blocks:
            grid = block(grid, blocked)
        return self.norm(grid[:, self.max_len])
