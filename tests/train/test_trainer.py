"""The training loop: it learns, it resumes exactly, it checkpoints atomically, AMP bf16 trains on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.config import ModelConfig, TrainConfig
from recforge.data.batches import SplitData, epoch_permutation, iterate_batches, shard_indices
from recforge.features import FeatureLayout
from recforge.models import build_model
from recforge.train.trainer import TrainOptions, optimizer_step, train

FEATURES = FeatureLayout(("user", "item", "hour"), (51, 41, 25), ("position",))


def _toy_split(n: int, seed: int, name: str = "train") -> SplitData:
    """Clicks depend on a user x item interaction, so a model must learn embeddings to fit them."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, 51, n)
    item = rng.integers(1, 41, n)
    hour = rng.integers(0, 25, n)
    position = rng.normal(size=(n, 1)).astype(np.float32)
    taste = np.sin(user * 0.7) * np.cos(item * 1.3)
    prob = 1 / (1 + np.exp(-(2.5 * taste - 0.5 * position[:, 0])))
    label = (rng.random(n) < prob).astype(np.float32)
    return SplitData(
        name=name,
        categorical=torch.from_numpy(np.stack([user, item, hour], axis=1).astype(np.int64)),
        numeric=torch.from_numpy(position),
        label=torch.from_numpy(label),
        user_key=user.astype(np.int64),
    )


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=128, lr=0.01, checkpoint_every=5, progress=False, log_every=5, device="cpu",
                optimizer="adam")
    base.update(kw)
    return TrainConfig(**base)


def _model(sparse: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(FEATURES, ModelConfig(embedding_dim=8, hidden=[32, 16], dropout=0.2), sparse=sparse)


def _quiet(line: str) -> None:
    """Log sink for tests that do not look at the log."""


def _loss(model: torch.nn.Module, data: SplitData) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(data.categorical, data.numeric)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, data.label).item()


def test_training_lowers_the_loss(tmp_path):
    data = _toy_split(4000, seed=1)
    model = _model()
    before = _loss(model, data)
    result = train(model, data, None, _cfg(epochs=8), TrainOptions(tmp_path, seed=3, log=_quiet))
    assert result.state.finished and not result.interrupted
    assert _loss(model, data) < before - 0.05
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adam", "sparse_adam"])
def test_resume_after_interrupt_gives_identical_weights(tmp_path, optimizer):
    data = _toy_split(3000, seed=2)
    cfg = _cfg(optimizer=optimizer)
    full = _model(sparse=optimizer != "adam")
    train(full, data, None, cfg, TrainOptions(tmp_path / "full", seed=5, log=_quiet))

    # Interrupted mid-epoch (step 31 of 24 per epoch = epoch 1, step 7), then resumed in a fresh model.
    part = _model(sparse=optimizer != "adam")
    first = train(part, data, None, _cfg(optimizer=optimizer, stop_after_steps=31),
                  TrainOptions(tmp_path / "cut", seed=5, log=_quiet))
    assert first.interrupted and first.state.global_step == 31 and first.state.epoch == 1
    torch.manual_seed(1234)  # a resumed process starts from other RNG state; the checkpoint restores it
    resumed = _model(sparse=optimizer != "adam")
    second = train(resumed, data, None, cfg, TrainOptions(tmp_path / "cut", seed=5, resume=True, log=_quiet))
    assert second.state.finished and second.state.global_step == 3 * 24

    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_resume_refuses_a_different_config(tmp_path):
    data = _toy_split(1000, seed=3)
    train(_model(), data, None, _cfg(stop_after_steps=3), TrainOptions(tmp_path, seed=1, log=_quiet))
    with pytest.raises(ValueError, match="different model/training config"):
        train(_model(), data, None, _cfg(lr=0.5), TrainOptions(tmp_path, seed=1, resume=True, log=_quiet))


def test_early_stopping_stops_and_keeps_best(tmp_path):
    data = _toy_split(2000, seed=4)
    calls = iter([0.70, 0.72, 0.71, 0.69, 0.90, 0.95])

    def validate(model):
        return {"auc": next(calls), "gauc": 0.5, "logloss": 0.6}

    result = train(_model(), data, validate, _cfg(epochs=6, patience=2), TrainOptions(tmp_path, seed=1, log=_quiet))
    assert result.state.best_epoch == 1
    assert result.state.best_metric == pytest.approx(0.72)
    assert len(result.state.history) == 4  # epochs 0..3; 2 without improvement after epoch 1


def test_without_early_stopping_every_epoch_runs_and_the_last_is_kept(tmp_path):
    data = _toy_split(2000, seed=4)
    calls = iter([0.70, 0.72, 0.71, 0.69, 0.68])

    def validate(model):
        return {"auc": next(calls), "gauc": 0.5, "logloss": 0.6}

    model = _model()
    result = train(model, data, validate, _cfg(epochs=5, patience=1, early_stopping=False),
                   TrainOptions(tmp_path, seed=1, log=_quiet))
    assert len(result.state.history) == 5 and result.state.best_epoch == 4
    assert [r["valid_auc"] for r in result.state.history] == [0.70, 0.72, 0.71, 0.69, 0.68]
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())


def test_bf16_autocast_trains_on_cpu(tmp_path):
    data = _toy_split(4000, seed=6)
    model = _model()
    before = _loss(model, data)
    train(model, data, None, _cfg(epochs=8, amp="bf16"), TrainOptions(tmp_path, seed=3, log=_quiet))
    assert _loss(model, data) < before - 0.05


def test_fp16_on_cpu_fails_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(_model(), _toy_split(100, seed=1), None, _cfg(amp="fp16"), TrainOptions(tmp_path, seed=1, log=_quiet))


def test_cuda_requested_without_gpu_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="is_available"):
        train(_model(), _toy_split(100, seed=1), None, _cfg(device="cuda"), TrainOptions(tmp_path, seed=1, log=_quiet))


def test_batches_cover_every_row_once_per_epoch():
    data = _toy_split(1000, seed=7)
    seen = torch.cat([b.numeric[:, 0] for b in iterate_batches(data, 96, shuffle=True, seed=1, epoch=0)])
    assert torch.equal(seen.sort().values, data.numeric[:, 0].sort().values)
    assert not torch.equal(epoch_permutation(1000, 1, 0), epoch_permutation(1000, 1, 1))
    skipped = list(iterate_batches(data, 96, shuffle=True, seed=1, epoch=0, start_sample=3 * 96))
    full = list(iterate_batches(data, 96, shuffle=True, seed=1, epoch=0))
    assert torch.equal(skipped[0].label, full[3].label)


def test_rank_shards_are_disjoint_and_equal():
    order = epoch_permutation(1003, 0, 0)
    shards = [shard_indices(order, r, 4) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    union = torch.cat(shards)
    assert len(union.unique()) == len(union)


def test_grad_scaler_skips_and_counts_inf_steps():
    """The fp16 path's bookkeeping, exercised with torch's CPU GradScaler: an inf loss is skipped and counted."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    skipped = torch.zeros(())
    x = torch.ones(4, 3)
    before = model.weight.detach().clone()
    optimizer_step(model(x).sum() * float("inf"), [opt], scaler, skipped)
    assert skipped.item() == 1 and torch.equal(model.weight, before)
    optimizer_step(model(x).sum(), [opt], scaler, skipped)
    assert skipped.item() == 1 and not torch.equal(model.weight, before)


def test_optimizer_step_reads_the_scaler_through_its_public_api():
    """A disabled GradScaler has no scale tensor; the step must still train and count nothing as skipped."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    skipped = torch.zeros(())
    before = model.weight.detach().clone()
    optimizer_step(model(torch.ones(4, 3)).sum(), [opt], scaler, skipped)
    assert skipped.item() == 0 and not torch.equal(model.weight, before)


def test_train_options_take_a_str_run_dir(tmp_path):
    options = TrainOptions(str(tmp_path / "run"), seed=1, log=_quiet)
    assert options.run_dir == tmp_path / "run"
    result = train(_model(), _toy_split(300, seed=1), None, _cfg(epochs=1), options)
    assert result.run_dir == tmp_path / "run" and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_optimizer_step_counts_a_step_the_scaler_skipped():
    """inf gradients: GradScaler skips the update and lowers the scale; the step is counted, the weights stay."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    skipped = torch.zeros(())
    before = model.weight.detach().clone()
    optimizer_step(model(torch.full((4, 3), float("inf"))).sum(), [opt], scaler, skipped)
    assert skipped.item() == 1 and torch.equal(model.weight, before)
    optimizer_step(model(torch.ones(4, 3)).sum(), [opt], scaler, skipped)
    assert skipped.item() == 1 and not torch.equal(model.weight, before)


def test_weight_decay_reaches_the_embedding_rows_and_is_refused_where_it_cannot():
    from recforge.train.optim import RowWiseAdam
    from recforge.train.trainer import make_optimizers

    model = build_model(FEATURES, ModelConfig(name="dnn", hidden=[8]), sparse=True)
    lazy, dense = make_optimizers(model, _cfg(optimizer="rowwise_adam", weight_decay=0.01))
    assert isinstance(lazy, RowWiseAdam) and lazy.param_groups[0]["weight_decay"] == 0.01
    assert dense.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="sparse_adam"):
        make_optimizers(model, _cfg(optimizer="sparse_adam", weight_decay=0.01))


def test_embedding_dropout_acts_in_training_only_and_init_scale_is_the_config_s():
    model = build_model(FEATURES, ModelConfig(name="dnn", hidden=[8], embedding_dropout=0.5, embedding_init_std=0.2))
    weight = model.embeddings.table.weight.detach()
    assert 0.15 < float(weight.std()) < 0.25
    rows = torch.tensor([[1, 2, 3]] * 64)
    model.train()
    dropped = model.embeddings(rows)
    assert float((dropped == 0).float().mean()) > 0.3
    model.eval()
    assert torch.equal(model.embeddings(rows), model.embeddings.table(rows + model.embeddings.offsets))
