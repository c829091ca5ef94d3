"""The model zoo: every registered model scripts with identical outputs, keeps sparse embeddings
sparse, and learns a synthetic click task with a feature interaction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recforge.config import ConfigError, ModelConfig, from_dict
from recforge.features import FeatureLayout
from recforge.metrics import auc
from recforge.metrics import logloss as np_logloss
from recforge.models import MODELS, build_model
from recforge.models.dcn import DCNv2
from recforge.models.deepfm import DeepFM

FEATURES = FeatureLayout(("user", "item", "hour", "category"), (30, 50, 24, 7), ("position", "age"), history_length=6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a loaded 2-core machine: OpenMP threads spinning for each other cost far more
    than the math, so the file runs single-threaded (and restores the setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(features: FeatureLayout, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in features.cardinalities], dim=1)
    numeric = torch.randn(batch, len(features.numeric), generator=g)
    # Ragged click histories (item ids), as the data layer batches them: offsets [B + 1].
    lengths = torch.randint(0, 5, (batch,), generator=g)
    offsets = torch.zeros(batch + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.randint(0, features.cardinalities[1], (int(offsets[-1]),), generator=g)
    return categorical, numeric, values, offsets


# ---------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_scripts_with_identical_outputs(name):
    torch.manual_seed(0)
    model = build_model(FEATURES, ModelConfig(name=name, hidden=[32, 16])).eval()
    scripted = torch.jit.script(model)
    categorical, numeric, values, offsets = _inputs(FEATURES, 64, seed=1)
    with torch.no_grad():
        eager = model(categorical, numeric)
        assert eager.shape == (64,) and torch.isfinite(eager).all()
        assert torch.equal(scripted(categorical, numeric), eager)
        # The trainer and evaluation pass the histories too; every model takes them.
        with_history = model(categorical, numeric, values, offsets)
        assert torch.equal(scripted(categorical, numeric, values, offsets), with_history)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparse_option_reaches_every_embedding_table(name):
    torch.manual_seed(0)
    model = build_model(FEATURES, ModelConfig(name=name, hidden=[16]), sparse=True)
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert tables and all(t.sparse for t in tables)
    categorical, numeric, values, offsets = _inputs(FEATURES, 16, seed=2)
    model(categorical, numeric, values, offsets).sum().backward()
    assert all(t.weight.grad is None or t.weight.grad.is_sparse for t in tables)
    assert any(t.weight.grad is not None for t in tables)


def test_registry_holds_the_zoo():
    assert {"dnn", "deepfm", "dcnv2"} <= set(MODELS)
    assert isinstance(build_model(FEATURES, ModelConfig(name="deepfm")), DeepFM)
    assert isinstance(build_model(FEATURES, ModelConfig(name="dcnv2")), DCNv2)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model(FEATURES, ModelConfig(name="nope"))


# ---------------------------------------------------------------- DeepFM and DCN-V2 specifics


def test_deepfm_logit_is_first_order_plus_fm_plus_dnn():
    torch.manual_seed(0)
    model = build_model(FEATURES, ModelConfig(name="deepfm", hidden=[8], dropout=0.0)).double()
    categorical, numeric, _, _ = _inputs(FEATURES, 10, seed=3)
    numeric = numeric.double()
    with torch.no_grad():
        model.bias.fill_(0.25)
        emb = model.embeddings(categorical)
        first = model.first_order(categorical).sum(dim=(1, 2)) + numeric @ model.numeric_linear.weight[0] + 0.25
        pairs = sum((emb[:, i] * emb[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
        deep = model.head(model.mlp(torch.cat([emb.flatten(1), numeric], dim=1)))[:, 0]
        torch.testing.assert_close(model(categorical, numeric), first + pairs + deep)


def test_deepfm_without_numeric_features():
    features = FeatureLayout(("user", "item"), (5, 6), ())
    model = build_model(features, ModelConfig(name="deepfm", hidden=[4])).eval()
    categorical = torch.tensor([[1, 2], [4, 5]])
    assert model.numeric_linear is None
    assert torch.equal(torch.jit.script(model)(categorical, torch.zeros(2, 0)), model(categorical, torch.zeros(2, 0)))


def test_dcnv2_config_options():
    in_dim = 4 * 16 + 2
    parallel = build_model(FEATURES, ModelConfig(name="dcnv2", hidden=[32], cross_layers=2))
    assert len(parallel.cross.layers) == 2 and parallel.head.in_features == in_dim + 32
    stacked = build_model(FEATURES, ModelConfig(name="dcnv2", hidden=[32], structure="stacked"))
    assert len(stacked.cross.layers) == 3 and stacked.head.in_features == 32
    low = build_model(FEATURES, ModelConfig(name="dcnv2", hidden=[32], cross_low_rank=8))
    assert sum(p.numel() for p in low.cross.parameters()) == 3 * (2 * in_dim * 8 + in_dim)
    with pytest.raises(ConfigError, match="model.structure"):
        from_dict({"model": {"structure": "diagonal"}})
    assert ModelConfig().cross_layers == 3 and ModelConfig().cross_low_rank is None


# ---------------------------------------------------------------- learning a feature interaction


def _ctr_task(n: int, seed: int, additive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clicks from a known logit. Fields 0 and 1 interact through +-1 signs: sign0[a] * sign1[b], an
    XOR-like pattern with no first-order signal at all. With `additive`, per-value biases and a
    numeric slope are added on top. The world (signs, biases) is fixed; `seed` draws the rows."""
    world = np.random.default_rng(11)
    cards = (20, 20, 5)
    sign0, sign1 = world.choice([-1.0, 1.0], cards[0]), world.choice([-1.0, 1.0], cards[1])
    bias2 = world.normal(0, 0.7, cards[2])
    rng = np.random.default_rng(seed)
    categorical = np.stack([rng.integers(0, c, n) for c in cards], axis=1)
    numeric = rng.normal(size=(n, 1))
    logit = 3.0 * sign0[categorical[:, 0]] * sign1[categorical[:, 1]]
    if additive:
        logit = logit + bias2[categorical[:, 2]] + 0.8 * numeric[:, 0] - 0.5
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return torch.from_numpy(categorical), torch.from_numpy(numeric).float(), torch.from_numpy(labels)


def _train_and_score(cfg: ModelConfig, additive: bool, steps: int = 300) -> tuple[float, float, float, float]:
    """(base-rate logloss, logloss before, logloss after, AUC after), all on held-out rows; the base
    rate (one constant probability) is what a model that learned no feature at all would reach."""
    features = FeatureLayout(("a", "b", "c"), (20, 20, 5), ("x",))
    categorical, numeric, labels = _ctr_task(6000, seed=1, additive=additive)
    test_cat, test_num, test_y = _ctr_task(3000, seed=2, additive=additive)
    torch.manual_seed(0)
    model = build_model(features, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.BCEWithLogitsLoss()

    def held_out() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model(test_cat, test_num)).double().numpy()
        model.train()
        return np_logloss(test_y.numpy(), p), auc(test_y.numpy(), p)

    before, _ = held_out()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, categorical.shape[0], (512,), generator=g)
        opt.zero_grad()
        loss_fn(model(categorical[rows], numeric[rows]), labels[rows]).backward()
        opt.step()
    after, auc_after = held_out()
    rate = float(labels.mean())
    base = np_logloss(test_y.numpy(), np.full(test_y.shape[0], rate))
    return base, before, after, auc_after


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(name="deepfm", embedding_dim=8, hidden=[32, 16], dropout=0.0),
        ModelConfig(name="dcnv2", embedding_dim=8, hidden=[32, 16], dropout=0.0),
        ModelConfig(name="dcnv2", embedding_dim=8, hidden=[32], dropout=0.0, structure="stacked", cross_low_rank=4),
    ],
    ids=["deepfm", "dcnv2-parallel", "dcnv2-stacked-lowrank"],
)
def test_models_learn_a_ctr_task_with_an_interaction(cfg):
    base, before, after, auc_after = _train_and_score(cfg, additive=True)
    assert after < before - 0.15 and after < base - 0.3, (base, before, after)
    assert auc_after > 0.9


def test_dcnv2_learns_a_pure_multiplicative_interaction():
    """Only the product of fields 0 and 1 predicts the click. With no hidden layers the deep part is
    the identity, so everything beyond a linear model is the cross network's doing."""
    cfg = ModelConfig(name="dcnv2", embedding_dim=8, hidden=[], dropout=0.0, cross_layers=2)
    base, before, after, auc_after = _train_and_score(cfg, additive=False)
    # The best possible here (logit +-3 known exactly) is 0.19; knowing nothing, the base rate's 0.69.
    assert after < 0.3 and after < before - 0.3, (base, before, after)
    assert auc_after > 0.9
    # The same embeddings and head without the cross network: a linear model in the embeddings.
    _, _, linear_after, _ = _train_and_score(ModelConfig(name="dnn", embedding_dim=8, hidden=[], dropout=0.0),
                                             additive=False)
    assert linear_after > 0.6
