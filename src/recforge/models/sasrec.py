"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation") as a retrieval model.

The user is their item sequence: the last `data.history_length` clicks before the event, through
causal self-attention blocks (nn.sequence.SequenceEncoder); the candidate is its item embedding,
the same table the sequence is embedded with (SASRec ties input and output item embeddings). It has
the retrieval interface of the two-tower model (user_vector, item_vector, a pointwise forward), so
the same objective trains it (in-batch sampled softmax with logQ correction, or BPR), the same
full-catalog evaluation and FAISS index serve it, and the server hands it the user's sequence from
the online state exactly as it hands the two-tower model its history.

Each training row is a positive event with the clicks strictly before it, so every position of a
user's sequence is a training target once: what SASRec's all-positions loss does in one pass, here
one row each. User ids, context and item features are not inputs: the sequence is the user.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recforge.nn import FusedEmbedding
from recforge.nn.sequence import SequenceEncoder


class SASRec(nn.Module):
    def __init__(self, item_embeddings: FusedEmbedding, encoder: SequenceEncoder, item_columns: list[int],
                 temperature: float = 0.05, normalize: bool = True):
        super().__init__()
        self.item_embeddings = item_embeddings
        self.encoder = encoder
        self.register_buffer("item_columns", torch.tensor(item_columns, dtype=torch.long), persistent=False)
        self.temperature = temperature
        self.normalize = normalize
        self.dim = item_embeddings.dim

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def user_vector(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: Optional[torch.Tensor] = None,  # noqa: UP045 - TorchScript needs Optional
        history_offsets: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """[B, D] from the rows' item sequences (no history: the empty sequence's vector)."""
        batch = categorical.shape[0]
        if history_values is None or history_offsets is None or history_offsets.numel() != batch + 1:
            history_values = torch.zeros(0, dtype=torch.long, device=categorical.device)
            history_offsets = torch.zeros(batch + 1, dtype=torch.long, device=categorical.device)
        embedded = self.item_embeddings(history_values.unsqueeze(1)).squeeze(1)
        return self._finish(self.encoder(embedded, history_offsets))

    def item_vector(self, item_categorical: torch.Tensor) -> torch.Tensor:
        """[B, D] from item-side columns [item id, item features...]: the item id's embedding."""
        return self._finish(self.item_embeddings(item_categorical[:, :1]).squeeze(1))

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
