import hashlib

import numpy as np
import pyarrow as pa
import pytest

from recforge.config import VocabConfig
from recforge.data.vocab import Vocab, fit_vocabs, hash_index, load_vocabs, save_vocabs
from recforge.storage import read_json, write_json

# a x3, b x2, c x2, d x1: b and c tie on count and are ordered by text.
TRAIN = ["b", "a", "c", "a", "b", "a", "d", "c"]


def test_keys_ordered_by_count_then_text():
    vocab = Vocab.fit("item", pa.array(TRAIN))
    assert vocab.keys == ("a", "b", "c", "d")
    assert vocab.size == 5
    np.testing.assert_array_equal(vocab.encode(pa.array(["a", "b", "c", "d"])), [1, 2, 3, 4])


def test_fit_is_deterministic_under_row_order():
    shuffled = [TRAIN[i] for i in np.random.default_rng(0).permutation(len(TRAIN))]
    assert Vocab.fit("item", pa.array(shuffled)) == Vocab.fit("item", pa.array(TRAIN))


def test_min_count_sends_rare_keys_to_oov():
    vocab = Vocab.fit("item", pa.array(TRAIN), min_count=2)
    assert vocab.keys == ("a", "b", "c")
    np.testing.assert_array_equal(vocab.encode(pa.array(["d", "a"])), [Vocab.OOV, 1])


def test_unseen_keys_and_nulls_encode_to_oov():
    vocab = Vocab.fit("item", pa.array(TRAIN + [None]))
    assert None not in vocab.keys
    encoded = vocab.encode(pa.array(["a", None, "zzz", "d"]))
    assert encoded.dtype == np.int64
    np.testing.assert_array_equal(encoded, [1, 0, 0, 4])


def test_vocab_fit_on_train_only_does_not_leak_test_keys():
    train = pa.array(["u1", "u2", "u1", "u3"])
    test = pa.array(["u2", "u_new", "u1"])
    vocab = Vocab.fit("user", train)
    assert "u_new" not in vocab.keys
    np.testing.assert_array_equal(vocab.encode(test), [vocab.keys.index("u2") + 1, 0, 1])


def test_decode_inverts_encode():
    vocab = Vocab.fit("item", pa.array(TRAIN), min_count=2)
    values = ["c", "a", None, "d", "b"]
    assert vocab.decode(vocab.encode(pa.array(values))) == ["c", "a", None, None, "b"]
    with pytest.raises(ValueError, match="indices"):
        vocab.decode(np.array([vocab.size]))
    with pytest.raises(ValueError, match="indices"):
        vocab.decode(np.array([-1]))


def test_chunked_large_and_dictionary_inputs_agree():
    plain = Vocab.fit("item", pa.array(TRAIN))
    chunked = pa.chunked_array([pa.array(TRAIN[:3]), pa.array(TRAIN[3:])])
    assert Vocab.fit("item", chunked) == plain
    assert Vocab.fit("item", pa.array(TRAIN, type=pa.large_string())) == plain
    probe = ["d", "x", None, "a"]
    expected = plain.encode(pa.array(probe))
    np.testing.assert_array_equal(plain.encode(pa.chunked_array([probe[:1], probe[1:]])), expected)
    np.testing.assert_array_equal(plain.encode(pa.array(probe, type=pa.large_string())), expected)
    np.testing.assert_array_equal(plain.encode(pa.array(probe).dictionary_encode()), expected)


def test_non_string_values_are_refused():
    with pytest.raises(TypeError, match="strings"):
        Vocab.fit("item", pa.array([1, 2, 3]))


def test_save_load_round_trip(tmp_path):
    vocab = Vocab.fit("item", pa.array(TRAIN), min_count=2)
    vocab.save(tmp_path / "item.json")
    loaded = Vocab.load(tmp_path / "item.json")
    assert loaded == vocab
    probe = pa.array(["a", "b", "c", "d", None, "new"])
    np.testing.assert_array_equal(loaded.encode(probe), vocab.encode(probe))
    stored = read_json(tmp_path / "item.json")
    assert stored["schema_version"] == 1
    assert stored["min_count"] == 2


def test_load_refuses_unknown_schema_version(tmp_path):
    data = Vocab.fit("item", pa.array(TRAIN)).to_dict()
    write_json(tmp_path / "item.json", {**data, "schema_version": 99})
    with pytest.raises(ValueError, match="schema_version"):
        Vocab.load(tmp_path / "item.json")


# ---------------------------------------------------------------- hashing


def test_hash_index_is_stable_and_hard_coded():
    # Computed once with blake2b-64 (little endian); a different hash function changes these.
    encoded = hash_index(pa.array(["user_42", "item_7", "", None, "日本"]), 1_000_003)
    np.testing.assert_array_equal(encoded, [348870, 495247, 984011, 0, 511378])
    np.testing.assert_array_equal(hash_index(pa.array(["user_42", "item_7"]), 16), [10, 9])


def test_hash_index_matches_definition_and_stays_in_range():
    keys = [f"k{i}" for i in range(2000)]
    buckets = 37
    encoded = hash_index(pa.array(keys), buckets)
    expected = [
        int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") % buckets + 1
        for k in keys
    ]
    np.testing.assert_array_equal(encoded, expected)
    assert encoded.min() >= 1 and encoded.max() <= buckets
    assert len(np.unique(encoded)) == buckets  # 2000 keys reach every bucket


def test_hashed_vocab_encodes_repeats_identically_and_cannot_decode(tmp_path):
    vocab = Vocab.fit("user", pa.array(["x"]), hash_buckets=100)
    assert vocab.keys is None and vocab.size == 101
    encoded = vocab.encode(pa.chunked_array([["u9", None], ["u9", "never_seen"]]))
    assert encoded[0] == encoded[2] and encoded[1] == 0 and 1 <= encoded[3] <= 100
    with pytest.raises(ValueError, match="hashed"):
        vocab.decode(encoded)
    vocab.save(tmp_path / "user.json")
    assert Vocab.load(tmp_path / "user.json") == vocab


# ---------------------------------------------------------------- several fields


def test_fit_vocabs_save_load_round_trip(tmp_path):
    table = pa.table({"user": ["u1", "u2", "u1"], "item": ["a", "b", None], "hour": ["1", "2", "3"]})
    cfg = VocabConfig(min_count=2, hash_buckets={"item": 8})
    vocabs = fit_vocabs(table, ["user", "item"], cfg)
    assert vocabs["user"].keys == ("u1",)
    assert vocabs["item"].hash_buckets == 8
    save_vocabs(vocabs, tmp_path / "vocab")
    assert sorted(p.name for p in (tmp_path / "vocab").iterdir()) == ["item.json", "user.json"]
    loaded = load_vocabs(tmp_path / "vocab")
    assert loaded == vocabs
    for field in ("user", "item"):
        np.testing.assert_array_equal(loaded[field].encode(table[field]), vocabs[field].encode(table[field]))


def test_fit_vocabs_names_unknown_hash_fields():
    table = pa.table({"user": ["u1"], "item": ["a"]})
    cfg = VocabConfig(hash_buckets={"usr": 8, "item": 4})
    with pytest.raises(ValueError, match="usr"):
        fit_vocabs(table, ["user", "item"], cfg)


def test_fit_vocabs_names_missing_columns():
    with pytest.raises(ValueError, match="item"):
        fit_vocabs(pa.table({"user": ["u1"]}), ["user", "item"], VocabConfig())
