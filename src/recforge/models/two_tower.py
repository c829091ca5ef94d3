"""Two-tower retrieval: a user tower and an item tower meeting in a dot product.

The towers are separate so that item vectors can be computed once for the whole catalog and put
in a nearest-neighbour index, and a request needs one user-tower pass plus an index search.
The user tower sees the user id, the context fields and the mean of the user's recent clicked
items (embedded with the item tower's own id table, so history and candidates share one space);
the item tower sees the item id and the item's features.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recforge.nn import FusedEmbedding, Tower


class TwoTower(nn.Module):
    def __init__(
        self,
        user_embeddings: FusedEmbedding,
        item_embeddings: FusedEmbedding,
        user_mlp: Tower,
        item_mlp: Tower,
        user_columns: list[int],
        item_columns: list[int],
        num_numeric: int,
        temperature: float = 0.05,
        normalize: bool = True,
    ):
        super().__init__()
        self.user_embeddings = user_embeddings
        self.item_embeddings = item_embeddings
        self.user_mlp = user_mlp
        self.item_mlp = item_mlp
        self.register_buffer("user_columns", torch.tensor(user_columns, dtype=torch.long), persistent=False)
        self.register_buffer("item_columns", torch.tensor(item_columns, dtype=torch.long), persistent=False)
        self.num_numeric = num_numeric
        self.temperature = temperature
        self.normalize = normalize
        self.dim = user_embeddings.dim

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def user_vector(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """[B, D] from the user-side columns of `categorical` (the full ranking layout)."""
        user_part = self.user_embeddings(categorical.index_select(1, self.user_columns)).flatten(1)
        batch = categorical.shape[0]
        if history_values is not None and history_offsets is not None and history_offsets.numel() == batch + 1:
            pooled = F.embedding_bag(history_values, self.item_embeddings.table.weight,
                                     history_offsets[:-1], mode="mean", sparse=self.item_embeddings.table.sparse)
        else:
            pooled = torch.zeros(batch, self.dim, dtype=user_part.dtype, device=user_part.device)
        parts = [user_part, pooled.to(user_part.dtype)]
        if self.num_numeric > 0:
            parts.append(numeric.to(user_part.dtype))
        return self._finish(self.user_mlp(torch.cat(parts, dim=1)))

    def item_vector(self, item_categorical: torch.Tensor) -> torch.Tensor:
        """[B, D] from item-side columns only: [item id, item features...] (what the index is built from)."""
        return self._finish(self.item_mlp(self.item_embeddings(item_categorical).flatten(1)))

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """Pointwise logits [B] for (user, item) rows, so the model can also be scored like a ranker."""
        user = self.user_vector(categorical, numeric, history_values, history_offsets)
        item = self.item_vector(categorical.index_select(1, self.item_columns))
        return (user * item).sum(-1) / self.temperature
