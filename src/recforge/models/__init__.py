"""Model builders, in an explicit registry: MODELS[name](features, config) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from recforge.config import ModelConfig
from recforge.models.dnn import DNNRanker
from recforge.nn import MLP, FusedEmbedding


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know of the prepared data: field names and sizes."""

    categorical: tuple[str, ...]
    cardinalities: tuple[int, ...]
    numeric: tuple[str, ...]


def build_dnn(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    embeddings = FusedEmbedding(list(features.cardinalities), cfg.embedding_dim, sparse=sparse)
    in_dim = len(features.categorical) * cfg.embedding_dim + len(features.numeric)
    mlp = MLP(in_dim, list(cfg.hidden), cfg.dropout)
    return DNNRanker(embeddings, mlp, num_numeric=len(features.numeric))


MODELS: dict[str, Callable[..., nn.Module]] = {"dnn": build_dnn}


def build_model(features: FeatureSpec, cfg: ModelConfig, sparse: bool = False) -> nn.Module:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model '{cfg.name}'; available: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](features, cfg, sparse=sparse)
