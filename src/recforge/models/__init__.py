"""Model builders, in an explicit registry: MODELS[name](features, config) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from recforge.config import ModelConfig
from recforge.models.dcn import DCNv2
from recforge.models.deepfm import DeepFM
from recforge.models.din import DIN
from recforge.models.dnn import DNNRanker
from recforge.models.two_tower import TwoTower
from recforge.nn import MLP, CrossNetwork, FusedEmbedding, TargetAttention, Tower


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know of the prepared data: field names and sizes."""

    categorical: tuple[str, ...]
    cardinalities: tuple[int, ...]
    numeric: tuple[str, ...]
    # Role of each categorical field: user, item, context or item_feature (prepared meta.json).
    roles: tuple[str, ...] = ()

    def columns(self, *roles: str) -> list[int]:
        """Positions of the fields with these roles; without recorded roles, field 0 is the user, 1 the item."""
        known = self.roles or ("user", "item", *["context"] * (len(self.categorical) - 2))
        return [i for i, role in enumerate(known) if role in roles]


def build_dnn(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    embeddings = FusedEmbedding(list(features.cardinalities), cfg.embedding_dim, sparse=sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    mlp = MLP(in_dim, list(cfg.hidden), cfg.dropout)
    return DNNRanker(embeddings, mlp, num_numeric=len(features.numeric))


def build_two_tower(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    user_columns = features.columns("user", "context")
    item_columns = features.columns("item", "item_feature")
    dim = cfg.embedding_dim
    user_embeddings = FusedEmbedding([features.cardinalities[c] for c in user_columns], dim, sparse=sparse)
    item_embeddings = FusedEmbedding([features.cardinalities[c] for c in item_columns], dim, sparse=sparse)
    # The user tower also takes the pooled history (one item-embedding wide).
    user_mlp = Tower(len(user_columns) * dim + dim, list(cfg.hidden), dim, cfg.dropout)
    item_mlp = Tower(len(item_columns) * dim, list(cfg.hidden), dim, cfg.dropout)
    return TwoTower(user_embeddings, item_embeddings, user_mlp, item_mlp, user_columns, item_columns,
                    num_numeric=0, temperature=cfg.temperature, normalize=cfg.normalize)


def build_deepfm(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    cardinalities = list(features.cardinalities)
    embeddings = FusedEmbedding(cardinalities, cfg.embedding_dim, sparse=sparse)
    # The first-order weights are embedding rows too: sparse like the main table, so a row-wise
    # optimizer updates only the rows a batch touches.
    first_order = FusedEmbedding(cardinalities, 1, sparse=sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    mlp = MLP(in_dim, list(cfg.hidden), cfg.dropout)
    return DeepFM(embeddings, first_order, mlp, num_numeric=len(features.numeric))


def build_dcnv2(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    embeddings = FusedEmbedding(list(features.cardinalities), cfg.embedding_dim, sparse=sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    cross = CrossNetwork(in_dim, cfg.cross_layers, low_rank=cfg.cross_low_rank)
    mlp = MLP(cross.out_dim if cfg.structure == "stacked" else in_dim, list(cfg.hidden), cfg.dropout)
    return DCNv2(embeddings, cross, mlp, num_numeric=len(features.numeric), structure=cfg.structure)


def build_din(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    dim = cfg.embedding_dim
    embeddings = FusedEmbedding(list(features.cardinalities), dim, sparse=sparse)
    # Inputs: every field's embedding, the attention-pooled history (one embedding), numeric features.
    mlp = MLP((len(features.categorical) + 1) * dim + len(features.numeric), list(cfg.hidden), cfg.dropout)
    return DIN(embeddings, TargetAttention(dim), mlp, item_column=features.columns("item")[0],
               num_numeric=len(features.numeric))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "dnn": build_dnn,
    "two_tower": build_two_tower,
    "deepfm": build_deepfm,
    "dcnv2": build_dcnv2,
    "din": build_din,
}


def build_model(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model '{cfg.name}'; available: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](features, cfg, sparse=sparse)
