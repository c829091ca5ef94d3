"""Model builders, in an explicit registry: MODELS[name] is a ModelEntry (its builder and its kind).

A model's kind says what it is for: a "ranking" model scores (user, item) rows with a click logit;
a "retrieval" model also embeds users and items for an index (`user_vector`, `item_vector`). The
recipes map a kind to its training objective and validation (recforge.recipes.kinds), and a bundle
records it in its manifest, so nothing downstream asks a model for its class. Every builder takes
the same recforge.features.FeatureLayout the prepared data was written with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from recforge.config import ModelConfig
from recforge.features import FeatureLayout
from recforge.models.dcn import DCNv2
from recforge.models.deepfm import DeepFM
from recforge.models.din import DIN
from recforge.models.dnn import DNNRanker
from recforge.models.sasrec import SASRec
from recforge.models.two_tower import TwoTower
from recforge.nn import MLP, CrossNetwork, FusedEmbedding, TargetAttention, Tower
from recforge.nn.sequence import SequenceEncoder


def _table(cardinalities: list[int], dim: int, cfg: ModelConfig, sparse: bool) -> FusedEmbedding:
    """An embedding table with the config's init scale and embedding dropout."""
    return FusedEmbedding(cardinalities, dim, sparse=sparse, init_std=cfg.embedding_init_std,
                          dropout=cfg.embedding_dropout)


def build_dnn(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    embeddings = _table(list(features.cardinalities), cfg.embedding_dim, cfg, sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    mlp = MLP(in_dim, list(cfg.hidden), cfg.dropout)
    return DNNRanker(embeddings, mlp, num_numeric=len(features.numeric))


def build_two_tower(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    user_columns = features.columns("user", "context")
    item_columns = features.item_columns
    dim = cfg.embedding_dim
    user_embeddings = _table([features.cardinalities[c] for c in user_columns], dim, cfg, sparse)
    item_embeddings = _table([features.cardinalities[c] for c in item_columns], dim, cfg, sparse)
    # The user tower also takes the pooled history (one item-embedding wide).
    user_mlp = Tower(len(user_columns) * dim + dim, list(cfg.hidden), dim, cfg.dropout)
    item_mlp = Tower(len(item_columns) * dim, list(cfg.hidden), dim, cfg.dropout)
    return TwoTower(user_embeddings, item_embeddings, user_mlp, item_mlp, user_columns, item_columns,
                    num_numeric=0, temperature=cfg.temperature, normalize=cfg.normalize)


def build_deepfm(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    cardinalities = list(features.cardinalities)
    embeddings = _table(cardinalities, cfg.embedding_dim, cfg, sparse)
    # The first-order weights are embedding rows too: sparse like the main table, so a row-wise
    # optimizer updates only the rows a batch touches.
    first_order = FusedEmbedding(cardinalities, 1, sparse=sparse, init_std=cfg.embedding_init_std)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    mlp = MLP(in_dim, list(cfg.hidden), cfg.dropout)
    return DeepFM(embeddings, first_order, mlp, num_numeric=len(features.numeric))


def build_dcnv2(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    embeddings = _table(list(features.cardinalities), cfg.embedding_dim, cfg, sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    cross = CrossNetwork(in_dim, cfg.cross_layers, low_rank=cfg.cross_low_rank)
    mlp = MLP(cross.out_dim if cfg.structure == "stacked" else in_dim, list(cfg.hidden), cfg.dropout)
    return DCNv2(embeddings, cross, mlp, num_numeric=len(features.numeric), structure=cfg.structure)


def build_din(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    dim = cfg.embedding_dim
    embeddings = _table(list(features.cardinalities), dim, cfg, sparse)
    # Inputs: every field's embedding, the attention-pooled history (one embedding), numeric features.
    mlp = MLP((len(features.categorical) + 1) * dim + len(features.numeric), list(cfg.hidden), cfg.dropout)
    return DIN(embeddings, TargetAttention(dim), mlp, item_column=features.item_column,
               num_numeric=len(features.numeric))


def build_sasrec(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    item_column = features.item_column
    items = _table([features.cardinalities[item_column]], cfg.embedding_dim, cfg, sparse)
    encoder = SequenceEncoder(cfg.embedding_dim, features.history_length, cfg.attention_blocks, cfg.attention_heads,
                              cfg.dropout)
    return SASRec(items, encoder, features.item_columns, temperature=cfg.temperature, normalize=cfg.normalize)


ModelKind = Literal["ranking", "retrieval"]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo: how to build it from the feature layout, and what kind of model it is."""

    build: Callable[..., nn.Module]  # (features, ModelConfig, sparse=False) -> nn.Module
    kind: ModelKind
    needs_history: bool = False  # trains only on prepared data with user histories (data.history_length)


MODELS: dict[str, ModelEntry] = {
    "dnn": ModelEntry(build_dnn, "ranking"),
    "two_tower": ModelEntry(build_two_tower, "retrieval"),
    "deepfm": ModelEntry(build_deepfm, "ranking"),
    "dcnv2": ModelEntry(build_dcnv2, "ranking"),
    "din": ModelEntry(build_din, "ranking", needs_history=True),
    "sasrec": ModelEntry(build_sasrec, "retrieval", needs_history=True),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(features: FeatureLayout, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    return model_entry(cfg.name).build(features, cfg, sparse=sparse)
