"""A model's kind comes from its MODELS entry, and the recipes map a kind to its objective, its
validation and its item index in one table: no recipe asks a model for its class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from recforge.config import ModelConfig, from_dict
from recforge.data.batches import SplitData
from recforge.features import FeatureLayout
from recforge.models import MODELS, build_model, model_entry
from recforge.recipes.kinds import KIND_RECIPES, kind_recipe
from recforge.train.objectives import InBatchRetrieval, Pointwise

SRC = Path(__file__).resolve().parents[2] / "src" / "recforge"
LAYOUT = FeatureLayout(("user", "item", "hour"), (6, 8, 4), ("position",), ("user", "item", "context"))
HISTORY_LAYOUT = FeatureLayout(LAYOUT.categorical, LAYOUT.cardinalities, LAYOUT.numeric, LAYOUT.roles,
                               history_length=3)


def _data() -> SplitData:
    categorical = torch.tensor([[1, 2, 0], [2, 3, 1], [3, 2, 2], [1, 5, 3]])
    return SplitData("train", categorical, torch.zeros(4, 1), torch.tensor([1.0, 0.0, 1.0, 1.0]),
                     torch.arange(4).numpy())


def test_every_model_has_a_kind_the_recipes_know():
    assert set(KIND_RECIPES) == {"ranking", "retrieval"}
    for name, entry in MODELS.items():
        assert entry.kind in KIND_RECIPES, name
    assert model_entry("two_tower").kind == "retrieval" and model_entry("dnn").kind == "ranking"
    assert model_entry("din").needs_history
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_entry("nope")


def test_a_retrieval_model_embeds_users_and_items():
    for name, entry in MODELS.items():
        layout = HISTORY_LAYOUT if entry.needs_history else LAYOUT
        model = build_model(layout, ModelConfig(name=name, embedding_dim=4, hidden=[8]))
        retrieval = hasattr(model, "user_vector") and hasattr(model, "item_vector")
        assert retrieval == (entry.kind == "retrieval"), name


def test_the_kind_picks_the_objective_and_the_rows():
    cfg = from_dict({"model": {"name": "two_tower", "embedding_dim": 4, "hidden": [8]}})
    tower = build_model(LAYOUT, cfg.model)
    rows, objective = kind_recipe("two_tower").objective(tower, _data(), LAYOUT, cfg)
    assert isinstance(objective, InBatchRetrieval) and len(rows) == 3  # the positive rows only
    assert kind_recipe("two_tower").item_index
    ranker_cfg = from_dict({"model": {"name": "dnn", "embedding_dim": 4, "hidden": [8]}})
    ranker = build_model(LAYOUT, ranker_cfg.model)
    rows, objective = kind_recipe("dnn").objective(ranker, _data(), LAYOUT, ranker_cfg)
    assert isinstance(objective, Pointwise) and len(rows) == 4
    assert not kind_recipe("dnn").item_index


def test_no_module_branches_on_the_two_tower_class():
    """The kind is read from MODELS; the objective that wraps a two-tower model may name its type."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and \
                    "TwoTower" in ast.unparse(node):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found == []


def test_a_retrieval_metric_on_a_ranking_model_is_refused_before_training(tmp_path):
    """The validator is refused when it is made (no data read, no epoch trained), naming the metric."""
    from recforge import config
    from recforge.features import FeatureLayout
    from recforge.recipes.kinds import validator_for

    cfg = config.load(None, ["model.name=dnn", "train.early_stopping_metric=recall@20"])
    layout = FeatureLayout(("user_id", "item_id"), (3, 4), (), ("user", "item"))
    with pytest.raises(ValueError, match="early_stopping_metric=recall@20 needs a retrieval model"):
        validator_for(tmp_path / "no-such-prepared-dir", layout, cfg)
