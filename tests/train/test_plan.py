"""Memory planning arithmetic, and advice that actually makes the plan fit."""

from __future__ import annotations

from recforge.config import ModelConfig, TrainConfig
from recforge.train.plan import plan_memory

GIB = 1024**3


def test_hand_computed_small_plan():
    model = ModelConfig(embedding_dim=8, hidden=[4])
    plan = plan_memory({"user": 100, "item": 50}, 1, model, TrainConfig(batch_size=10, optimizer="adam"))
    assert plan.embedding_bytes == 150 * 8 * 4
    dense_params = (2 * 8 + 1) * 4 + 4 + 4 * 1 + 1  # 17x4 layer + bias, 4x1 head + bias
    assert plan.dense_bytes == dense_params * 4
    assert plan.gradient_bytes == plan.embedding_bytes + plan.dense_bytes  # dense Adam: full gradient
    assert plan.optimizer_bytes == 2 * (plan.embedding_bytes + plan.dense_bytes)
    lazy = plan_memory({"user": 100, "item": 50}, 1, model, TrainConfig(batch_size=10, optimizer="rowwise_adam"))
    assert lazy.gradient_bytes == 10 * 2 * 8 * 4 + plan.dense_bytes  # only rows a batch touches


def test_too_big_table_gets_advice_that_fits():
    model = ModelConfig(embedding_dim=64)
    fields = {"user": 1_000_000, "item": 50_000_000, "hour": 25}
    plan = plan_memory(fields, 0, model, TrainConfig(optimizer="adam"), device_bytes=24 * GIB, device_name="gpu")
    assert plan.fits is False
    hint = next(a for a in plan.advice if "hash_buckets" in a)
    buckets = int(hint.split("item: ")[1].split("}")[0])
    assert 0 < buckets < 50_000_000
    fixed = plan_memory({**fields, "item": buckets + 1}, 0, model, TrainConfig(optimizer="rowwise_adam"),
                        device_bytes=24 * GIB, device_name="gpu")
    assert fixed.fits is True
    assert any("TorchRec" in a for a in plan.advice)


def test_unknown_device_gives_no_verdict():
    plan = plan_memory({"a": 10}, 0, ModelConfig(), TrainConfig())
    assert plan.fits is None and plan.advice == []
