"""Synthetic per-user traffic and impression logs for the A/B tests (seeded, vectorized)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CTR_MEAN = 0.05


def users(rng: np.random.Generator, shape: tuple[int, ...], lift: float = 0.0, ctr_mean: float = CTR_MEAN,
          concentration: float = 8.0, mean_imps: float = 12.0) -> dict[str, np.ndarray]:
    """Heterogeneous users: CTR ~ Beta, activity ~ Gamma, impressions ~ 1 + Poisson(activity).

    Impressions and CTR are independent, so the population CTR is exactly ctr_mean * (1 + lift)
    and the true relative lift is `lift`. The pre-period uses the same CTR and activity, so it is
    correlated with the experiment period the way a real user's history is.
    """
    p = rng.beta(ctr_mean * concentration, (1 - ctr_mean) * concentration, shape)
    activity = rng.gamma(1.5, mean_imps / 1.5, shape)
    imps = 1 + rng.poisson(activity)
    clicks = rng.binomial(imps, np.minimum(p * (1 + lift), 1.0))
    pre_imps = rng.poisson(activity)
    pre_clicks = rng.binomial(pre_imps, p)
    return {"clicks": clicks.astype(float), "imps": imps.astype(float), "pre_clicks": pre_clicks.astype(float),
            "pre_imps": pre_imps.astype(float)}


def write_log(directory: Path, seed: int = 0, users_per_variant: dict[str, int] | None = None, lift: float = 0.0,
              days: int = 3, start: int = 1_700_000_000, string_ids: bool = False) -> dict[str, np.ndarray]:
    """One parquet file per UTC day, one row per impression, in the inference service's layout.

    Every user is in `ranker_ab` (variants as given) and half of them also in `other_exp`.
    Returns per-row arrays for checking totals.
    """
    rng = np.random.default_rng(seed)
    users_per_variant = users_per_variant or {"control": 300, "treatment": 300}
    rows: dict[str, list] = {k: [] for k in ("user", "variant", "label", "day")}
    first = 0
    for variant, count in users_per_variant.items():
        u = users(rng, (count,), lift=lift if variant != "control" else 0.0)
        per_user = u["imps"].astype(int)
        ids = np.repeat(np.arange(first, first + count), per_user)
        p = u["clicks"] / u["imps"]
        rows["user"].append(ids)
        rows["variant"].append(np.full(ids.size, variant))
        rows["label"].append((rng.random(ids.size) < np.repeat(p, per_user)).astype(np.int64))
        rows["day"].append(rng.integers(0, days, ids.size))
        first += count
    cols = {k: np.concatenate(v) for k, v in rows.items()}
    other = np.where(cols["user"] % 2 == 0, "control", "treatment")
    assignments = np.array([json.dumps({"ranker_ab": v, "other_exp": o}) if u % 4 else json.dumps({"ranker_ab": v})
                            for v, o, u in _distinct(cols["variant"], other, cols["user"])])
    directory.mkdir(parents=True, exist_ok=True)
    for day in range(days):
        m = cols["day"] == day
        user_ids = cols["user"][m]
        table = pa.table({
            "user_id": pa.array([f"u{i}" for i in user_ids]) if string_ids else pa.array(user_ids, pa.int64()),
            "item_id": pa.array(rng.integers(0, 500, m.sum()), pa.int64()),
            "timestamp": pa.array(start + day * 86400 + rng.integers(0, 86400, m.sum()), pa.int64()),
            "hour": pa.array(rng.integers(0, 24, m.sum()), pa.int64()),
            "device": pa.array(np.where(rng.random(m.sum()) < 0.5, "mobile", "web")),
            "category": pa.array(rng.integers(0, 20, m.sum()), pa.int64()),
            "position": pa.array(rng.integers(0, 10, m.sum()), pa.int64()),
            "label": pa.array(cols["label"][m], pa.int64()),
            "request_id": pa.array([f"r{day}-{i}" for i in range(m.sum())]),
            "assignments": pa.array(assignments[m]),
            "model_version": pa.array(np.full(m.sum(), "ranker:3")),
        })
        day_dir = directory / f"date=2023-11-{14 + day:02d}"
        day_dir.mkdir(exist_ok=True)
        pq.write_table(table, day_dir / "events.parquet")
    return cols


def _distinct(variant: np.ndarray, other: np.ndarray, user: np.ndarray):
    """Row-wise triples for building the assignments strings (test data only)."""
    return zip(variant.tolist(), other.tolist(), user.tolist(), strict=True)
