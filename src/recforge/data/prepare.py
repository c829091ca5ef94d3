"""Validated events -> time split -> vocabularies (train only) -> encoded, sharded arrays on disk.

The prepared directory is everything training and evaluation read: per split, shards of
memory-mappable .npy columns (data/shards.py: categorical [N, F] int64, numeric [N, K] float32,
label, timestamp, user_key, histories), plus `vocab/`, `items/`, `meta.json`, `features.json` (the
feature layout, recforge.features) and `manifest.json`, written last. Text is parsed once here;
epochs only slice arrays. The directory is built under a temporary name and renamed into place, so a
reader never sees a half-prepared dataset.

This module is the local engine and the rules both engines share (split cut points, the item-feature
table, the negative-sampling plan, meta.json); data/spark_engine.py runs the same rules as Spark jobs.
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

from recforge.config import NegativesConfig, SchemaConfig, SplitConfig, VocabConfig
from recforge.data.buckets import NegativePlan, bucket_count, merge_buckets, process_bucket, user_bucket
from recforge.data.history import take_histories
from recforge.data.schema import SPLIT_NAMES, DataError
from recforge.data.shards import COLUMNS, shard_bounds, shard_name, write_manifest, write_shard
from recforge.data.vocab import Vocab, fit_vocabs, save_vocabs
from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.storage import save_array, write_json

PREPARED_SCHEMA_VERSION = 2  # 2: sharded splits (manifest.json)
SPLITS = SPLIT_NAMES


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


def cut_ranks(n: int, cfg: SplitConfig) -> tuple[int | None, int | None]:
    """Ranks (0-based, in ascending time) of the test and valid cut points of a time split of n rows
    (None: that split is switched off by a fraction of 0).

    Both engines take the timestamp at these exact ranks, so their cut points are identical.
    """
    test = min(n - 1, int(np.floor(n * (1.0 - cfg.test_fraction)))) if cfg.test_fraction > 0 else None
    valid = min(n - 1, int(np.floor(n * (1.0 - cfg.test_fraction - cfg.valid_fraction)))) \
        if cfg.valid_fraction > 0 else None
    return test, valid


def per_user_counts(sizes: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """(test, valid) events of users with `sizes` events each under a per-user split.

    leave_last_out: one of each that is switched on (fraction > 0), for users with 3 or more events.
    per_user_fraction: floor(n * fraction) of each (the 1e-9 absorbs 0.29 * 100 = 28.999...), valid
    capped so that every user keeps at least one training event. Both engines compute these numbers
    with the same float64 arithmetic, so their splits are identical.
    """
    if cfg.method == "leave_last_out":
        eligible = (sizes >= 3).astype(np.int64)
        return eligible * int(cfg.test_fraction > 0), eligible * int(cfg.valid_fraction > 0)
    test = np.floor(sizes.astype(np.float64) * cfg.test_fraction + 1e-9).astype(np.int64)
    valid = np.floor(sizes.astype(np.float64) * cfg.valid_fraction + 1e-9).astype(np.int64)
    return test, np.minimum(valid, sizes - 1 - test)


def assign_splits(times: np.ndarray, user_key: np.ndarray, cfg: SplitConfig,
                  named: np.ndarray | None = None) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test for each row.

    time: cut points at timestamp quantiles (cut_ranks); every event at or after a cut belongs to
    the later split, so no event of the evaluation period (or a tie with it) leaks into training.
    leave_last_out / per_user_fraction: per user, in time order (ties broken by input order), the
    last per_user_counts()[0] events are test and the per_user_counts()[1] before them valid.
    column: `named`, each row's index in SPLIT_NAMES, read from the log.
    """
    n = len(times)
    split = np.zeros(n, dtype=np.int8)
    if n == 0:
        return split
    if cfg.method == "column":
        if named is None:
            raise ValueError("split.method=column needs each row's split name")
        return np.asarray(named, dtype=np.int8)
    if cfg.method == "time":
        ordered = np.sort(times)
        test_rank, valid_rank = cut_ranks(n, cfg)
        if test_rank is not None:
            split[times >= ordered[test_rank]] = 2
        if valid_rank is not None:
            test_cut = ordered[test_rank] if test_rank is not None else np.iinfo(np.int64).max
            split[(times >= ordered[valid_rank]) & (times < test_cut)] = 1
        return split
    order = np.lexsort((np.arange(n), times, user_key))
    sorted_users = user_key[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    sizes = np.diff(np.r_[group_start, n])
    from_end = np.repeat(group_start + sizes, sizes) - 1 - np.arange(n)
    test, valid = (np.repeat(count, sizes) for count in per_user_counts(sizes, cfg))
    split_sorted = np.zeros(n, dtype=np.int8)
    split_sorted[from_end < test + valid] = 1
    split_sorted[from_end < test] = 2
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


def negative_plan(train_item_counts: np.ndarray, key_of_index: np.ndarray, item_features: np.ndarray, *,
                  item_key_space: int, item_column: int, item_feature_columns: list[int], cfg: NegativesConfig,
                  seed: int) -> NegativePlan:
    """Candidates are the items seen in training (never OOV), weighted by count ** alpha or uniformly.

    `key_of_index` maps an item-vocabulary index to the item's dense key over the whole log; the
    user's interactions in ANY split are excluded by key, so a test positive never reappears as a
    training negative.
    """
    candidate_index = np.flatnonzero(train_item_counts > 0)
    candidate_index = candidate_index[candidate_index != 0]
    if len(candidate_index) == 0:
        raise DataError("no items in the training split to sample negatives from")
    if cfg.strategy == "popularity":
        weights = train_item_counts[candidate_index].astype(np.float64) ** cfg.alpha
    else:
        weights = np.ones(len(candidate_index))
    return NegativePlan(candidate_index=candidate_index, candidate_key=key_of_index[candidate_index],
                        weights=weights, item_features=item_features, item_key_space=item_key_space,
                        per_positive=cfg.per_positive, item_column=item_column,
                        item_feature_columns=tuple(item_feature_columns), seed=seed)


def negatives_meta(cfg: NegativesConfig, plan: NegativePlan, sampled: int, unsampleable: int) -> dict[str, Any]:
    return {"strategy": cfg.strategy, "per_positive": cfg.per_positive, "alpha": cfg.alpha,
            "sampled": int(sampled), "unsampleable": int(unsampleable), "candidates": int(len(plan.candidate_index))}


@dataclass(frozen=True)
class PrepareOptions:
    """How prepare lays the dataset out and what it records beside it."""

    history_length: int = 0
    history_from: str = "train"  # which splits' clicks histories hold: train | all (config.DataConfig)
    seed: int = 0
    shard_rows: int = 1_000_000
    user_bucket_rows: int = 1_000_000
    source: dict[str, Any] | None = None
    extra_files: dict[str, Path] | None = None


def prepare(
    events: pa.Table,
    schema: SchemaConfig,
    split_cfg: SplitConfig,
    vocab_cfg: VocabConfig,
    negatives_cfg: NegativesConfig,
    out_dir: str | Path,
    options: PrepareOptions = PrepareOptions(),
) -> PreparedInfo:
    """Turn validated events (see data.validate) into a prepared dataset directory (the local engine)."""
    started = time.time()
    if events.num_rows == 0:
        raise DataError("no valid events to prepare: every row was quarantined (see the validation report)")
    fields = schema.categorical
    times = events.column(schema.time).to_numpy().astype(np.int64)
    user_key, num_users = _dense_key(events.column(schema.user))
    item_key, num_item_keys = _dense_key(events.column(schema.item))
    named = pc.index_in(events.column(schema.split), value_set=pa.array(SPLIT_NAMES)).to_numpy(
        zero_copy_only=False) if schema.split else None
    split = assign_splits(times, user_key, split_cfg, named)
    check_split_counts(np.bincount(split, minlength=3), split_cfg)

    train_mask = split == 0
    vocabs = fit_vocabs(events.filter(pa.array(train_mask)), fields, vocab_cfg)
    categorical = np.stack([vocabs[f].encode(events.column(f)) for f in fields], axis=1).astype(np.int64)
    numeric, mean, std = _standardized(events, schema.numeric, train_mask)
    item_column = fields.index(schema.item)
    item_feature_cols = [fields.index(f) for f in schema.item_features]
    item_size = vocabs[schema.item].size
    item_features = _item_feature_table(categorical[train_mask, item_column],
                                        categorical[train_mask][:, item_feature_cols], times[train_mask], item_size)
    train_item_counts = np.bincount(categorical[train_mask, item_column], minlength=item_size)
    plan = None
    if schema.label.kind == "implicit":
        key_of_index = np.full(item_size, -1, dtype=np.int64)
        # The largest key carrying each index (hashed items share one): a rule Spark computes the same way.
        np.maximum.at(key_of_index, categorical[:, item_column], item_key)
        plan = negative_plan(train_item_counts, key_of_index, item_features, item_key_space=num_item_keys,
                             item_column=item_column, item_feature_columns=item_feature_cols, cfg=negatives_cfg,
                             seed=options.seed)
    rows = {"categorical": categorical, "numeric": numeric, "label": make_labels(events, schema),
            "timestamp": times, "user_key": user_key, "item_key": item_key, "split": split,
            "order": np.arange(len(times), dtype=np.int64)}
    rows, unsampleable = _by_buckets(rows, plan, options, item_column)

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        shards = _write_shards(tmp, rows, options.shard_rows)
        labels, final_split = rows["label"], rows["split"]
        meta = prepared_meta(
            schema, vocabs, mean, std, split_cfg, split_stats=_split_times(rows["timestamp"], final_split),
            positives={name: int(labels[final_split == code].sum()) for code, name in enumerate(SPLITS)},
            totals={"users": num_users, "items": num_item_keys, "events": int(events.num_rows),
                    "rows": int(len(labels))},
            negatives=negatives_meta(negatives_cfg, plan, int((labels == 0).sum()), unsampleable) if plan else None,
            options=options)
        finish_prepared(tmp, out, vocabs=vocabs, item_features=item_features, train_item_counts=train_item_counts,
                        meta=meta, shards=shards, options=options, engine="local", started=started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedInfo(out, meta)


def check_split_counts(counts: np.ndarray, cfg: SplitConfig) -> None:
    """Training rows always; test rows whenever a test split was asked for (a column split is the log's own)."""
    if counts[0] == 0:
        raise DataError("the split left no training rows; lower split.valid_fraction/test_fraction"
                        if cfg.method != "column" else "the split column marks no row as train")
    if counts[2] == 0 and cfg.method != "column" and cfg.test_fraction > 0:
        raise DataError("the split left no test rows; raise split.test_fraction or use more data")
    if counts[1] == 0 and cfg.method != "column" and cfg.valid_fraction > 0:
        raise DataError("the split left no validation rows; raise split.valid_fraction or use more data")


def _by_buckets(rows: dict[str, np.ndarray], plan: NegativePlan | None, options: PrepareOptions,
                item_column: int) -> tuple[dict[str, np.ndarray], int]:
    """Negatives and histories one user bucket at a time (data/buckets.py), merged in canonical order."""
    buckets = bucket_count(len(rows["label"]), options.user_bucket_rows)
    by_bucket = np.argsort(user_bucket(rows["user_key"], buckets), kind="stable")  # input order within each
    sizes = np.bincount(user_bucket(rows["user_key"], buckets), minlength=buckets)
    parts, unsampleable, start = [], 0, 0
    for bucket, size in enumerate(sizes.tolist()):
        take = by_bucket[start:start + size]
        start += size
        part, missed = process_bucket({name: values[take] for name, values in rows.items()}, bucket, plan,
                                      history_length=options.history_length, history_from=options.history_from,
                                      item_column=item_column)
        parts.append(part)
        unsampleable += missed
    return merge_buckets(parts), unsampleable


def _write_shards(root: Path, rows: dict[str, np.ndarray], shard_rows: int) -> dict[str, list[dict[str, Any]]]:
    """Each split's rows (canonical order kept) cut into shards of `shard_rows`."""
    histories = "history_values" in rows
    written: dict[str, list[dict[str, Any]]] = {}
    for code, name in enumerate(SPLITS):
        members = np.flatnonzero(rows["split"] == code)
        entries = []
        for index, (lo, hi) in enumerate(shard_bounds(len(members), shard_rows)):
            take = members[lo:hi]
            columns = {column: rows[column][take] for column in COLUMNS}
            if histories:
                columns["history_values"], columns["history_offsets"] = take_histories(
                    rows["history_values"], rows["history_offsets"], take)
            entries.append(write_shard(root / name / shard_name(index), columns))
        written[name] = entries
    return written


def finish_prepared(tmp: Path, out: Path, *, vocabs: dict[str, Vocab], item_features: np.ndarray,
                    train_item_counts: np.ndarray, meta: dict[str, Any], shards: dict[str, list[dict[str, Any]]],
                    options: PrepareOptions, engine: str, started: float) -> None:
    """Everything beside the shards, then the manifest (the commit point), then the swap into place."""
    save_vocabs(vocabs, tmp / "vocab")
    (tmp / "items").mkdir(exist_ok=True)
    save_array(tmp / "items" / "features.npy", item_features)
    save_array(tmp / "items" / "train_counts.npy", train_item_counts.astype(np.int64))
    layout = FeatureLayout.from_prepared_meta(meta)
    layout.save(tmp / FEATURES_FILE)  # what models and runs read
    for name, path in (options.extra_files or {}).items():
        shutil.copy2(path, tmp / name)
    meta["engine"] = engine
    meta["seconds"] = round(time.time() - started, 3)
    write_json(tmp / "meta.json", meta)
    write_manifest(tmp, shards, shard_rows=options.shard_rows, features=layout.to_dict(), engine=engine)
    _replace_dir(tmp, out)


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


def prepared_meta(schema: SchemaConfig, vocabs: dict[str, Vocab], mean: np.ndarray, std: np.ndarray,
                  split_cfg: SplitConfig, *, split_stats: dict[str, Any], positives: dict[str, int],
                  totals: dict[str, int], negatives: dict[str, Any] | None, options: PrepareOptions) -> dict[str, Any]:
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
        "history_length": options.history_length,
        "history_from": options.history_from,
        "label": schema.label.model_dump(),
        "split": {"method": split_cfg.method, "valid_fraction": split_cfg.valid_fraction,
                  "test_fraction": split_cfg.test_fraction, **split_stats},
        "positives": positives,
        "users": totals["users"],
        "items": totals["items"],
        "rows": totals["rows"],
        "events": totals["events"],
        "negatives": negatives,
        "source": options.source or {},
        "seed": options.seed,
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
