"""Validated events -> time split -> vocabularies (train only) -> encoded arrays on disk.

The prepared directory is everything training and evaluation read: per split, `categorical.npy`
[N, F] int64, `numeric.npy` [N, K] float32, `label.npy` float32, `timestamp.npy` int64 and
`user_key.npy` int64, plus `vocab/`, `items/`, `meta.json` and `features.json` (the feature layout,
recforge.features). Text is parsed once here; epochs only slice arrays. The directory is built under
a temporary name and renamed into place, so a reader never sees a half-prepared dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recforge.arrays import in_sorted
from recforge.config import NegativesConfig, SchemaConfig, SplitConfig, VocabConfig
from recforge.data.history import build_histories, take_histories
from recforge.data.schema import DataError
from recforge.data.vocab import Vocab, fit_vocabs, save_vocabs
from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.storage import save_array, write_json

PREPARED_SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
# Sampling rounds before a negative that keeps hitting the user's own positives is given up on
# (and counted in meta.json, never dropped silently).
_NEGATIVE_RESAMPLE_ROUNDS = 20


@dataclass(frozen=True)
class PreparedInfo:
    path: Path
    meta: dict[str, Any]


def make_labels(table: pa.Table, schema: SchemaConfig) -> np.ndarray:
    """The 0/1 click target of each event, by the schema's label kind."""
    kind = schema.label.kind
    if kind == "implicit":
        return np.ones(table.num_rows, dtype=np.float32)
    values = table.column(schema.label.column).to_numpy().astype(np.float64)
    if kind == "rating":
        return (values >= schema.label.threshold).astype(np.float32)
    return values.astype(np.float32)


def _dense_key(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """Dense integer id of each value over the whole log (not a vocabulary: no train/test notion)."""
    encoded = pc.dictionary_encode(column).combine_chunks() if isinstance(
        column, pa.ChunkedArray
    ) else pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(encoded.dictionary)


def assign_splits(times: np.ndarray, user_key: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test for each row.

    time: cut points at timestamp quantiles; every event at or after a cut belongs to the later
    split, so no event of the evaluation period (or a tie with it) leaks into training.
    leave_last_out: per user, the last event (ties broken by input order) is test and the one
    before is valid; users with fewer than 3 events contribute only training rows.
    """
    n = len(times)
    split = np.zeros(n, dtype=np.int8)
    if n == 0:
        return split
    if cfg.method == "time":
        ordered = np.sort(times)
        test_cut = ordered[min(n - 1, int(np.floor(n * (1.0 - cfg.test_fraction))))]
        split[times >= test_cut] = 2
        if cfg.valid_fraction > 0:
            valid_cut = ordered[min(n - 1, int(np.floor(n * (1.0 - cfg.test_fraction - cfg.valid_fraction))))]
            split[(times >= valid_cut) & (times < test_cut)] = 1
        return split
    order = np.lexsort((np.arange(n), times, user_key))
    sorted_users = user_key[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    sizes = np.diff(np.r_[group_start, n])
    group_end = np.repeat(group_start + sizes, sizes)
    from_end = group_end - 1 - np.arange(n)
    eligible = np.repeat(sizes >= 3, sizes)
    split_sorted = np.zeros(n, dtype=np.int8)
    split_sorted[eligible & (from_end == 0)] = 2
    if cfg.valid_fraction > 0:
        split_sorted[eligible & (from_end == 1)] = 1
    split[order] = split_sorted
    return split


def _split_times(times: np.ndarray, split: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code, name in enumerate(SPLITS):
        t = times[split == code]
        out[name] = {"rows": int(len(t)), "time_min": int(t.min()) if len(t) else None,
                     "time_max": int(t.max()) if len(t) else None}
    return out


def _item_feature_table(
    item_idx: np.ndarray, features: np.ndarray, times: np.ndarray, num_items: int
) -> np.ndarray:
    """Per item index, the encoded item-feature values of its latest training event."""
    table = np.zeros((num_items, features.shape[1]), dtype=np.int64)
    if len(item_idx) == 0:
        return table
    order = np.argsort(times, kind="stable")[::-1]  # latest first
    items_latest_first = item_idx[order]
    _, first = np.unique(items_latest_first, return_index=True)
    rows = order[first]
    table[item_idx[rows]] = features[rows]
    return table


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
    item_key of every observed interaction, across all splits.
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


def prepare(
    events: pa.Table,
    schema: SchemaConfig,
    split_cfg: SplitConfig,
    vocab_cfg: VocabConfig,
    negatives_cfg: NegativesConfig,
    out_dir: str | Path,
    *,
    history_length: int = 0,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> PreparedInfo:
    """Turn validated events (see data.validate) into a prepared dataset directory."""
    started = time.time()
    out = Path(out_dir)
    if events.num_rows == 0:
        raise DataError("no valid events to prepare: every row was quarantined (see the validation report)")
    fields = schema.categorical
    times = events.column(schema.time).to_numpy().astype(np.int64)
    user_key, num_users = _dense_key(events.column(schema.user))
    item_key, num_item_keys = _dense_key(events.column(schema.item))
    labels = make_labels(events, schema)
    split = assign_splits(times, user_key, split_cfg)
    counts = np.bincount(split, minlength=3)
    if counts[0] == 0:
        raise DataError("the split left no training rows; lower split.valid_fraction/test_fraction")
    if counts[2] == 0:
        raise DataError("the split left no test rows; raise split.test_fraction or use more data")

    train_mask = split == 0
    train_table = events.filter(pa.array(train_mask))
    vocabs = fit_vocabs(train_table, fields, vocab_cfg)
    categorical = np.stack([vocabs[f].encode(events.column(f)) for f in fields], axis=1).astype(np.int64)
    numeric, mean, std = _standardized(events, schema.numeric, train_mask)

    item_column = fields.index(schema.item)
    item_feature_cols = [fields.index(f) for f in schema.item_features]
    item_vocab: Vocab = vocabs[schema.item]
    item_features = _item_feature_table(
        categorical[train_mask, item_column],
        categorical[train_mask][:, item_feature_cols],
        times[train_mask],
        item_vocab.size,
    )
    train_item_counts = np.bincount(categorical[train_mask, item_column], minlength=item_vocab.size)

    negatives_meta: dict[str, Any] | None = None
    if schema.label.kind == "implicit":
        categorical, numeric, labels, times, user_key, split, negatives_meta = _add_negatives(
            categorical, numeric, labels, times, user_key, item_key, split,
            item_column=item_column, item_feature_cols=item_feature_cols, item_features=item_features,
            train_item_counts=train_item_counts, num_item_keys=num_item_keys, cfg=negatives_cfg, seed=seed,
        )

    history_values, history_offsets = build_histories(
        user_key, times, categorical[:, item_column], labels, history_length)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        columns = {"categorical": categorical, "numeric": numeric, "label": labels, "timestamp": times,
                   "user_key": user_key}
        _write_splits(tmp, split, columns, (history_values, history_offsets) if history_length > 0 else None)
        save_vocabs(vocabs, tmp / "vocab")
        (tmp / "items").mkdir()
        save_array(tmp / "items" / "features.npy", item_features)
        save_array(tmp / "items" / "train_counts.npy", train_item_counts.astype(np.int64))
        totals = {"users": num_users, "items": num_item_keys, "events": int(events.num_rows)}
        meta = _meta(schema, vocabs, mean, std, split_cfg, times, split, labels, totals=totals,
                     negatives=negatives_meta, history_length=history_length, seed=seed, source=source)
        write_json(tmp / "meta.json", meta)
        FeatureLayout.from_prepared_meta(meta).save(tmp / FEATURES_FILE)  # what models and runs read
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, tmp / name)
        meta["seconds"] = round(time.time() - started, 3)
        write_json(tmp / "meta.json", meta)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedInfo(out, meta)



def _standardized(events: pa.Table, columns: list[str], train_mask: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numeric columns standardized with the TRAINING rows' mean and std (a constant column keeps std 1)."""
    if not columns:
        return np.zeros((events.num_rows, 0), dtype=np.float32), np.zeros(0), np.zeros(0)
    raw = np.stack([events.column(c).to_numpy().astype(np.float64) for c in columns], axis=1)
    mean = raw[train_mask].mean(axis=0)
    std = raw[train_mask].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((raw - mean) / std).astype(np.float32), mean, std


def _write_splits(root: Path, split: np.ndarray, columns: dict[str, np.ndarray],
                  histories: tuple[np.ndarray, np.ndarray] | None) -> None:
    """One folder of memory-mappable arrays per split (and each row's history, values + offsets)."""
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == code)
        part = root / name
        part.mkdir()
        for column, values in columns.items():
            save_array(part / f"{column}.npy", values[rows])
        if histories is not None:
            values, offsets = take_histories(histories[0], histories[1], rows)
            save_array(part / "history_values.npy", values)
            save_array(part / "history_offsets.npy", offsets)


def _meta(schema: SchemaConfig, vocabs: dict[str, Vocab], mean: np.ndarray, std: np.ndarray,
          split_cfg: SplitConfig, times: np.ndarray, split: np.ndarray, labels: np.ndarray, *,
          totals: dict[str, int], negatives: dict[str, Any] | None, history_length: int, seed: int,
          source: dict[str, Any] | None) -> dict[str, Any]:
    """meta.json: what the prepared arrays mean (fields, scaling, split) and where they came from."""
    return {
        "schema_version": PREPARED_SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "fields": [
            {"name": f, "cardinality": vocabs[f].size, "role": _role(f, schema),
             "hashed": vocabs[f].hash_buckets is not None}
            for f in schema.categorical
        ],
        "numeric": [
            {"name": c, "mean": float(m), "std": float(s)}
            for c, m, s in zip(schema.numeric, mean, std, strict=True)
        ],
        "item_features": list(schema.item_features),
        "history_length": history_length,
        "label": schema.label.model_dump(),
        "split": {"method": split_cfg.method, "valid_fraction": split_cfg.valid_fraction,
                  "test_fraction": split_cfg.test_fraction, **_split_times(times, split)},
        "positives": {name: int(labels[split == code].sum()) for code, name in enumerate(SPLITS)},
        "users": totals["users"],
        "items": totals["items"],
        "rows": int(len(labels)),
        "events": totals["events"],
        "negatives": negatives,
        "source": source or {},
        "seed": seed,
    }


def _role(field: str, schema: SchemaConfig) -> str:
    if field == schema.user:
        return "user"
    if field == schema.item:
        return "item"
    return "item_feature" if field in schema.item_features else "context"


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished directory into place; the old one is removed only after the swap."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _add_negatives(
    categorical: np.ndarray,
    numeric: np.ndarray,
    labels: np.ndarray,
    times: np.ndarray,
    user_key: np.ndarray,
    item_key: np.ndarray,
    split: np.ndarray,
    *,
    item_column: int,
    item_feature_cols: list[int],
    item_features: np.ndarray,
    train_item_counts: np.ndarray,
    num_item_keys: int,
    cfg: NegativesConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Implicit logs hold positives only: add sampled negatives from items seen in training.

    A negative copies its positive's user, time and context and takes the sampled item's own
    features. The user's interactions in ANY split are excluded, so a test positive never
    reappears as a training negative.
    """
    rng = np.random.default_rng(seed + 17)
    candidate_idx = np.flatnonzero(train_item_counts > 0)
    candidate_idx = candidate_idx[candidate_idx != 0]
    if len(candidate_idx) == 0:
        raise DataError("no items in the training split to sample negatives from")
    # Map each candidate vocabulary index to its global item key (any row carrying it will do).
    key_of_index = np.full(len(train_item_counts), -1, dtype=np.int64)
    key_of_index[categorical[:, item_column]] = item_key
    candidate_keys = key_of_index[candidate_idx]
    if cfg.strategy == "popularity":
        weights = train_item_counts[candidate_idx].astype(np.float64) ** cfg.alpha
    else:
        weights = np.ones(len(candidate_idx))
    forbidden = np.unique(user_key * num_item_keys + item_key)
    owner, choice = sample_negatives(
        user_key, candidate_keys, weights, forbidden, num_item_keys, cfg.per_positive, rng
    )
    wanted = len(labels) * cfg.per_positive
    neg_cat = categorical[owner].copy()
    neg_cat[:, item_column] = candidate_idx[choice]
    if item_feature_cols:
        neg_cat[:, item_feature_cols] = item_features[candidate_idx[choice]]
    meta = {"strategy": cfg.strategy, "per_positive": cfg.per_positive, "alpha": cfg.alpha,
            "sampled": int(len(owner)), "unsampleable": int(wanted - len(owner)),
            "candidates": int(len(candidate_idx))}
    return (
        np.concatenate([categorical, neg_cat]),
        np.concatenate([numeric, numeric[owner]]),
        np.concatenate([labels, np.zeros(len(owner), dtype=np.float32)]),
        np.concatenate([times, times[owner]]),
        np.concatenate([user_key, user_key[owner]]),
        np.concatenate([split, split[owner]]),
        meta,
    )
