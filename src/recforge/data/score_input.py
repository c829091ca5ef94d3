"""Rows to score (`recforge predict scores`), read and encoded exactly as the prepared data was.

A file handed to a trained model passes through the same reader and per-row rules as a training log
(data.sources, data.validate.check_rows), so an id is the same text and the same vocabulary index
it was in training, and numeric columns are scaled with the training split's mean and std. Two
differences: the label is not needed (a file to score usually has none), and no row is dropped: a
row a rule rejects keeps its place with its reason, so the output lines up with the input row for
row. Histories (for models that read them) are the user's clicks in the prepared data strictly
before the row's time, by the same rule as prepare's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recforge.config import LabelConfig, SchemaConfig
from recforge.data.attributes import Attributes
from recforge.data.history import build_histories, take_histories
from recforge.data.shards import concat_shards, split_shards
from recforge.data.sources import read_events
from recforge.data.validate import REASONS, check_rows
from recforge.data.vocab import Vocab

_SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class ScoreInput:
    """The file's rows as model inputs, in file order; `reason` is None where the row was encoded."""

    table: pa.Table  # as read: the schema's columns and the kept ones, then _file and _row
    categorical: np.ndarray  # [N, F] int64 vocabulary indices
    numeric: np.ndarray  # [N, K] float32, standardized with the training split's mean and std
    times: np.ndarray  # int64 unix seconds (0 where unreadable)
    reason: list[str | None]

    @property
    def scorable(self) -> np.ndarray:
        return np.array([r is None for r in self.reason], dtype=bool)


def reading_schema(schema: SchemaConfig, keep: list[str]) -> SchemaConfig:
    """The training schema without a label (nothing to predict needs one) and with `keep` read along,
    as context columns that no model field uses (their raw values go to the output untouched)."""
    roles = {schema.user, schema.item, schema.time, *schema.context, *schema.item_features, *schema.numeric}
    extra = [c for c in keep if c not in roles]
    return schema.model_copy(update={"label": LabelConfig(kind="implicit", column=None), "split": None,
                                     "context": [*schema.context, *extra]})


def read_score_input(source: str | Path, fmt: str, schema: SchemaConfig, keep: list[str],
                     vocabs: dict[str, Vocab], numeric_meta: list[dict[str, Any]],
                     attributes: Attributes = Attributes()) -> ScoreInput:
    """Read `source` with the training schema's columns (plus `keep`), joined with the attribute tables
    the training data was, and encode every row it can."""
    reading = reading_schema(schema, keep)
    table = attributes.join(read_events(source, fmt, attributes.file_schema(reading),  # type: ignore[arg-type]
                                        attributes.columns))
    checks = check_rows(table, reading)
    categorical = np.stack([vocabs[f].encode(checks.clean[f]) for f in schema.categorical], axis=1).astype(np.int64)
    if schema.numeric:
        raw = np.stack([np.nan_to_num(checks.clean[c].to_numpy(zero_copy_only=False).astype(np.float64))
                        for c in schema.numeric], axis=1)
        mean = np.array([m["mean"] for m in numeric_meta])
        std = np.array([m["std"] for m in numeric_meta])
        numeric = ((raw - mean) / std).astype(np.float32)
    else:
        numeric = np.zeros((table.num_rows, 0), dtype=np.float32)
    times = np.nan_to_num(checks.clean[schema.time].to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64)
    reason = [None if code < 0 else REASONS[code] for code in checks.reason.tolist()]
    return ScoreInput(checks.table, categorical, numeric, times, reason)


def histories_before(prepared: Path, rows: ScoreInput, user_column: int, item_column: int, max_len: int,
                     history_from: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Each row's last `max_len` clicks in the prepared data strictly before its time: clicks of any
    split, or of the training split only when the data was prepared with history_from "train" (so a
    file's rows get the histories the model was trained and evaluated with).

    Users are matched by vocabulary index; a user the vocabulary does not know (index 0) has no
    history, as in serving, instead of sharing every unknown user's clicks.
    """
    users, times, items, labels = [], [], [], []
    for split in _SPLITS if history_from == "all" else _SPLITS[:1]:
        shards = split_shards(prepared, split)
        if not shards:
            continue
        columns = concat_shards(shards)
        users.append(columns["categorical"][:, user_column])
        items.append(columns["categorical"][:, item_column])
        times.append(columns["timestamp"])
        labels.append(columns["label"])
    known_users = np.concatenate(users) if users else np.zeros(0, np.int64)
    n = len(rows.reason)
    file_users = rows.categorical[:, user_column].copy()
    unknown = file_users == 0
    file_users[unknown] = -1 - np.flatnonzero(unknown)  # keys that match no click
    clicks = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    clicks = np.where(known_users == 0, 0.0, clicks)  # unknown users' clicks belong to no one
    values, offsets = build_histories(
        np.concatenate([known_users, file_users]).astype(np.int64),
        np.concatenate([*times, rows.times]).astype(np.int64),
        np.concatenate([*items, rows.categorical[:, item_column]]).astype(np.int64),
        np.concatenate([clicks, np.zeros(n, np.float32)]), max_len)
    own, own_offsets = take_histories(values, offsets, np.arange(len(known_users), len(known_users) + n))
    return own.astype(np.int64), own_offsets
