"""Re-encoding the challenger's holdout for the champion: raw keys through the champion's own vocab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recforge.bundle import Bundle, VocabTable
from recforge.data.vocab import Vocab
from recforge.pipeline.holdout import vocab_map


def _bundle(vocab: dict[str, VocabTable]) -> Bundle:
    return Bundle(path=Path("."), manifest={"kind": "ranker"}, module=None, features={}, vocab=vocab,  # type: ignore[arg-type]
                  config={})


def test_vocab_map_sends_each_new_index_to_the_champions_row_of_the_same_raw_key():
    new = Vocab.fit("item_id", pa.array(["b", "b", "b", "c", "c", "z"]))  # keys by count: b, c, z
    champion = _bundle({"item_id": VocabTable("item_id", ("a", "c", "b"), None)})  # a -> 1, c -> 2, b -> 3
    table = vocab_map(new, champion, "item_id")
    assert new.keys == ("b", "c", "z")
    # new index: 0 (unknown) -> 0, 1 (b) -> 3, 2 (c) -> 2, 3 (z, unknown to the champion) -> 0
    assert table.tolist() == [0, 3, 2, 0]
    rows = np.array([1, 3, 2, 0, 1])
    assert table[rows].tolist() == [3, 0, 2, 0, 3]  # one gather for every row


def test_hashed_fields_must_keep_their_bucket_count():
    new = Vocab.fit("user_id", pa.array(["u1", "u2"]), hash_buckets=64)
    same = _bundle({"user_id": VocabTable("user_id", None, 64)})
    assert vocab_map(new, same, "user_id").tolist() == list(range(65))
    with pytest.raises(ValueError, match="hash_buckets"):
        vocab_map(new, _bundle({"user_id": VocabTable("user_id", None, 32)}), "user_id")
    with pytest.raises(ValueError, match="no vocabulary for field 'user_id'"):
        vocab_map(new, _bundle({}), "user_id")
