"""train.id_dropout: the unknown user and item rows are trained by rows whose ids were replaced, and
only while training; without it no example ever reaches them."""

from __future__ import annotations

import torch

from recforge.config import ModelConfig
from recforge.features import FeatureLayout
from recforge.models import build_model
from recforge.train.objectives import Pointwise, unknown_ids

FEATURES = FeatureLayout(("user", "item", "hour"), (50, 40, 24), (), ("user", "item", "context"))


def _batch(n: int = 4000) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    categorical = torch.stack([torch.randint(1, 50, (n,), generator=g), torch.randint(1, 40, (n,), generator=g),
                               torch.randint(0, 24, (n,), generator=g)], dim=1)
    label = (torch.rand(n, generator=g) < 0.3).float()
    return categorical, torch.zeros(n, 0), label, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


def test_unknown_ids_replaces_about_the_rate_of_the_id_columns_only():
    categorical = _batch()[0]
    torch.manual_seed(1)
    out = unknown_ids(categorical, torch.tensor([0, 1]), 0.2)
    dropped = (out[:, :2] == 0).float().mean(0)
    assert torch.all((dropped - 0.2).abs() < 0.03), dropped
    assert torch.equal(out[:, 2], categorical[:, 2])
    kept = out[:, :2] != 0
    assert torch.equal(out[:, :2][kept], categorical[:, :2][kept])
    assert torch.all(categorical[:, :2] > 0)  # the input is not modified


def test_the_unknown_rows_learn_only_with_id_dropout():
    def unknown_row_gradients(rate: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model(FEATURES, ModelConfig(name="deepfm", embedding_dim=4, hidden=[8], dropout=0.0))
        objective = Pointwise(model, (0, 1), rate)
        objective(*_batch()).backward()
        # Row 0 of the user field and row 0 of the item field (offset 50) in each table of DeepFM.
        return torch.stack([model.embeddings.table.weight.grad[[0, 50]].abs().sum(),
                            model.first_order.table.weight.grad[[0, 50]].abs().sum()])

    assert torch.all(unknown_row_gradients(0.0) == 0)
    assert torch.all(unknown_row_gradients(0.1) > 0)


def test_evaluation_sees_the_ids_as_given():
    torch.manual_seed(0)
    model = build_model(FEATURES, ModelConfig(name="dnn", embedding_dim=4, hidden=[8], dropout=0.0))
    objective = Pointwise(model, (0, 1), 0.5).eval()
    batch = _batch(500)
    assert torch.equal(objective(*batch), Pointwise(model).eval()(*batch))
