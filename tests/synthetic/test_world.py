"""The synthetic world and its impression log, on a small world (seconds, not minutes)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from recforge.config import GenerateConfig
from recforge.synthetic.logs import LOG_SCHEMA, generate, generate_log
from recforge.synthetic.world import (
    DEVICES,
    SECONDS_PER_DAY,
    World,
    build_world,
    device_codes,
    period_start,
)

SMALL = GenerateConfig(users=500, items=300, events=20_000, days=14, categories=10, latent_dim=8, seed=11)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(SMALL)


@pytest.fixture(scope="module")
def log(world: World) -> pa.Table:
    return generate_log(world, SMALL)


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _true_probability(world: World, cols: dict[str, np.ndarray]) -> np.ndarray:
    device = device_codes(cols["device"])
    day = (cols["timestamp"] - period_start(SMALL)) // SECONDS_PER_DAY
    return world.click_probability(
        cols["user_id"], cols["item_id"], cols["hour"], device, cols["position"], day
    )


def _world_arrays(w: World) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(w).items() if isinstance(v, np.ndarray)}


def test_same_seed_same_world_and_log(world: World, log: pa.Table) -> None:
    again = build_world(SMALL)
    for name, array in _world_arrays(world).items():
        np.testing.assert_array_equal(array, getattr(again, name), err_msg=name)
    assert generate_log(again, SMALL).equals(log)


def test_different_seed_differs(world: World, log: pa.Table) -> None:
    other_cfg = SMALL.model_copy(update={"seed": SMALL.seed + 1})
    other = build_world(other_cfg)
    assert not np.array_equal(other.item_popularity, world.item_popularity)
    assert not np.allclose(other.user_taste, world.user_taste)
    assert not generate_log(other, other_cfg).equals(log)


def test_exact_schema_and_row_count(log: pa.Table) -> None:
    assert log.schema.equals(LOG_SCHEMA)
    assert log.column_names == [
        "user_id",
        "item_id",
        "timestamp",
        "hour",
        "device",
        "category",
        "position",
        "label",
    ]
    assert [str(t) for t in log.schema.types] == ["int64"] * 4 + ["string"] + ["int64"] * 3
    assert log.num_rows == SMALL.events


def test_time_period_hours_and_order(log: pa.Table) -> None:
    cols = _columns(log)
    ts = cols["timestamp"]
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert ts.min() >= start and ts.max() < start + SMALL.days * SECONDS_PER_DAY
    assert np.all(np.diff(ts) >= 0)
    np.testing.assert_array_equal(cols["hour"], (ts // 3600) % 24)
    assert set(np.unique(cols["position"])) == set(range(10))
    assert set(np.unique(cols["device"])) <= set(DEVICES)


def test_diurnal_traffic_night_below_evening(log: pa.Table) -> None:
    hours = np.bincount(_columns(log)["hour"], minlength=24)
    assert hours[20:23].sum() > 3 * hours[2:5].sum()


def test_only_released_items_and_item_columns(world: World, log: pa.Table) -> None:
    cols = _columns(log)
    day = (cols["timestamp"] - period_start(SMALL)) // SECONDS_PER_DAY
    assert np.all(world.item_release_day[cols["item_id"]] <= day)
    np.testing.assert_array_equal(cols["category"], world.item_category[cols["item_id"]])
    assert cols["user_id"].min() >= 0 and cols["user_id"].max() < SMALL.users


def test_new_items_arrive_during_period(world: World, log: pa.Table) -> None:
    cols = _columns(log)
    day = (cols["timestamp"] - period_start(SMALL)) // SECONDS_PER_DAY
    released_later = world.item_release_day[cols["item_id"]] > 0
    assert not released_later[day == 0].any()
    assert released_later[day == SMALL.days - 1].mean() > 0.1


def test_popularity_is_zipf_skewed(world: World, log: pa.Table) -> None:
    shown = np.sort(np.bincount(_columns(log)["item_id"], minlength=SMALL.items))[::-1]
    # Uniform exposure would give the top tenth about 10%; the feed concentrates on hot items.
    assert shown[: SMALL.items // 10].sum() / shown.sum() > 0.35
    # Hot ids are scattered over the id space, not 0..k.
    assert np.argsort(world.item_popularity)[-10:].max() > 30


def test_device_codes_round_trip() -> None:
    np.testing.assert_array_equal(device_codes(np.array(DEVICES[::-1])), np.arange(len(DEVICES))[::-1])
    with pytest.raises(ValueError, match="unknown device"):
        device_codes(np.array(["ios", "fridge"]))


def test_users_are_heavy_tailed(log: pa.Table) -> None:
    per_user = np.sort(np.bincount(_columns(log)["user_id"], minlength=SMALL.users))[::-1]
    assert per_user[: SMALL.users // 10].sum() / per_user.sum() > 0.30
    assert np.median(per_user) * 5 < per_user.max()


def test_users_mostly_on_one_device(world: World, log: pa.Table) -> None:
    cols = _columns(log)
    own = np.asarray(DEVICES, dtype=object)[world.user_device[cols["user_id"]]]
    assert (cols["device"] == own).mean() > 0.8


def test_ctr_and_position_bias(log: pa.Table) -> None:
    cols = _columns(log)
    assert 0.10 <= cols["label"].mean() <= 0.20
    top, bottom = cols["label"][cols["position"] == 0].mean(), cols["label"][cols["position"] == 9].mean()
    assert top > 1.5 * bottom


def test_labels_follow_the_click_model(world: World, log: pa.Table) -> None:
    cols = _columns(log)
    prob = _true_probability(world, cols)
    lo, hi = np.quantile(prob, [0.1, 0.9])
    assert cols["label"][prob >= hi].mean() > 3 * cols["label"][prob <= lo].mean()
    # Calibrated: the mean label matches the mean true probability.
    assert abs(cols["label"].mean() - prob.mean()) < 0.01


def test_taste_beats_popularity_on_later_days(world: World, log: pa.Table) -> None:
    """The data set's reason to exist: a personal model has a clear margin over popularity."""
    cols = _columns(log)
    day = (cols["timestamp"] - period_start(SMALL)) // SECONDS_PER_DAY
    test = day >= SMALL.days - 2
    clicks = np.bincount(cols["item_id"][~test], weights=cols["label"][~test], minlength=SMALL.items)
    oracle = roc_auc_score(cols["label"][test], _true_probability(world, cols)[test])
    popularity = roc_auc_score(cols["label"][test], clicks[cols["item_id"][test]])
    assert 0.72 < oracle < 0.88
    assert popularity < oracle - 0.10


def test_click_model_broadcasts_and_matches_probability(world: World) -> None:
    users = np.array([[0], [1], [2]])
    items = np.arange(5)[None, :]
    logit = world.click_logit(users, items, 20, 1, 0, 3)
    assert logit.shape == (3, 5)
    single = world.click_logit(
        np.array([2]), np.array([4]), np.array([20]), np.array([1]), np.array([0]), np.array([3])
    )
    assert logit[2, 4] == pytest.approx(single[0])
    np.testing.assert_allclose(world.click_probability(users, items, 20, 1, 0, 3), 1 / (1 + np.exp(-logit)))
    # Lower slots get fewer clicks, all else equal.
    by_position = world.click_logit(0, 0, 20, 1, np.arange(10), 3)
    assert np.all(np.diff(by_position) < 0)


def test_taste_drifts_over_days(world: World) -> None:
    users = np.arange(SMALL.users)
    first, last = world.taste(users, 0), world.taste(users, SMALL.days - 1)
    moved = np.linalg.norm(last - first, axis=1) / np.linalg.norm(first, axis=1)
    assert np.all(moved > 0.05)
    # Same user and item on a later day: the click model sees the moved taste.
    early = world.click_logit(users, 0, 12, 0, 0, 0)
    late = world.click_logit(users, 0, 12, 0, 0, SMALL.days - 1)
    assert not np.allclose(early, late)


def test_save_load_round_trip(world: World, tmp_path: Path) -> None:
    world.save(tmp_path / "world")
    loaded = World.load(tmp_path / "world")
    assert loaded.config == world.config
    for name, array in _world_arrays(world).items():
        np.testing.assert_array_equal(array, getattr(loaded, name), err_msg=name)
    rng = np.random.default_rng(0)
    n = 1000
    args = (
        rng.integers(0, SMALL.users, n),
        rng.integers(0, SMALL.items, n),
        rng.integers(0, 24, n),
        rng.integers(0, len(DEVICES), n),
        rng.integers(0, 10, n),
        rng.integers(0, SMALL.days, n),
    )
    np.testing.assert_array_equal(world.click_probability(*args), loaded.click_probability(*args))
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "world").iterdir())


def test_load_refuses_unknown_schema_version(world: World, tmp_path: Path) -> None:
    world.save(tmp_path)
    meta = (tmp_path / "world.json").read_text().replace('"schema_version": 1', '"schema_version": 99')
    (tmp_path / "world.json").write_text(meta)
    with pytest.raises(ValueError, match="schema version 99"):
        World.load(tmp_path)


def test_generate_writes_one_parquet_per_day(tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"days": 5, "events": 5_003})
    stale = tmp_path / "events" / "2025-12-31.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    summary = generate(cfg, tmp_path)
    files = sorted((tmp_path / "events").glob("*.parquet"))
    assert [f.name for f in files] == [f"2026-01-0{d}.parquet" for d in range(1, 6)]
    tables = [pq.read_table(f) for f in files]
    assert sum(t.num_rows for t in tables) == cfg.events == summary["rows"]
    for d, table in enumerate(tables):
        ts = table.column("timestamp").to_numpy()
        day_start = period_start(cfg) + d * SECONDS_PER_DAY
        assert ts.min() >= day_start and ts.max() < day_start + SECONDS_PER_DAY
    assert pa.concat_tables(tables).equals(generate_log(build_world(cfg), cfg))
    assert summary["days"] == 5 and summary["files"] == [str(f) for f in files]
    assert 0.0 < summary["ctr"] < 1.0 and summary["seconds"] >= 0
    assert World.load(tmp_path / "world").config == cfg
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
