"""The sharded prepared format (data/shards.py): round trips, bounds, a manifest that disagrees with
its files, the pre-shard layout, and prepare() cutting the same rows into any number of shards."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from recforge.config import LabelConfig, NegativesConfig, SchemaConfig, SplitConfig, VocabConfig
from recforge.data.batches import SplitData
from recforge.data.prepare import PrepareOptions, prepare
from recforge.data.shards import (
    MANIFEST_FILE,
    ManifestError,
    concat_shards,
    read_manifest,
    shard_bounds,
    shard_name,
    split_column,
    split_shards,
    write_manifest,
    write_shard,
)
from recforge.data.validate import validate
from recforge.storage import read_json, save_array, write_json

SPLITS = ("train", "valid", "test")


def _split_columns(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A split's columns with ragged histories; rows 4..7 have none, so one shard holds no history at all."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, rows)
    lengths[4:8] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {
        "categorical": rng.integers(0, 50, (rows, 3)).astype(np.int64),
        "numeric": rng.normal(size=(rows, 2)).astype(np.float32),
        "label": rng.integers(0, 2, rows).astype(np.float32),
        "timestamp": np.arange(rows, dtype=np.int64) + 1_700_000_000,
        "user_key": rng.integers(0, 5, rows).astype(np.int64),
        "history_values": rng.integers(1, 50, int(offsets[-1])).astype(np.int64),
        "history_offsets": offsets,
    }


def _cut(columns: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows [lo, hi) as one shard: plain columns sliced, the history offsets re-based to start at 0."""
    offsets = columns["history_offsets"]
    part = {name: values[lo:hi] for name, values in columns.items() if not name.startswith("history")}
    part["history_values"] = columns["history_values"][offsets[lo]:offsets[hi]]
    part["history_offsets"] = offsets[lo:hi + 1] - offsets[lo]
    return part


def _write_split(root, columns: dict[str, np.ndarray], shard_rows: int, split: str = "train") -> dict:
    entries = [write_shard(root / split / shard_name(i), _cut(columns, lo, hi))
               for i, (lo, hi) in enumerate(shard_bounds(len(columns["label"]), shard_rows))]
    return write_manifest(root, {split: entries}, shard_rows=shard_rows, features={"fields": []}, engine="local")


@pytest.fixture
def sharded(tmp_path):
    """10 rows of train as 3 shards (4 + 4 + 2); the middle one has no history entries."""
    columns = _split_columns(10)
    _write_split(tmp_path, columns, shard_rows=4)
    return tmp_path, columns


# --- write, manifest, read back -------------------------------------------------------------------


def test_three_shards_round_trip_with_histories_rebased(sharded):
    root, columns = sharded
    manifest = read_json(root / MANIFEST_FILE)
    assert manifest["splits"]["train"]["rows"] == 10 and manifest["shard_rows"] == 4
    shards = split_shards(root, "train")
    assert [(s.index, s.rows) for s in shards] == [(0, 4), (1, 4), (2, 2)]
    assert [s.path.name for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    # On disk each shard's offsets start at 0 and end at its own number of history entries.
    for shard in shards:
        own = shard.load()
        assert own["history_offsets"][0] == 0 and own["history_offsets"][-1] == len(own["history_values"])
    assert len(shards[1].load()["history_values"]) == 0
    joined = concat_shards(shards)
    assert set(joined) == set(columns)
    for name, values in columns.items():
        assert joined[name].dtype == values.dtype, name
        np.testing.assert_array_equal(joined[name], values, err_msg=name)
    # The re-based offsets still find each row's own history.
    row = 9
    np.testing.assert_array_equal(
        joined["history_values"][joined["history_offsets"][row]:joined["history_offsets"][row + 1]],
        columns["history_values"][columns["history_offsets"][row]:columns["history_offsets"][row + 1]])


def test_write_shard_refuses_columns_of_different_lengths(tmp_path):
    columns = _cut(_split_columns(6), 0, 6)
    with pytest.raises(ValueError, match="user_key has 5 rows, the shard 6"):
        write_shard(tmp_path / "s", {**columns, "user_key": columns["user_key"][:5]})
    with pytest.raises(ValueError, match="history_offsets has 6 entries for 6 rows"):
        write_shard(tmp_path / "s", {**columns, "history_offsets": columns["history_offsets"][:6]})


@pytest.mark.parametrize(("rows", "shard_rows", "bounds"), [
    (0, 5, [(0, 0)]),  # an empty split is one empty shard
    (10, 5, [(0, 5), (5, 10)]),  # an exact multiple: no empty tail shard
    (11, 5, [(0, 5), (5, 10), (10, 11)]),  # the remainder in a last, short shard
    (3, 10, [(0, 3)]),
    (3, 1, [(0, 1), (1, 2), (2, 3)]),
])
def test_shard_bounds(rows, shard_rows, bounds):
    assert shard_bounds(rows, shard_rows) == bounds


def test_shard_bounds_refuses_a_shard_size_below_one():
    with pytest.raises(ValueError, match="shard_rows must be at least 1, got 0"):
        shard_bounds(10, 0)


# --- a manifest and its files disagreeing ---------------------------------------------------------


def test_missing_column_file_names_it(sharded):
    root, _ = sharded
    shard = split_shards(root, "train")[1]
    (shard.path / "numeric.npy").unlink()
    with pytest.raises(ManifestError, match=r"shard-00001/numeric\.npy: missing"):
        shard.load()
    with pytest.raises(ManifestError, match="numeric.npy"):
        concat_shards(split_shards(root, "train"))


@pytest.mark.parametrize("replacement", ["fewer rows", "other dtype"])
def test_wrong_shape_or_dtype_names_the_file(sharded, replacement):
    root, _ = sharded
    shard = split_shards(root, "train")[0]
    label = np.zeros(3, np.float32) if replacement == "fewer rows" else np.zeros(4, np.float64)
    save_array(shard.path / "label.npy", label)
    with pytest.raises(ManifestError, match=r"shard-00000/label\.npy: holds .* the manifest says <f4 \[4\]"):
        shard.load()


def test_flipped_byte_is_caught_only_when_verifying(sharded):
    root, columns = sharded
    shard = split_shards(root, "train")[2]
    file = shard.path / "timestamp.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # the last value's top byte: the header, shape and dtype are untouched
    file.write_bytes(bytes(data))
    loaded = shard.load()  # headers only: the damage is not seen
    assert not np.array_equal(loaded["timestamp"], columns["timestamp"][8:])
    with pytest.raises(ManifestError, match=r"shard-00002/timestamp\.npy: sha256 differs"):
        shard.load(verify=True)
    assert split_shards(root, "train")[0].load(verify=True)["label"].shape == (4,)  # intact shards pass


# --- other layouts and versions -------------------------------------------------------------------


def _old_layout(root, columns: dict[str, np.ndarray]) -> None:
    """A dataset from before shards: <split>/<column>.npy, no manifest."""
    for name, values in columns.items():
        save_array(root / "train" / f"{name}.npy", values)


def test_a_directory_without_manifest_loads_as_one_shard(tmp_path):
    columns = _split_columns(7)
    _old_layout(tmp_path, columns)
    assert read_manifest(tmp_path) is None
    [shard] = split_shards(tmp_path, "train")
    assert (shard.index, shard.rows, shard.path) == (0, 7, tmp_path / "train")
    assert shard.has_history
    joined = concat_shards([shard])
    for name, values in columns.items():
        np.testing.assert_array_equal(joined[name], values, err_msg=name)
    assert len(SplitData.load(tmp_path, "train")) == 7
    with pytest.raises(FileNotFoundError, match="prepared split not found"):
        split_shards(tmp_path, "valid")


def test_verifying_a_pre_shard_split_checks_what_it_can(tmp_path):
    _old_layout(tmp_path, _split_columns(7))
    [shard] = split_shards(tmp_path, "train")
    assert shard.load(verify=True)["label"].shape == (7,)


@pytest.mark.parametrize(("key", "value"), [("version", 2), ("format", "something-else")])
def test_an_unknown_manifest_is_refused(sharded, key, value):
    root, _ = sharded
    manifest = read_json(root / MANIFEST_FILE)
    manifest[key] = value
    write_json(root / MANIFEST_FILE, manifest)
    refused = r"manifest\.json: format .* this recforge reads 'recforge-sharded' version 1"
    with pytest.raises(ManifestError, match=refused):
        read_manifest(root)
    with pytest.raises(ManifestError):
        split_shards(root, "train")


def test_a_split_the_manifest_does_not_list(sharded):
    root, _ = sharded
    with pytest.raises(FileNotFoundError, match="prepared split 'test' not in"):
        split_shards(root, "test")


def test_split_column_spans_every_shard(sharded):
    root, columns = sharded
    for name in ("categorical", "label", "user_key"):
        np.testing.assert_array_equal(split_column(root, "train", name), columns[name], err_msg=name)
    for name in ("history_values", "history_offsets"):
        with pytest.raises(ValueError, match="concat_shards"):
            split_column(root, "train", name)


# --- prepare(): the same dataset in many shards or one --------------------------------------------

IMPLICIT = SchemaConfig(label=LabelConfig(kind="implicit", column=None), context=["device"],
                        item_features=["category"], numeric=["position"])


def _implicit_log(n: int = 1500, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 60, n)
    return pa.table({
        "user_id": rng.integers(0, 80, n),
        "item_id": items,
        "timestamp": np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 10 * 86400, n)),
        "device": rng.choice(["ios", "web"], n),
        "category": items % 7,
        "position": rng.integers(0, 10, n),
    })


def test_prepare_cuts_the_same_rows_into_any_number_of_shards(tmp_path):
    clean = validate(_implicit_log(), IMPLICIT).clean

    def run(name: str, shard_rows: int):
        return prepare(clean, IMPLICIT, SplitConfig(), VocabConfig(), NegativesConfig(per_positive=2),
                       tmp_path / name, PrepareOptions(history_length=3, seed=1, shard_rows=shard_rows)).path

    shard_rows = 97
    small, big = run("small", shard_rows), run("big", 10**9)
    manifest = read_json(small / MANIFEST_FILE)
    meta = read_json(small / "meta.json")
    assert manifest["shard_rows"] == shard_rows and manifest["engine"] == "local"
    assert meta["negatives"]["sampled"] > 0  # implicit negatives are among the rows compared below
    total = 0
    for split in SPLITS:
        rows = manifest["splits"][split]["rows"]
        shards = split_shards(small, split)
        assert len(shards) == math.ceil(rows / shard_rows) > 1, split
        assert [s.rows for s in shards[:-1]] == [shard_rows] * (len(shards) - 1)
        assert sum(s.rows for s in shards) == rows == len(split_column(small, split, "label"))
        assert sorted(p.name for p in (small / split).iterdir()) == [shard_name(i) for i in range(len(shards))]
        [one] = split_shards(big, split)
        assert one.rows == rows
        total += rows
        many, single = SplitData.load(small, split), SplitData.load(big, split)
        assert single.history_values is not None and len(single.history_values) > 0
        lengths = single.history_offsets[1:] - single.history_offsets[:-1]
        assert int(lengths.max()) == 3
        for name in ("categorical", "numeric", "label", "history_values", "history_offsets"):
            assert getattr(many, name).equal(getattr(single, name)), f"{split}.{name}"
        np.testing.assert_array_equal(many.user_key, single.user_key)
        np.testing.assert_array_equal(split_column(small, split, "timestamp"), split_column(big, split, "timestamp"))
    big_manifest = read_json(big / MANIFEST_FILE)
    assert total == meta["rows"] == sum(big_manifest["splits"][s]["rows"] for s in SPLITS)
    assert total == meta["events"] + meta["negatives"]["sampled"] == 1500 + meta["negatives"]["sampled"]
