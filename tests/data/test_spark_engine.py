"""data.engine=spark against data.engine=local on the same logs: identical datasets, row for row.

One real Spark (local[2]) session serves the module. The log is spread over several CSV files and
holds every kind of trouble the validator knows (ragged lines, missing ids, bad and out-of-range
timestamps, duplicates within and across files, ties at the split's cut), so the parity covers
quarantine counts, the split, vocabularies, encoding, negatives, histories and the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.config import Config
from recforge.data.schema import DataError
from recforge.data.shards import concat_shards, read_manifest, split_shards
from recforge.data.vocab import load_vocabs
from recforge.recipes.prepare import prepare_data, validate_source

pytestmark = pytest.mark.slow
pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java (make test installs it)", allow_module_level=True)

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def spark(s3_server):
    """Started after the S3 server, whose endpoint and keys are in os.environ: the JVM and the Python
    workers it forks take the environment they start with, and the s3a:// test reads through them."""
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers run recforge's code: this interpreter
    session = (SparkSession.builder.master("local[2]").appName("recforge-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2").config("spark.default.parallelism", "2")
               .config("spark.sql.adaptive.enabled", "false").config("spark.sql.session.timeZone", "UTC")

               .getOrCreate())
    yield session
    session.stop()


def _write_log(root: Path, files: int = 3, rows: int = 1500, seed: int = 0) -> Path:
    """A click log over several CSV files, with bad rows, duplicates and ties planted."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    start = 1_700_000_000
    for f in range(files):
        lines = ["user_id,item_id,timestamp,device,category,price"]
        users = rng.zipf(1.6, rows) % 97
        items = rng.zipf(1.4, rows) % 211
        times = start + f * 3 * 86400 + np.sort(rng.integers(0, 3 * 86400, rows)) // 600 * 600  # many ties
        for r in range(rows):
            lines.append(f"{users[r]},{items[r]},{times[r]},{rng.choice(['ios', 'web', ''])},c{items[r] % 9},"
                         f"{rng.gamma(2.0, 10.0):.3f}")
        lines[5] = "7,3"  # ragged: malformed_row
        lines[9] = ",5,1700000000,ios,c1,1.0"  # missing_user
        lines[11] = "4,,1700000000,ios,c1,1.0"  # missing_item
        lines[13] = "4,5,yesterday,ios,c1,1.0"  # bad_timestamp
        lines[17] = "4,5,-12,ios,c1,1.0"  # timestamp_out_of_range
        lines[19] = "4,5,1700000000,ios,c1,abc"  # bad_numeric
        lines[21] = lines[20]  # duplicate within the file
        lines[40] = f"{start + 5}000,9,web,c3,2.5"  # ragged again (ms-looking number in the wrong column)
        lines[60] = lines[61].replace(lines[61].split(",")[2], str(int(lines[61].split(",")[2]) * 1000))  # ms
        (root / f"part-{f:03d}.csv").write_text("\n".join(lines) + "\n")
    # A duplicate of the first file's row across files.
    with open(root / f"part-{files - 1:03d}.csv", "a") as handle:
        handle.write((root / "part-000.csv").read_text().splitlines()[30] + "\n")
    return root


def _config(tmp: Path, source: Path | str, engine: str, name: str, **data) -> Config:
    return Config.model_validate({
        "seed": 7, "workdir": str(tmp / name), "prepared_dir": str(tmp / name / "prepared"),
        "data": {"source": str(source), "format": data.pop("format", "csv"), "engine": engine, "history_length": 4,
                 "shard_rows": 700, "user_bucket_rows": 1200,
                 "schema": {"user": "user_id", "item": "item_id", "time": "timestamp",
                            "label": {"kind": "implicit", "column": None}, "context": ["device"],
                            "item_features": ["category"], "numeric": ["price"]},
                 "negatives": {"per_positive": 2}, **data},
    })


def _both(tmp: Path, source: Path, **data):
    local = prepare_data(_config(tmp, source, "local", "local", **data))
    spark = prepare_data(_config(tmp, source, "spark", "spark", **data))
    return local, spark


def _assert_same_dataset(a: Path, b: Path) -> None:
    for vocab in sorted((a / "vocab").glob("*.json")):
        assert json.loads(vocab.read_text()) == json.loads((b / "vocab" / vocab.name).read_text()), vocab.name
    for name in ("features.npy", "train_counts.npy"):
        np.testing.assert_array_equal(np.load(a / "items" / name), np.load(b / "items" / name))
    ma, mb = read_manifest(a), read_manifest(b)
    for split in SPLITS:
        shards_a, shards_b = split_shards(a, split), split_shards(b, split)
        assert [s.rows for s in shards_a] == [s.rows for s in shards_b], split
        for sa, sb in zip(shards_a, shards_b, strict=True):
            ca, cb = sa.load(), sb.load()
            for column in ca:
                if column == "numeric":  # means and stds are summed in a different order
                    np.testing.assert_allclose(ca[column], cb[column], rtol=1e-5, atol=1e-6)
                else:
                    np.testing.assert_array_equal(ca[column], cb[column], err_msg=f"{split} {column}")
        assert ma["splits"][split]["rows"] == mb["splits"][split]["rows"]
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for key in ("fields", "split", "positives", "users", "items", "rows", "events", "negatives", "history_length",
                "history_from"):
        assert meta_a[key] == meta_b[key], key
    np.testing.assert_allclose([n["mean"] for n in meta_a["numeric"]], [n["mean"] for n in meta_b["numeric"]],
                               rtol=1e-12)


@pytest.fixture(scope="module")
def prepared_both(spark, tmp_path_factory):
    """The planted log prepared by both engines (time split, implicit negatives, histories of training
    clicks only, 3+ shards)."""
    tmp = tmp_path_factory.mktemp("both")
    return _both(tmp, _write_log(tmp / "log"))


def test_spark_and_local_prepare_the_same_dataset(prepared_both):
    (local, local_result), (sparked, spark_result) = prepared_both
    report = local_result.report()
    assert report == spark_result.report()
    assert report["rows_read"] == report["rows_kept"] + report["rows_quarantined"]
    by_reason = report["by_reason"]
    for reason in ("malformed_row", "missing_user", "missing_item", "bad_timestamp", "timestamp_out_of_range",
                   "bad_numeric", "duplicate_event"):
        assert by_reason[reason] >= 1, reason
    assert report["time_units"]["ms"] >= 1
    _assert_same_dataset(local.path, sparked.path)
    assert len(split_shards(sparked.path, "train")) >= 3  # the parity covers several shards
    assert read_manifest(sparked.path)["engine"] == "spark"
    assert json.loads((sparked.path / "meta.json").read_text())["negatives"]["sampled"] > 0
    # The quarantines name the same rows for the same reasons.
    qa, qb = (pq.read_table(path.parent / "validation" / "quarantine.parquet") for path in (local.path, sparked.path))
    assert qa.select(["_file", "_row", "_reason"]).to_pylist() == qb.select(["_file", "_row", "_reason"]).to_pylist()


def test_spark_negatives_never_hit_the_users_own_items_and_histories_do_not_leak(prepared_both):
    _, (sparked, _) = prepared_both
    parts = {split: concat_shards(split_shards(sparked.path, split)) for split in SPLITS}
    rows = {k: np.concatenate([parts[s][k] for s in SPLITS]) for k in ("categorical", "label", "timestamp",
                                                                         "user_key")}
    clicked = rows["label"] == 1
    positives = set(zip(rows["user_key"][clicked].tolist(), rows["categorical"][clicked, 1].tolist(), strict=True))
    negatives = set(zip(rows["user_key"][~clicked].tolist(), rows["categorical"][~clicked, 1].tolist(), strict=True))
    assert negatives and not negatives & {(u, i) for u, i in positives if i != 0}
    # Every history item is a training click of the same user strictly earlier than the row.
    train = parts["train"]
    train_clicked = train["label"] == 1
    clicks: dict[int, set[tuple[int, int]]] = {}
    for user, item, when in zip(train["user_key"][train_clicked], train["categorical"][train_clicked, 1],
                                train["timestamp"][train_clicked], strict=True):
        clicks.setdefault(int(user), set()).add((int(when), int(item)))
    test = parts["test"]
    offsets, values = test["history_offsets"], test["history_values"]
    assert offsets[-1] > 0
    for r in range(len(test["label"])):
        earlier = {item for when, item in clicks.get(int(test["user_key"][r]), ()) if when < test["timestamp"][r]}
        assert set(values[offsets[r]:offsets[r + 1]].tolist()) <= earlier, r


def test_an_unreadable_file_fails_naming_it(spark, tmp_path):
    source = _write_log(tmp_path / "log", files=3, rows=200)
    (source / "part-001.csv").write_text("user_id,item_id\n1,2\n")  # the schema's columns are missing
    with pytest.raises(DataError, match="part-001.csv"):
        prepare_data(_config(tmp_path, source, "spark", "spark"))
    assert not (tmp_path / "spark" / "prepared").exists()


def _parquet_parts(root: Path, parts: int, rows: int, seed: int, fold: bool = False) -> Path:
    """Parquet parts written at different times: the id and time types drift between them (with `fold`,
    a split column too, some of its values in odd case or spacing and some not a split at all)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for p in range(parts):
        users = rng.integers(0, 60, rows)
        items = rng.integers(0, 150, rows)
        times = 1_700_000_000 + p * 86400 + np.sort(rng.integers(0, 86400, rows))
        columns = {"user_id": pa.array(users, pa.int32() if p == 1 else pa.int64()),
                   "item_id": pa.array([f"{i}" for i in items]) if p == 2 else pa.array(items),
                   "timestamp": pa.array(times * 1000 if p == 1 else times),  # one partition logged in ms
                   "device": pa.array(rng.choice(["ios", "web"], rows)),
                   "category": pa.array(items % 9), "price": pa.array(rng.gamma(2.0, 10.0, rows))}
        if fold:
            columns["fold"] = pa.array(rng.choice(["train"] * 6 + ["valid", "test", " Test", "holdout"], rows))
        if p == 3:
            columns["price"] = pa.array([f"{v:.2f}" if r % 50 else "n/a" for r, v in enumerate(columns["price"]
                                                                                            .to_pylist())])
        pq.write_table(pa.table(columns), root / f"part-{p:03d}.parquet")
    return root


def test_leave_last_out_hashing_and_schema_drift_match(spark, tmp_path):
    source = _parquet_parts(tmp_path / "log", parts=4, rows=500, seed=5)
    (local, local_result), (sparked, spark_result) = _both(
        tmp_path, source, format="parquet", split={"method": "leave_last_out"}, history_length=0,
        vocab={"min_count": 2, "hash_buckets": {"device": 5}})
    report = local_result.report()
    assert report == spark_result.report()
    assert report["time_units"] == {"s": 1500, "ms": 500} and report["by_reason"]["bad_numeric"] == 10
    _assert_same_dataset(local.path, sparked.path)
    # `data validate` on Spark reports what it reports locally.
    spark_cfg = _config(tmp_path, source, "spark", "spark", format="parquet")
    assert validate_source(spark_cfg).result.report() == report


def test_per_user_fraction_and_split_column_match(spark, tmp_path):
    """The two per-row split rules beyond time and leave-last-out: the planted log (ties, bad rows) by
    each user's latest share, and parquet parts by their own split column (bad values quarantined)."""
    (local, local_result), (sparked, spark_result) = _both(
        tmp_path / "fraction", _write_log(tmp_path / "log"),
        split={"method": "per_user_fraction", "valid_fraction": 0.15, "test_fraction": 0.25}, history_from="all")
    assert local_result.report() == spark_result.report()
    _assert_same_dataset(local.path, sparked.path)
    meta = json.loads((local.path / "meta.json").read_text())["split"]
    assert meta["test"]["rows"] > 0 and meta["valid"]["rows"] > 0

    source = _parquet_parts(tmp_path / "folds", parts=4, rows=400, seed=9, fold=True)
    schema = {"user": "user_id", "item": "item_id", "time": "timestamp", "split": "fold",
              "label": {"kind": "implicit", "column": None}, "context": ["device"],
              "item_features": ["category"], "numeric": ["price"]}
    (local, local_result), (sparked, spark_result) = _both(
        tmp_path / "column", source, format="parquet", split={"method": "column"}, schema=schema)
    report = local_result.report()
    assert report == spark_result.report() and report["by_reason"]["bad_split"] > 0
    _assert_same_dataset(local.path, sparked.path)


def test_attribute_tables_join_the_same_on_both_engines(spark, tmp_path):
    """data.items (Parquet, integer ids, an item missing) and data.users (CSV keyed by another column
    name) joined as each file is read: the same dataset and report from both engines."""
    items = pa.table({"item_id": pa.array(range(1, 211), pa.int64()),
                      "genre": [f"g{i % 5}" for i in range(1, 211)]})  # item 0 has no row
    pq.write_table(items, tmp_path / "items.parquet")
    (tmp_path / "users.csv").write_text("uid,segment,unused\n" + "".join(f"{u},s{u % 3},x\n" for u in range(97)))
    schema = {"user": "user_id", "item": "item_id", "time": "timestamp",
              "label": {"kind": "implicit", "column": None}, "context": ["device", "segment"],
              "item_features": ["category", "genre"], "numeric": ["price"]}
    (local, local_result), (sparked, spark_result) = _both(
        tmp_path, _write_log(tmp_path / "log"), schema=schema,
        items={"path": str(tmp_path / "items.parquet")}, users={"path": str(tmp_path / "users.csv"), "key": "uid"})
    report = local_result.report()
    assert report == spark_result.report()
    assert report["null_context"]["genre"] > 0 and report["null_context"]["segment"] == 0
    _assert_same_dataset(local.path, sparked.path)
    meta = json.loads((local.path / "meta.json").read_text())
    assert meta["source"]["attributes"]["items"]["rows"] == 210
    assert meta["source"]["attributes"]["users"]["columns"] == ["segment"]
    # The item feature table holds each item's genre from the side table; item 0 has none (unknown).
    vocabs = load_vocabs(local.path / "vocab")
    features = np.load(local.path / "items" / "features.npy")
    items_index = vocabs["item_id"].encode(pa.array(["5", "7", "0"]))
    genres = vocabs["genre"].encode(pa.array(["g0", "g2"]))
    assert features[items_index[0], 1] == genres[0] and features[items_index[1], 1] == genres[1]
    assert items_index[2] > 0 and features[items_index[2], 1] == 0


def test_one_corrupt_file_among_a_thousand_is_named(spark, tmp_path):
    source = tmp_path / "log"
    source.mkdir()
    header = "user_id,item_id,timestamp,device,category,price\n"
    for f in range(1000):
        (source / f"part-{f:04d}.csv").write_text(header + f"{f % 17},{f % 23},{1_700_000_000 + f},ios,c1,1.5\n")
    (source / "part-0613.csv").write_bytes(b"user_id,item_id\n\x00\x01garbage\n")
    with pytest.raises(DataError, match=r"1 file\(s\) could not be read: .*part-0613\.csv"):
        validate_source(_config(tmp_path, source, "spark", "spark"))


def test_a_huge_line_is_read_or_quarantined_like_local(spark, tmp_path):
    source = _write_log(tmp_path / "log", files=1, rows=300)
    with open(source / "part-000.csv", "a") as handle:
        handle.write(f"5,7,1700000123,{'x' * (3 << 20)},c1,2.0\n")  # a 3 MB device value: read, kept
        handle.write(f"5,7,1700000124,{'y' * (3 << 20)}\n")  # a 3 MB ragged line: malformed_row
    local = validate_source(_config(tmp_path, source, "local", "local"))
    sparked = validate_source(_config(tmp_path, source, "spark", "spark"))
    assert local.result.report() == sparked.result.report()


def test_a_log_on_s3_prepares_like_its_local_copy(spark, s3_prefix, tmp_path):
    from recforge.storage import put_bytes, put_file

    source = _write_log(tmp_path / "log", files=3, rows=400)
    for file in sorted(source.iterdir()):
        put_file(file, f"{s3_prefix}/log/day=1/{file.name}")
    put_bytes(f"{s3_prefix}/log/_SUCCESS", b"")  # what writers leave beside the data: not read
    put_bytes(f"{s3_prefix}/log/day=1/.part-9.csv.tmp", b"half,written")
    # The local files sit one folder deeper on S3: same names relative to the root, as in day=1/part-000.csv.
    nested = tmp_path / "nested"
    shutil.copytree(source, nested / "day=1")
    local = prepare_data(_config(tmp_path, nested, "local", "local"))
    remote = prepare_data(_config(tmp_path, f"{s3_prefix}/log", "local", "remote"))
    sparked = prepare_data(_config(tmp_path, f"{s3_prefix.replace('s3://', 's3a://', 1)}/log", "spark",
                                   "spark"))
    report = local[1].report()
    assert report["rows_read"] == 3 * 400 + 1 and report == remote[1].report() == sparked[1].report()
    _assert_same_dataset(local[0].path, remote[0].path)
    _assert_same_dataset(local[0].path, sparked[0].path)
    assert json.loads((remote[0].path / "meta.json").read_text())["source"]["files"] == \
        [f"day=1/part-{f:03d}.csv" for f in range(3)]
    # A missing prefix and a bad row are named by their URI.
    with pytest.raises(DataError, match="no such file or prefix: s3://.*/nothing"):
        validate_source(_config(tmp_path, f"{s3_prefix}/nothing", "local", "missing"))
    put_bytes(f"{s3_prefix}/bad/part-000.csv", b"user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"s3a://.*/bad/part-000\.csv"):
        validate_source(_config(tmp_path, f"{s3_prefix.replace('s3://', 's3a://', 1)}/bad", "spark", "bad"))
