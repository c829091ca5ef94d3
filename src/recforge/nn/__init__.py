"""Building blocks that models are composed from (passed in, never inherited)."""

from recforge.nn.attention import TargetAttention
from recforge.nn.cross import CrossNetwork
from recforge.nn.embeddings import FusedEmbedding
from recforge.nn.fm import FactorizationMachine
from recforge.nn.mlp import MLP, Tower

__all__ = ["MLP", "CrossNetwork", "FactorizationMachine", "FusedEmbedding", "TargetAttention", "Tower"]
