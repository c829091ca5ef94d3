"""Every model in MODELS, through the real trainer and its objective, on tiny data with histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.config import ModelConfig, TrainConfig
from recforge.data.batches import SplitData
from recforge.data.history import build_histories
from recforge.features import FeatureLayout
from recforge.models import MODELS, build_model
from recforge.train.objectives import InBatchRetrieval, Pointwise
from recforge.train.trainer import TrainOptions, train

FEATURES = FeatureLayout(("user", "item", "hour", "category"), (41, 31, 25, 6), ("position",),
                       roles=("user", "item", "context", "item_feature"), history_length=5)


def _data(n: int = 3000) -> SplitData:
    rng = np.random.default_rng(0)
    user = rng.integers(1, 41, n)
    item = rng.integers(1, 31, n)
    times = np.arange(n)
    label = (rng.random(n) < 1 / (1 + np.exp(-3 * np.sin(user * 0.9) * np.cos(item * 0.7)))).astype(np.float32)
    values, offsets = build_histories(user, times, item, label, max_len=5)
    categorical = np.stack([user, item, rng.integers(0, 25, n), item % 5 + 1], axis=1)
    numeric = torch.from_numpy(rng.normal(size=(n, 1)).astype(np.float32))
    return SplitData("train", torch.from_numpy(categorical), numeric, torch.from_numpy(label), user,
                     torch.from_numpy(values), torch.from_numpy(offsets))


def _objective(model: torch.nn.Module, data: SplitData) -> tuple[torch.nn.Module, SplitData]:
    if hasattr(model, "item_vector"):  # a retrieval model (two_tower, sasrec)
        positives = data.select(torch.nonzero(data.label > 0).squeeze(1))
        counts = torch.bincount(positives.categorical[:, 1], minlength=31).double() + 1
        return InBatchRetrieval(model, torch.log(counts / counts.sum()), item_column=1), positives
    return Pointwise(model), data


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_with_a_falling_loss_and_scripts(name, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, embedding_dim=8, hidden=[16], dropout=0.0)
    model = build_model(FEATURES, cfg, sparse=True)
    objective, data = _objective(model, _data())
    full = data.batch(torch.arange(len(data)))

    def loss() -> float:
        with torch.no_grad():
            return float(objective(full.categorical, full.numeric, full.label, full.history_values,
                                   full.history_offsets))

    before = loss()
    batch_size = 256
    train(model, data, None, TrainConfig(epochs=6, batch_size=batch_size, lr=0.02, progress=False, checkpoint_every=0),
          TrainOptions(tmp_path, seed=0, objective=objective, log=lambda _: None))
    objective.eval()
    after = loss()
    assert after < before - 0.02, (name, before, after)
    scripted = torch.jit.script(model.eval())
    assert torch.allclose(scripted(full.categorical, full.numeric, full.history_values, full.history_offsets),
                          model(full.categorical, full.numeric, full.history_values, full.history_offsets), atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, e in MODELS.items() if e.kind == "retrieval"))
def test_full_softmax_is_cross_entropy_over_the_catalog_and_trains(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(FEATURES, ModelConfig(name=name, embedding_dim=8, hidden=[16], dropout=0.0), sparse=True)
    data = _data()
    positives = data.select(torch.nonzero(data.label > 0).squeeze(1))
    catalog = torch.stack([torch.arange(31), torch.arange(31) % 5 + 1], dim=1)  # item id, its category
    objective = InBatchRetrieval(model, torch.zeros(31), item_column=1, loss="full_softmax", catalog=catalog)
    batch = positives.batch(torch.arange(64))
    args = (batch.categorical, batch.numeric, batch.label, batch.history_values, batch.history_offsets)
    model.eval()
    with torch.no_grad():
        users = model.user_vector(batch.categorical, batch.numeric, batch.history_values, batch.history_offsets)
        logits = users @ model.item_vector(catalog).T / model.temperature
        by_hand = -torch.log_softmax(logits, dim=1)[torch.arange(64), batch.categorical[:, 1]].mean()
        assert float(objective(*args)) == pytest.approx(float(by_hand), rel=1e-5)
        before = float(objective(*args))
    model.train()
    train(model, positives, None, TrainConfig(epochs=10, batch_size=256, lr=0.02, progress=False, checkpoint_every=0),
          TrainOptions(tmp_path, seed=0, objective=objective, log=lambda _: None))
    model.eval()
    with torch.no_grad():
        assert float(objective(*args)) < before - 0.05
