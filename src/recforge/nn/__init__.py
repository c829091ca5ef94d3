"""Building blocks that models are composed from (passed in, never inherited)."""

from recforge.nn.embeddings import FusedEmbedding
from recforge.nn.mlp import MLP

__all__ = ["MLP", "FusedEmbedding"]
