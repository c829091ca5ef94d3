"""Per-user work done bucket by bucket: sampled negatives, user histories and the canonical row order.

Negatives must never hit one of the user's own interactions, and a history needs all of the user's
earlier clicks: both need every row of a user together, and nothing of other users. So the rows are
grouped into user buckets (dense user key modulo the bucket count) and each bucket is processed on
its own, with its own seeded generator. The local engine loops over the buckets; the Spark engine
hands each bucket to one task. Same rows, same bucket, same generator: the two engines draw the same
negatives, and a Spark task's memory is one bucket, not the log.

Canonical order (what shards are cut from): the input order of the log (`order`: file, then row)
and, right after a positive, its sampled negatives (`slot` 1..k; the positive itself is slot 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recforge.arrays import in_sorted
from recforge.data.history import build_histories, take_histories

# Sampling rounds before a negative that keeps hitting the user's own positives is given up on
# (and counted in meta.json, never dropped silently).
_NEGATIVE_RESAMPLE_ROUNDS = 20
_SEED_OFFSET = 17

# The per-row columns a bucket carries in and out (histories are added on the way out).
ROW_COLUMNS = ("categorical", "numeric", "label", "timestamp", "user_key", "item_key", "split", "order")


def bucket_count(rows: int, rows_per_bucket: int) -> int:
    """How many user buckets a log of `rows` clean events is cut into (both engines use this)."""
    return max(1, -(-rows // rows_per_bucket))


def user_bucket(user_key: np.ndarray, buckets: int) -> np.ndarray:
    return user_key % buckets


@dataclass(frozen=True)
class NegativePlan:
    """What a bucket needs to sample negatives: the training items and their weights, fit on train."""

    candidate_index: np.ndarray  # item-vocabulary index of each candidate
    candidate_key: np.ndarray  # the same items' dense keys over the whole log
    weights: np.ndarray
    item_features: np.ndarray  # [items, item feature fields] encoded, from the latest training event
    item_key_space: int
    per_positive: int
    item_column: int
    item_feature_columns: tuple[int, ...]
    seed: int


def sample_negatives(
    user_key: np.ndarray,
    candidate_items: np.ndarray,
    candidate_weights: np.ndarray,
    forbidden_pairs: np.ndarray,
    item_key_space: int,
    per_positive: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """For each positive (by user), `per_positive` items the user never interacted with.

    Returns (row index into the positives, chosen position in candidate_items); negatives that
    still collide with a user's positives after the resample rounds are left out and their count
    is what the caller reports. `forbidden_pairs` is the sorted array user_key * item_key_space +
    item_key of every observed interaction of these users, across all splits.
    """
    n = len(user_key) * per_positive
    owner = np.repeat(np.arange(len(user_key)), per_positive)
    probs = candidate_weights / candidate_weights.sum()
    choice = rng.choice(len(candidate_items), size=n, p=probs)
    pending = np.arange(n)

    def collides(rows: np.ndarray) -> np.ndarray:
        return in_sorted(forbidden_pairs, user_key[owner[rows]] * item_key_space + candidate_items[choice[rows]])

    for _ in range(_NEGATIVE_RESAMPLE_ROUNDS):
        pending = pending[collides(pending)]
        if len(pending) == 0:
            break
        choice[pending] = rng.choice(len(candidate_items), size=len(pending), p=probs)
    pending = pending[collides(pending)]  # what the last round drew may still collide
    keep = np.ones(n, dtype=bool)
    keep[pending] = False
    return owner[keep], choice[keep]


def _with_negatives(rows: dict[str, np.ndarray], plan: NegativePlan, bucket: int
                    ) -> tuple[dict[str, np.ndarray], int]:
    """The bucket's rows followed by its negatives (not yet in canonical order), and the unsampleable count."""
    rng = np.random.default_rng([plan.seed + _SEED_OFFSET, bucket])
    user_key, item_key = rows["user_key"], rows["item_key"]
    forbidden = np.unique(user_key * plan.item_key_space + item_key)
    owner, choice = sample_negatives(user_key, plan.candidate_key, plan.weights, forbidden,
                                     plan.item_key_space, plan.per_positive, rng)
    categorical = rows["categorical"][owner].copy()
    categorical[:, plan.item_column] = plan.candidate_index[choice]
    if plan.item_feature_columns:
        categorical[:, list(plan.item_feature_columns)] = plan.item_features[plan.candidate_index[choice]]
    negatives = {name: values[owner] for name, values in rows.items()}
    negatives["categorical"] = categorical
    negatives["item_key"] = plan.candidate_key[choice]
    negatives["label"] = np.zeros(len(owner), dtype=np.float32)
    # Slot of each negative after its positive: owners ascend, so count within each owner's run.
    starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1]
    runs = np.diff(np.r_[starts, len(owner)])
    negatives["slot"] = (np.arange(len(owner)) - np.repeat(starts, runs) + 1).astype(np.int64)
    positives = dict(rows, slot=np.zeros(len(user_key), dtype=np.int64))
    merged = {name: np.concatenate([positives[name], negatives[name]]) for name in positives}
    return merged, len(user_key) * plan.per_positive - len(owner)


def process_bucket(rows: dict[str, np.ndarray], bucket: int, plan: NegativePlan | None, *,
                   history_length: int, history_from: str, item_column: int) -> tuple[dict[str, np.ndarray], int]:
    """One bucket's rows (in input order) -> with negatives and histories, in canonical order.

    Returns the columns (ROW_COLUMNS + `slot`, and `history_values`/`history_offsets` when
    history_length > 0) and how many negatives could not be sampled. With history_from "train" only
    training-split clicks enter a history (data.history_from).
    """
    unsampleable = 0
    if plan is not None and len(rows["label"]):
        rows, unsampleable = _with_negatives(rows, plan, bucket)
    else:
        rows = dict(rows, slot=np.zeros(len(rows["label"]), dtype=np.int64))
    canonical = np.lexsort((rows["slot"], rows["order"]))
    rows = {name: values[canonical] for name, values in rows.items()}
    if history_length > 0:
        clicks = history_clicks(rows["label"], rows["split"], history_from)
        values, offsets = build_histories(rows["user_key"], rows["timestamp"], rows["categorical"][:, item_column],
                                          clicks, history_length)
        rows["history_values"], rows["history_offsets"] = values, offsets
    return rows, unsampleable


def history_clicks(labels: np.ndarray, split: np.ndarray, history_from: str) -> np.ndarray:
    """The labels a history is built from: every click, or (history_from "train") training-split ones only."""
    if history_from == "all":
        return labels
    if history_from == "train":
        return np.where(split == 0, labels, 0).astype(labels.dtype)
    raise ValueError(f"history_from must be train or all, not {history_from!r}")


def merge_buckets(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Processed buckets -> one set of columns in canonical order (histories re-gathered to match)."""
    if len(parts) == 1:
        return parts[0]
    plain = [name for name in parts[0] if name not in ("history_values", "history_offsets")]
    merged = {name: np.concatenate([part[name] for part in parts]) for name in plain}
    order = np.lexsort((merged["slot"], merged["order"]))
    out = {name: values[order] for name, values in merged.items()}
    if "history_values" in parts[0]:
        values = np.concatenate([part["history_values"] for part in parts])
        offsets, base = [np.zeros(1, dtype=np.int64)], 0
        for part in parts:
            offsets.append(part["history_offsets"][1:] + base)
            base += int(part["history_offsets"][-1])
        out["history_values"], out["history_offsets"] = take_histories(values, np.concatenate(offsets), order)
    return out
