"""Each event's user history: the items the user clicked strictly before the event.

"Strictly before" is the whole point: the event itself, anything at the same second and anything
later never enter its history, so a sequence model cannot peek at the label. Histories are kept
as values + offsets (ragged, ready for EmbeddingBag-style pooling) and computed for every row at
once with sorted keys and searchsorted: no per-user Python.
"""

from __future__ import annotations

import numpy as np


def build_histories(
    user_key: np.ndarray,
    times: np.ndarray,
    item_index: np.ndarray,
    labels: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) with row r's history in values[offsets[r]:offsets[r + 1]], oldest first.

    At most `max_len` most recent positives (label 1) of the same user with time < the row's time.
    Item indices are the encoded (train-vocabulary) ones, so unknown items appear as 0.
    """
    n = len(user_key)
    if max_len <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(n + 1, dtype=np.int64)
    positive = np.flatnonzero(labels > 0)
    # Sort the positives by (user, time, input order); the key is the search space for every row.
    order = positive[np.lexsort((positive, times[positive], user_key[positive]))]
    pos_user = user_key[order]
    pos_time = times[order]
    pos_item = item_index[order]
    # A scalar key per (user, time) keeps the search a single searchsorted; times are shifted to be
    # non-negative and the user id occupies the high part.
    t_min = int(min(times.min(), 0))
    span = int(times.max()) - t_min + 1
    if (int(user_key.max()) + 1) * span >= np.iinfo(np.int64).max:
        raise OverflowError("too many users times too long a time span for a 64-bit history key")
    pos_key = pos_user * span + (pos_time - t_min)
    row_key = user_key * span + (times - t_min)
    end = np.searchsorted(pos_key, row_key, side="left")  # positives strictly before the row's time
    user_start = np.searchsorted(pos_key, user_key * span, side="left")
    start = np.maximum(user_start, end - max_len)
    lengths = end - start
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    values = pos_item[np.repeat(start, lengths) + within].astype(np.int64)
    return values, offsets


def take_histories(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The histories of `rows` (in that order) as a new (values, offsets) pair."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    within = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], lengths)
    return values[np.repeat(offsets[rows], lengths) + within], new_offsets


def latest_histories(
    user_key: np.ndarray, times: np.ndarray, item_index: np.ndarray, labels: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, values, offsets): each user's history as of after the log's last event, by build_histories'
    own rule (an extra row per user one second after the last event), so an online store seeded with
    it holds exactly what the next training row of that user will hold."""
    users = np.unique(user_key)
    if len(users) == 0:
        return users, np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    after = np.full(len(users), int(times.max()) + 1, dtype=np.int64)
    values, offsets = build_histories(np.concatenate([user_key, users]), np.concatenate([times, after]),
                                      np.concatenate([item_index, np.zeros(len(users), dtype=item_index.dtype)]),
                                      np.concatenate([labels, np.zeros(len(users), dtype=labels.dtype)]), max_len)
    n = len(user_key)
    return users, values[offsets[n]:], offsets[n:] - offsets[n]
