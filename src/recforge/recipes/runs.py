"""What every recipe reads from a prepared directory or a trained run directory.

A run directory holds the config it was trained with (config.yaml), its feature layout
(features.json), its weights (model.pt) and the environment it ran in (env.json); these helpers
are the one place that knows those names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recforge import config as config_module
from recforge.config import Config
from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.models import build_model
from recforge.runtime import environment_drift
from recforge.storage import read_json

Log = Callable[[str], None]


def feature_layout(prepared_dir: Path) -> FeatureLayout:
    """The feature layout of a prepared dataset (its features.json, or the meta.json of an older one)."""
    return FeatureLayout.load(prepared_dir)


def empty_split_message(prepared: Path, split: str) -> str:
    """Why a split has no rows, as the prepared data's own split settings say, and what to do."""
    meta = read_json(prepared / "meta.json").get("split", {})
    how = f"data.split.method={meta.get('method')}, valid_fraction={meta.get('valid_fraction')}, " \
          f"test_fraction={meta.get('test_fraction')}"
    return (f"split '{split}' of {prepared} has no rows (prepared with {how}); score another split "
            "(--split valid) or prepare again with a held-out share for it")


def item_catalog(prepared: Path, features: FeatureLayout) -> torch.Tensor:
    """[items, 1 + item features]: each item index's item-side columns (item id, then its features)."""
    item_features = np.load(prepared / "items" / "features.npy")
    ids = np.arange(len(item_features), dtype=np.int64)[:, None]
    return torch.from_numpy(np.concatenate([ids, item_features], axis=1))


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no trained run at {run_dir} (missing config.yaml); run `recforge train` first")
    return config_module.load(path)


def load_trained_model(run_dir: Path) -> torch.nn.Module:
    run_cfg = load_run_config(run_dir)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} has no model.pt: the run ended before its first epoch finished")
    features = FeatureLayout.load(run_dir / FEATURES_FILE)
    model = build_model(features, run_cfg.model, sparse=run_cfg.train.sparse_embeddings)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return model


def warn_environment_drift(run_dir: Path, log: Log) -> list[str]:
    """Say so when this environment differs from the run's in a way that can change results."""
    env_file = run_dir / "env.json"
    drift = environment_drift(read_json(env_file)) if env_file.is_file() else []
    for line in drift:
        log(f"warning: {run_dir} was trained in another environment: {line}; results may differ")
    return drift
