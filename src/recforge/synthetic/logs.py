"""Impression logs drawn from a World: who opened the feed when, what it showed, what they clicked.

The feed mixes sources the way production feeds do: a share of slots comes from global
popularity, a share from the user's preferred categories and a little from uniform exploration.
Exposure is therefore popularity-skewed while clicks follow personal taste, which is what makes a
learned user x item model beat a popularity ranking on later days.

All events are drawn at once as (request x slot) matrices; the only Python loop runs over days,
because the catalogue a feed can draw from changes from one day to the next.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.config import GenerateConfig
from recforge.storage import atomic_open
from recforge.synthetic.sequences import generate_sequences
from recforge.synthetic.world import (
    DEVICES,
    FEED_SLOTS,
    LOG_STREAM,
    SECONDS_PER_DAY,
    World,
    build_world,
    period_start,
)

# Feed sources per slot: global popularity, the user's categories, uniform exploration.
_SOURCE_SHARE = np.array([0.45, 0.45, 0.10])
# Within the user's three preferred categories, how often each one fills a category slot.
_CATEGORY_PICK = np.array([0.6, 0.3, 0.1])
PREFERRED_DEVICE_SHARE = 0.85
# Fresh items get pushed: exposure falls to this floor share as an item ages.
_EXPOSURE_FLOOR = 0.25
_EXPOSURE_AGE_DAYS = 4.0
_MAX_SCROLL_GAP_S = 6
_DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.parquet$")

LOG_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("hour", pa.int64()),
        ("device", pa.string()),
        ("category", pa.int64()),
        ("position", pa.int64()),
        ("label", pa.int64()),
    ]
)


def draw_weighted(rng: np.random.Generator, weights: np.ndarray, size: int) -> np.ndarray:
    # Inverse-CDF sampling: one searchsorted for all draws instead of rng.choice's per-call setup.
    cum = np.cumsum(weights)
    picks = np.searchsorted(cum, rng.random(size) * cum[-1], side="right")
    return np.minimum(picks, len(weights) - 1).astype(np.int64)


def _day_weights(cfg: GenerateConfig) -> np.ndarray:
    """Traffic per day: weekends a little busier, slow growth over the period."""
    start_weekday = datetime.fromtimestamp(period_start(cfg), tz=UTC).weekday()
    weekday = (start_weekday + np.arange(cfg.days)) % 7
    weights = (1.0 + 0.15 * (weekday >= 5)) * (1.0 + 0.01 * np.arange(cfg.days))
    return weights / weights.sum()


def _duplicate_mask(slots: np.ndarray) -> np.ndarray:
    """True for every repeat of an item already shown earlier in the same request's sort order."""
    order = np.argsort(slots, axis=1, kind="stable")
    ranked = np.take_along_axis(slots, order, axis=1)
    repeat = np.zeros(slots.shape, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    mask = np.zeros(slots.shape, dtype=bool)
    np.put_along_axis(mask, order, repeat, axis=1)
    return mask


def _feed_for_day(
    world: World,
    rng: np.random.Generator,
    day: int,
    source: np.ndarray,
    slot_category: np.ndarray,
) -> np.ndarray:
    """Fill the (requests x slots) item matrix of one day from that day's released catalogue."""
    # Released items in category order, so each category is one contiguous run of the cumsum.
    released = np.flatnonzero(world.released(day))
    released = released[np.argsort(world.item_category[released], kind="stable")]
    age = day - world.item_release_day[released]
    exposure = world.item_popularity[released] * (
        _EXPOSURE_FLOOR + (1 - _EXPOSURE_FLOOR) * np.exp(-age / _EXPOSURE_AGE_DAYS)
    )
    cum = np.cumsum(exposure)
    total = cum[-1]
    bounds = np.searchsorted(world.item_category[released], np.arange(world.config.categories + 1))
    cum0 = np.concatenate([[0.0], cum])
    lo, hi = cum0[bounds[slot_category]], cum0[bounds[slot_category + 1]]
    # A preferred category with nothing released yet falls back to the popular source.
    use_category = (source == 1) & (hi > lo)
    use_uniform = source == 2

    u = rng.random(source.shape)
    target = np.where(use_category, lo + u * (hi - lo), u * total)
    picks = np.searchsorted(cum, target, side="right")
    # Float rounding can push a draw onto the run's end; clamp into the run it was meant for.
    run_end = np.where(use_category, bounds[slot_category + 1], len(released)) - 1
    picks = np.minimum(picks, run_end)
    uniform = rng.integers(0, len(released), source.shape)
    slots = released[np.where(use_uniform, uniform, picks)]

    # A feed does not show the same item twice in one request; redraw repeats uniformly.
    for _ in range(3):
        repeat = _duplicate_mask(slots)
        n_repeat = int(repeat.sum())
        if n_repeat == 0 or len(released) < FEED_SLOTS:
            break
        slots[repeat] = released[rng.integers(0, len(released), n_repeat)]
    return slots


def generate_log(world: World, cfg: GenerateConfig) -> pa.Table:
    """Draw cfg.events impressions with click labels, sorted by timestamp (schema: LOG_SCHEMA).

    Requests of FEED_SLOTS impressions are drawn whole; the last one is cut so the row count is
    exactly cfg.events.
    """
    if (cfg.users, cfg.items, cfg.categories, cfg.latent_dim) != (
        world.n_users,
        world.n_items,
        world.config.categories,
        world.config.latent_dim,
    ):
        raise ValueError("generate_log: cfg sizes differ from the world's; build the world from this cfg")
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, LOG_STREAM]))
    n_requests = math.ceil(cfg.events / FEED_SLOTS)
    shape = (n_requests, FEED_SLOTS)

    users = draw_weighted(rng, world.user_activity, n_requests)
    day = draw_weighted(rng, _day_weights(cfg), n_requests)
    hour = draw_weighted(rng, world.hour_traffic, n_requests)
    own_device = rng.random(n_requests) < PREFERRED_DEVICE_SHARE
    device = np.where(own_device, world.user_device[users], rng.integers(0, len(DEVICES), n_requests))
    source = draw_weighted(rng, _SOURCE_SHARE, n_requests * FEED_SLOTS).reshape(shape)
    pick = draw_weighted(rng, _CATEGORY_PICK, n_requests * FEED_SLOTS).reshape(shape)
    slot_category = np.take_along_axis(world.user_categories[users], pick, axis=1)

    items = np.empty(shape, dtype=np.int64)
    for d in range(cfg.days):
        rows = np.flatnonzero(day == d)
        if len(rows):
            items[rows] = _feed_for_day(world, rng, d, source[rows], slot_category[rows])

    # The user scrolls: each slot is seen a few seconds after the one above it, within the hour.
    gaps = rng.integers(1, _MAX_SCROLL_GAP_S + 1, shape)
    gaps[:, 0] = 0
    latest_start = 3600 - FEED_SLOTS * _MAX_SCROLL_GAP_S
    second = rng.integers(0, latest_start, n_requests)[:, None] + np.cumsum(gaps, axis=1)
    timestamp = period_start(cfg) + day[:, None] * SECONDS_PER_DAY + hour[:, None] * 3600 + second

    n = cfg.events
    flat_users = np.repeat(users, FEED_SLOTS)[:n]
    flat_items = items.reshape(-1)[:n]
    flat_hour = np.repeat(hour, FEED_SLOTS)[:n]
    flat_device = np.repeat(device, FEED_SLOTS)[:n]
    flat_day = np.repeat(day, FEED_SLOTS)[:n]
    position = np.tile(np.arange(FEED_SLOTS, dtype=np.int64), n_requests)[:n]
    prob = world.click_probability(flat_users, flat_items, flat_hour, flat_device, position, flat_day)
    label = (rng.random(n) < prob).astype(np.int64)

    order = np.argsort(timestamp.reshape(-1)[:n], kind="stable")
    device_names = pa.array(np.asarray(DEVICES, dtype=object)[flat_device[order]], type=pa.string())
    columns = {
        "user_id": flat_users[order],
        "item_id": flat_items[order],
        "timestamp": timestamp.reshape(-1)[:n][order],
        "hour": flat_hour[order],
        "device": device_names,
        "category": world.item_category[flat_items[order]],
        "position": position[order],
        "label": label[order],
    }
    return pa.Table.from_pydict(columns, schema=LOG_SCHEMA)


def write_daily_parquet(table: pa.Table, cfg: GenerateConfig, events_dir: Path) -> list[Path]:
    """One parquet file per day, named by date, so a reader can pick a time range by file name.

    Day files left by an earlier, longer run are removed: a directory read as one data set must not
    mix two worlds.
    """
    start = period_start(cfg)
    edges = start + SECONDS_PER_DAY * np.arange(cfg.days + 1)
    cuts = np.searchsorted(table.column("timestamp").to_numpy(), edges, side="left")
    written: list[Path] = []
    for d in range(cfg.days):
        date = datetime.fromtimestamp(int(edges[d]), tz=UTC).strftime("%Y-%m-%d")
        path = events_dir / f"{date}.parquet"
        with atomic_open(path, "wb") as handle:
            pq.write_table(table.slice(int(cuts[d]), int(cuts[d + 1] - cuts[d])), handle)
        written.append(path)
    keep = {p.name for p in written}
    for stale in events_dir.iterdir():
        if _DAY_FILE.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return written


def generate(cfg: GenerateConfig, out_dir: Path) -> dict[str, Any]:
    """Build the world, draw the log, write out_dir/events/<date>.parquet and out_dir/world/.

    Returns a summary: rows, users and items seen in the log, days, ctr, files, seconds.
    """
    began = time.perf_counter()
    out_dir = Path(out_dir)
    if cfg.world == "sequential":
        return _generate_sequential(cfg, out_dir, began)
    world = build_world(cfg)
    table = generate_log(world, cfg)
    files = write_daily_parquet(table, cfg, out_dir / "events")
    world.save(out_dir / "world")
    label = table.column("label").to_numpy()
    return {
        "rows": table.num_rows,
        "users": int(len(np.unique(table.column("user_id").to_numpy()))),
        "items": int(len(np.unique(table.column("item_id").to_numpy()))),
        "days": cfg.days,
        "ctr": float(label.mean()) if len(label) else 0.0,
        "files": [str(p) for p in files],
        "world": str(out_dir / "world"),
        "seconds": round(time.perf_counter() - began, 3),
    }


def _generate_sequential(cfg: GenerateConfig, out_dir: Path, began: float) -> dict[str, Any]:
    """The sequential world's implicit log (every event a consumption: no CTR, no ground-truth world)."""
    table = generate_sequences(cfg)
    files = write_daily_parquet(table, cfg, out_dir / "events")
    return {
        "rows": table.num_rows,
        "users": int(len(np.unique(table.column("user_id").to_numpy()))),
        "items": int(len(np.unique(table.column("item_id").to_numpy()))),
        "days": cfg.days, "ctr": None, "world": None, "files": [str(p) for p in files],
        "seconds": round(time.perf_counter() - began, 3),
    }
