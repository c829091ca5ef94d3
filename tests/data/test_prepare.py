"""Splits, train-only vocabularies, negatives, and the on-disk layout of a prepared dataset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recforge.config import LabelConfig, NegativesConfig, SchemaConfig, SplitConfig, VocabConfig
from recforge.data.batches import SplitData
from recforge.data.history import build_histories
from recforge.data.prepare import PrepareOptions, assign_splits, prepare
from recforge.data.schema import DataError
from recforge.data.shards import concat_shards, split_shards
from recforge.data.validate import validate
from recforge.data.vocab import load_vocabs
from recforge.storage import read_json

SCHEMA = SchemaConfig(context=["device"], item_features=["category"], numeric=["position"])


def _log(n: int = 2000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 10 * 86400, n))
    items = rng.integers(0, 50, n)
    return pa.table({
        "user_id": rng.integers(0, 100, n),
        "item_id": items,
        "timestamp": times,
        "device": rng.choice(["ios", "web"], n),
        "category": items % 7,
        "position": rng.integers(0, 10, n),
        "label": rng.integers(0, 2, n),
    })


def _prepare(table: pa.Table, tmp_path, schema=SCHEMA, split=SplitConfig(), **kw):
    clean = validate(table, schema).clean
    return prepare(clean, schema, split, kw.pop("vocab", VocabConfig()), kw.pop("neg", NegativesConfig()),
                   tmp_path / "prepared", PrepareOptions(seed=1, **kw))


def _read(prepared, split: str, column: str) -> np.ndarray:
    return concat_shards(split_shards(prepared, split))[column]


def test_time_split_has_no_future_in_train(tmp_path):
    info = _prepare(_log(), tmp_path)
    times = {s: _read(info.path, s, "timestamp") for s in ("train", "valid", "test")}
    assert times["train"].max() < times["valid"].min() <= times["valid"].max() < times["test"].min()
    rows = {s: len(t) for s, t in times.items()}
    assert sum(rows.values()) == 2000
    assert abs(rows["test"] - 200) <= 5 and abs(rows["valid"] - 200) <= 5


def test_time_split_keeps_ties_together():
    times = np.array([1, 2, 3, 3, 3, 3, 3, 3, 3, 4])
    split = assign_splits(times, np.zeros(10, dtype=np.int64), SplitConfig(valid_fraction=0.1, test_fraction=0.2))
    # every event at the cut time goes to the later split
    assert set(split[times == 3]) == {split[times == 3][0]}
    assert split[-1] == 2


def test_leave_last_out_per_user():
    users = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    times = np.array([5, 1, 9, 3, 1, 2, 7, 8, 6])
    split = assign_splits(times, users, SplitConfig(method="leave_last_out"))
    assert split.tolist() == [1, 0, 2, 0, 0, 0, 1, 2, 0]


def test_per_user_fraction_takes_each_users_latest_share():
    # user 0: 10 events, user 1: 4 events, user 2: 2 events (too few for any held-out event)
    users = np.repeat([0, 1, 2], [10, 4, 2])
    rng = np.random.default_rng(3)
    times = np.concatenate([rng.permutation(10), rng.permutation(4), [5, 5]])
    split = assign_splits(times, users, SplitConfig(method="per_user_fraction", valid_fraction=0.25,
                                                    test_fraction=0.3))
    by_user = {u: split[users == u][np.argsort(times[users == u], kind="stable")].tolist() for u in range(3)}
    # floor(10 * 0.3) = 3 test, floor(10 * 0.25) = 2 valid; floor(4 * 0.3) = 1 test, floor(4 * 0.25) = 1 valid
    assert by_user[0] == [0] * 5 + [1] * 2 + [2] * 3
    assert by_user[1] == [0, 0, 1, 2]
    assert by_user[2] == [0, 0]


def test_per_user_fraction_rounds_exact_products_and_always_leaves_training():
    users = np.zeros(100, dtype=np.int64)
    split = assign_splits(np.arange(100), users, SplitConfig(method="per_user_fraction", valid_fraction=0.0,
                                                             test_fraction=0.29))
    assert int((split == 2).sum()) == 29  # 0.29 * 100 is 28.999... in float64
    # 5 test and floor(4.999999999 + 1e-9) = 5 valid would leave no training event: valid gives one back
    edge = assign_splits(np.arange(10), np.zeros(10, dtype=np.int64),
                         SplitConfig(method="per_user_fraction", valid_fraction=0.4999999999, test_fraction=0.5))
    assert edge.tolist() == [0] + [1] * 4 + [2] * 5


def test_a_test_fraction_of_zero_leaves_no_test_split(tmp_path):
    times = np.arange(20)
    assert 2 not in assign_splits(times, np.zeros(20, dtype=np.int64), SplitConfig(test_fraction=0.0)).tolist()
    users = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    split = assign_splits(np.array([5, 1, 9, 3, 1, 2, 7, 8, 6]), users,
                          SplitConfig(method="leave_last_out", test_fraction=0.0))
    assert split.tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0]  # the last event is validation now
    info = _prepare(_log(), tmp_path, split=SplitConfig(valid_fraction=0.2, test_fraction=0.0))
    assert info.meta["split"]["test"]["rows"] == 0 and abs(info.meta["split"]["valid"]["rows"] - 400) <= 5
    assert len(SplitData.load(info.path, "test")) == 0


def test_a_split_column_is_the_split_and_a_bad_value_is_quarantined(tmp_path):
    table = _log(300, seed=4)
    names = np.random.default_rng(4).choice(["train", "valid", "test"], 300, p=[0.6, 0.2, 0.2]).astype(object)
    names[[3, 50]] = [" Test ", "VALID"]  # trimmed and lower-cased
    names[[7, 8, 9]] = ["holdout", "", None]
    schema = SCHEMA.model_copy(update={"split": "fold"})
    validated = validate(table.append_column("fold", pa.array(names.tolist(), pa.string())), schema)
    assert validated.counts["bad_split"] == 3
    assert validated.quarantine.column("_row").to_pylist() == [8, 9, 10]
    info = prepare(validated.clean, schema, SplitConfig(method="column"), VocabConfig(), NegativesConfig(),
                   tmp_path / "prepared", PrepareOptions(seed=1))
    kept = np.ones(300, dtype=bool)
    kept[[7, 8, 9]] = False
    wanted = np.char.lower(np.char.strip(names[kept].astype(str)))
    for split in ("train", "valid", "test"):
        expected = np.sort(table.column("timestamp").to_numpy()[kept][wanted == split])
        assert np.array_equal(np.sort(_read(info.path, split, "timestamp")), expected), split
    assert info.meta["split"]["method"] == "column"


def test_vocab_is_fit_on_train_only(tmp_path):
    """Users and items that first appear in the test period must encode to the unknown index."""
    table = _log()
    n = table.num_rows
    users = table.column("user_id").to_numpy().copy()
    items = table.column("item_id").to_numpy().copy()
    users[-50:] = 10_000 + np.arange(50)  # brand-new users in the last (test) events
    items[-50:] = 20_000 + np.arange(50)
    table = table.set_column(0, "user_id", pa.array(users)).set_column(1, "item_id", pa.array(items))
    info = _prepare(table, tmp_path)
    vocabs = load_vocabs(info.path / "vocab")
    assert not {str(u) for u in range(10_000, 10_050)} & set(vocabs["user_id"].keys)
    assert not {str(i) for i in range(20_000, 20_050)} & set(vocabs["item_id"].keys)
    test = SplitData.load(info.path, "test")
    assert (test.categorical[-50:, 0] == 0).all() and (test.categorical[-50:, 1] == 0).all()
    # ... while those users stay distinct for per-user metrics
    assert len(np.unique(test.user_key[-50:])) == 50
    train = SplitData.load(info.path, "train")
    assert (train.categorical[:, 0] > 0).all()
    assert len(train) + len(SplitData.load(info.path, "valid")) + len(test) == n


def test_layout_and_meta(tmp_path):
    info = _prepare(_log(), tmp_path, source={"path": "x"})
    meta = read_json(info.path / "meta.json")
    assert [f["name"] for f in meta["fields"]] == ["user_id", "item_id", "device", "category"]
    assert meta["numeric"][0]["name"] == "position" and meta["numeric"][0]["std"] > 0
    train = SplitData.load(info.path, "train")
    assert train.categorical.shape[1] == 4 and train.numeric.shape[1] == 1
    assert abs(float(train.numeric.mean())) < 1e-3  # standardized with train statistics
    assert _read(info.path, "train", "categorical").dtype == np.int64
    assert not list(tmp_path.glob(".tmp-*"))


def test_rating_threshold_makes_labels(tmp_path):
    table = _log().drop(["label"]).append_column("rating", pa.array(np.tile([1.0, 3.5, 4.0, 5.0], 500)))
    schema = SchemaConfig(label=LabelConfig(kind="rating", column="rating", threshold=4.0, min=0.5, max=5.0),
                          context=["device"], item_features=["category"], numeric=["position"])
    info = _prepare(table, tmp_path, schema=schema)
    labels = np.concatenate([_read(info.path, s, "label") for s in ("train", "valid", "test")])
    assert labels.sum() == 1000


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_implicit_negatives_never_hit_a_users_positives(tmp_path, strategy):
    table = _log(3000).drop(["label"])
    schema = SchemaConfig(label=LabelConfig(kind="implicit", column=None), context=["device"],
                          item_features=["category"], numeric=["position"])
    info = _prepare(table, tmp_path, schema=schema, neg=NegativesConfig(per_positive=3, strategy=strategy))
    meta = read_json(info.path / "meta.json")
    vocab = load_vocabs(info.path / "vocab")["item_id"]
    user_vocab = load_vocabs(info.path / "vocab")["user_id"]
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    positives = set(zip(users.tolist(), items.tolist(), strict=True))
    total_neg = 0
    for split in ("train", "valid", "test"):
        data = SplitData.load(info.path, split)
        neg = data.label.numpy() == 0
        cats = data.categorical.numpy()[neg]
        neg_items = vocab.decode(cats[:, 1])
        neg_users = user_vocab.decode(cats[:, 0])
        checked = [(int(u), int(i)) for u, i in zip(neg_users, neg_items, strict=True) if u is not None]
        assert checked and not set(checked) & positives
        # the negative carries its own item's category, not the positive's
        assert (cats[:, 3] > 0).all()
        total_neg += int(neg.sum())
    assert total_neg + meta["negatives"]["unsampleable"] == 3 * 3000
    assert meta["negatives"]["sampled"] == total_neg


def test_everything_quarantined_is_a_clear_error(tmp_path):
    table = _log(10).set_column(0, "user_id", pa.array([None] * 10, pa.int64()))
    with pytest.raises(DataError, match="every row was quarantined"):
        _prepare(table, tmp_path)


def test_min_count_and_hashing_apply_through_prepare(tmp_path):
    table = _log(3000)
    vocab_cfg = VocabConfig(min_count=50, hash_buckets={"user_id": 16})
    info = _prepare(table, tmp_path, vocab=vocab_cfg)
    meta = read_json(info.path / "meta.json")
    fields = {f["name"]: f for f in meta["fields"]}
    assert fields["user_id"]["hashed"] and fields["user_id"]["cardinality"] == 17
    train = SplitData.load(info.path, "train")
    assert int(train.categorical[:, 0].max()) <= 16 and int(train.categorical[:, 0].min()) >= 1
    # items seen fewer than 50 times in training map to the unknown index 0
    items = train.categorical[:, 1].numpy()
    counts = np.bincount(table.column("item_id").to_numpy()[: len(items)])
    rare = np.flatnonzero((counts > 0) & (counts < 50))
    vocab = load_vocabs(info.path / "vocab")["item_id"]
    assert rare.size and not {str(i) for i in rare} & set(vocab.keys)
    assert (items == 0).sum() == sum(counts[i] for i in rare)


def test_unknown_hash_field_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        _prepare(_log(), tmp_path, vocab=VocabConfig(hash_buckets={"nope": 8}))


def test_histories_hold_only_earlier_clicks():
    """A row's history is the user's clicks strictly before it: never the event itself, a tie, or the future."""
    users = np.array([0, 0, 0, 0, 0, 1, 1])
    times = np.array([10, 20, 20, 30, 40, 15, 25])
    items = np.array([1, 2, 3, 4, 5, 6, 7])
    labels = np.array([1, 1, 0, 1, 1, 1, 0])
    values, offsets = build_histories(users, times, items, labels, max_len=2)
    rows = [values[offsets[r]:offsets[r + 1]].tolist() for r in range(7)]
    assert rows == [[], [1], [1], [1, 2], [2, 4], [], [6]]


def test_prepared_histories_round_trip_through_batches(tmp_path):
    table = _log(3000)
    clean = validate(table, SCHEMA).clean
    info = prepare(clean, SCHEMA, SplitConfig(), VocabConfig(), NegativesConfig(), tmp_path / "p",
                   PrepareOptions(history_length=5, seed=1))
    test = SplitData.load(info.path, "test")
    assert test.history_values is not None
    lengths = (test.history_offsets[1:] - test.history_offsets[:-1]).numpy()
    assert lengths.max() == 5 and lengths.min() >= 0
    index = torch.tensor([3, 0, 7])
    batch = test.batch(index)
    for i, row in enumerate(index.tolist()):
        expect = test.history_values[test.history_offsets[row]:test.history_offsets[row + 1]]
        got = batch.history_values[batch.history_offsets[i]:batch.history_offsets[i + 1]]
        assert torch.equal(expect, got)


def test_histories_from_train_hold_training_clicks_only(tmp_path):
    """history_from=train: under a time split every valid/test row's history is the user's last training
    clicks, never a valid/test label; history_from=all lets those in, and train rows are the same either way."""
    table = _log(3000)
    frozen = _prepare(table, tmp_path / "train", history_length=5, history_from="train").path
    live = _prepare(table, tmp_path / "all", history_length=5, history_from="all").path
    assert read_json(frozen / "meta.json")["history_from"] == "train"
    parts = {split: concat_shards(split_shards(frozen, split)) for split in ("train", "valid", "test")}
    train = parts["train"]
    clicked = train["label"] > 0
    order = np.lexsort((train["timestamp"][clicked], train["user_key"][clicked]))
    last_train = {}
    for user, item in zip(train["user_key"][clicked][order], train["categorical"][clicked][order][:, 1],
                          strict=True):
        last_train.setdefault(int(user), []).append(int(item))
    changed = 0
    for split in ("valid", "test"):
        rows = parts[split]
        values, offsets = rows["history_values"], rows["history_offsets"]
        other = concat_shards(split_shards(live, split))
        for r in range(len(rows["label"])):
            expect = last_train.get(int(rows["user_key"][r]), [])[-5:]
            assert values[offsets[r]:offsets[r + 1]].tolist() == expect, (split, r)
        changed += int(not np.array_equal(other["history_values"], values))
    assert changed == 2  # with history_from=all, valid/test clicks do reach later rows' histories
    same = concat_shards(split_shards(live, "train"))
    np.testing.assert_array_equal(same["history_values"], train["history_values"])
    np.testing.assert_array_equal(same["history_offsets"], train["history_offsets"])


def test_millisecond_rows_are_converted_before_the_time_split(tmp_path):
    # 1,500 of 11,500 events logged in ms: read as seconds they would all be "the future" (year ~55,000)
    # and make up the whole test split.
    log = _log(11_500, seed=3)
    times = log.column("timestamp").to_numpy().copy()
    in_ms = np.random.default_rng(4).choice(len(times), 1_500, replace=False)
    times[in_ms] *= 1000
    log = log.set_column(log.schema.get_field_index("timestamp"), "timestamp", pa.array(times))
    result = validate(log, SCHEMA)
    assert result.report()["time_units"] == {"s": 10_000, "ms": 1_500}
    assert result.rows_kept == 11_500
    info = prepare(result.clean, SCHEMA, SplitConfig(), VocabConfig(), NegativesConfig(), tmp_path / "p",
                   PrepareOptions(seed=1))
    split = {s: _read(info.path, s, "timestamp") for s in ("train", "valid", "test")}
    everything = np.concatenate(list(split.values()))
    assert everything.min() >= 1_700_000_000 and everything.max() < 1_700_000_000 + 10 * 86400
    assert abs(len(split["test"]) - 1_150) <= 10
