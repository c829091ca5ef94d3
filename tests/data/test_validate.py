"""Validation: every row is kept with normalized types or quarantined for its first failing reason."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.config import LabelConfig, SchemaConfig
from recforge.data.schema import DataError
from recforge.data.sources import read_events
from recforge.data.validate import REASONS, validate, write_outputs


def _schema(label: LabelConfig | None = None, **roles: list[str]) -> SchemaConfig:
    """A schema with every role spelled out, so the tests do not depend on config defaults."""
    fields = {"context": [], "item_features": [], "numeric": [], **roles}
    return SchemaConfig(label=label or LabelConfig(kind="click", column="label"), **fields)


CLICK = _schema(context=["device"], item_features=["category"], numeric=["price"])
RATING = _schema(LabelConfig(kind="rating", column="rating", min=0.5, max=5.0))
IMPLICIT = _schema(LabelConfig(kind="implicit", column=None))


def _text_table(rows: list[tuple[str | None, ...]], names: list[str]) -> pa.Table:
    """A table of strings as the CSV reader returns it, with provenance."""
    columns = {name: pa.array([row[k] for row in rows], pa.string()) for k, name in enumerate(names)}
    columns["_file"] = pa.array(["events.csv"] * len(rows))
    columns["_row"] = pa.array(range(1, len(rows) + 1), pa.int64())
    return pa.table(columns)


NAMES = ["user_id", "item_id", "timestamp", "label", "device", "category", "price"]
# One row per outcome; the comment is the expected reason.
ROWS: list[tuple[str | None, ...]] = [
    ("u1", "i1", "100", "1", "ios", "c1", "1.5"),  # kept
    (None, "i1", "x", "1", "ios", "c1", "1.5"),  # missing_user (wins over bad_timestamp)
    ("  ", "i1", "100", "1", "ios", "c1", "1.5"),  # missing_user (blank)
    ("u2", None, "100", "1", "ios", "c1", "1.5"),  # missing_item
    ("u2", "i2", None, "1", "ios", "c1", "1.5"),  # bad_timestamp (null)
    ("u2", "i2", "2026-13-01", "1", "ios", "c1", "1.5"),  # bad_timestamp (impossible date)
    ("u2", "i2", "101", None, "ios", "c1", "1.5"),  # missing_label
    ("u2", "i2", "102", "yes", "ios", "c1", "1.5"),  # bad_label
    ("u2", "i2", "103", "0.5", "ios", "c1", "1.5"),  # label_out_of_range (click must be 0 or 1)
    ("u2", "i2", "104", "2", "ios", "c1", "1.5"),  # label_out_of_range
    ("u2", "i2", "105", "0", "ios", "c1", "abc"),  # bad_numeric
    ("u2", "i2", "106", "0", "ios", "c1", "nan"),  # bad_numeric
    ("u2", "i2", "107", "0", "ios", "c1", None),  # bad_numeric
    ("u1", "i1", "100", "0", None, None, "2"),  # duplicate_event of row 1
    ("u3", "i3", "100", "0", None, "  ", "-3e2"),  # kept, with null context and item feature
]
EXPECTED = [
    None,
    "missing_user",
    "missing_user",
    "missing_item",
    "bad_timestamp",
    "bad_timestamp",
    "missing_label",
    "bad_label",
    "label_out_of_range",
    "label_out_of_range",
    "bad_numeric",
    "bad_numeric",
    "bad_numeric",
    "duplicate_event",
    None,
]


def test_each_reason_with_exact_counts() -> None:
    result = validate(_text_table(ROWS, NAMES), CLICK)
    expected_rows = [k + 1 for k, reason in enumerate(EXPECTED) if reason is not None]
    assert result.quarantine.column("_row").to_pylist() == expected_rows
    assert result.quarantine.column("_reason").to_pylist() == [r for r in EXPECTED if r is not None]
    assert result.counts == {
        "malformed_row": 0,
        "missing_user": 2,
        "missing_item": 1,
        "bad_timestamp": 2,
        "timestamp_out_of_range": 0,
        "missing_label": 1,
        "bad_label": 1,
        "label_out_of_range": 2,
        "bad_numeric": 3,
        "bad_split": 0,
        "duplicate_event": 1,
    }
    assert list(result.counts) == list(REASONS)
    assert result.rows_read == 15
    assert result.rows_kept == 2
    assert result.rows_quarantined == 13
    assert result.rows_read == result.rows_kept + result.rows_quarantined
    assert result.clean.column("_row").to_pylist() == [1, 15]


def test_clean_types_and_values() -> None:
    result = validate(_text_table(ROWS, NAMES), CLICK)
    clean = result.clean
    assert clean.column_names == [*NAMES, "_file", "_row"]
    types = {field.name: field.type for field in clean.schema}
    assert types == {
        "user_id": pa.string(),
        "item_id": pa.string(),
        "timestamp": pa.int64(),
        "label": pa.float64(),
        "device": pa.string(),
        "category": pa.string(),
        "price": pa.float64(),
        "_file": pa.string(),
        "_row": pa.int64(),
    }
    assert clean.column("price").to_pylist() == [1.5, -300.0]
    assert clean.column("device").to_pylist() == ["ios", None]
    assert clean.column("category").to_pylist() == ["c1", None]  # blank category is unknown, not ""
    assert result.report()["null_context"] == {"device": 1, "category": 1}


def test_quarantine_keeps_the_original_text() -> None:
    result = validate(_text_table(ROWS, NAMES), CLICK)
    q = result.quarantine
    assert q.column_names == ["_file", "_row", "_reason", *NAMES]
    assert all(field.type == pa.string() for field in q.schema if field.name != "_row")
    bad_date = q.filter(pa.compute.equal(q.column("_row"), 6))
    assert bad_date.column("timestamp").to_pylist() == ["2026-13-01"]
    assert bad_date.column("_file").to_pylist() == ["events.csv"]


def test_duplicate_keeps_the_first_kept_occurrence() -> None:
    rows = [
        ("u", "i", "5", "7"),  # bad label: not kept, so it cannot make row 2 a duplicate
        ("u", "i", "5", "1"),  # kept (first kept occurrence)
        ("u", "i", "5", "0"),  # duplicate of row 2
        ("u", "i", "6", "1"),  # other time: kept
        ("u", "j", "5", "1"),  # other item: kept
        ("u", "i", "5", "1"),  # duplicate of row 2
    ]
    result = validate(_text_table(rows, ["user_id", "item_id", "timestamp", "label"]), _schema())
    assert result.clean.column("_row").to_pylist() == [2, 4, 5]
    assert result.quarantine.column("_reason").to_pylist() == [
        "label_out_of_range",
        "duplicate_event",
        "duplicate_event",
    ]
    assert result.clean.column("label").to_pylist() == [1.0, 1.0, 1.0]


def test_iso_timestamps_parse_to_unix_seconds() -> None:
    ten = datetime(2026, 1, 1, 10, 0, 0, tzinfo=UTC)
    texts = [
        "2026-01-01T10:00:00",
        "2026-01-01 10:00:00",
        "2026-01-01T10:00:00Z",
        "2026-01-01T11:30:00+01:30",
        "2026-01-01T05:00:00-0500",
        "2026-01-01T10:00:00.750Z",
        "2026-01-01T10:00",
        " 1767261600 ",
        "1767261600.9",
        "2026-01-01",
    ]
    rows = [(f"u{k}", "i", text, "1") for k, text in enumerate(texts)]
    result = validate(_text_table(rows, ["user_id", "item_id", "timestamp", "label"]), _schema())
    stamp = int(ten.timestamp())
    midnight = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert result.clean.column("timestamp").to_pylist() == [stamp] * 9 + [midnight]
    assert result.rows_quarantined == 0


def test_typed_columns_are_normalized() -> None:
    paris = timezone(timedelta(hours=1))
    table = pa.table(
        {
            "user_id": pa.array([12, 13, 14], pa.int32()),
            "item_id": pa.array([3.0, 3.5, 7.0]),
            "timestamp": pa.array(
                [datetime(2026, 1, 1, 11, tzinfo=paris), datetime(2026, 1, 1, 10, tzinfo=UTC), None],
                pa.timestamp("ms", tz="UTC"),
            ),
            "rating": pa.array([4, 5, 1], pa.int8()),
            "_file": ["p.parquet"] * 3,
            "_row": pa.array([1, 2, 3], pa.int64()),
        }
    )
    result = validate(table, RATING)
    assert result.clean.column("user_id").to_pylist() == ["12", "13"]
    assert result.clean.column("item_id").to_pylist() == ["3", "3.5"]
    assert result.clean.column("timestamp").to_pylist() == [1767261600, 1767261600]
    assert result.clean.column("rating").to_pylist() == [4.0, 5.0]
    assert result.quarantine.column("_reason").to_pylist() == ["bad_timestamp"]


def test_float_and_date_times_and_in_memory_tables_without_provenance() -> None:
    table = pa.table(
        {
            "user_id": ["a", "b", "c"],
            "item_id": pa.array(["x", "y", "z"]).dictionary_encode(),
            "timestamp": pa.array([date(2026, 1, 2), date(1969, 12, 31), None], pa.date32()),
        }
    )
    result = validate(table, IMPLICIT)
    assert result.clean.column("timestamp").to_pylist() == [1767312000]
    assert result.clean.column("item_id").to_pylist() == ["x"]
    # A date before the epoch is no event of a behaviour log.
    assert result.quarantine.column("_reason").to_pylist() == ["timestamp_out_of_range", "bad_timestamp"]
    assert result.quarantine.column("_file").to_pylist() == ["<table>", "<table>"]
    assert result.quarantine.column("_row").to_pylist() == [2, 3]
    floats = pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": [1.7e9, float("inf")]})
    assert validate(floats, IMPLICIT).counts["bad_timestamp"] == 1


def test_rating_range_and_implicit_skips_label_checks() -> None:
    names = ["user_id", "item_id", "timestamp", "rating"]
    rows = [("u", "a", "1", "0.5"), ("u", "b", "1", "5"), ("u", "c", "1", "0.4"), ("u", "d", "1", "5.5")]
    result = validate(_text_table(rows, names), RATING)
    assert result.counts["label_out_of_range"] == 2
    assert result.clean.column("rating").to_pylist() == [0.5, 5.0]
    implicit = validate(_text_table(rows, names), IMPLICIT)
    assert implicit.rows_kept == 4
    assert "rating" not in implicit.clean.column_names


def test_numeric_inf_and_label_nan_are_rejected() -> None:
    schema = _schema(numeric=["price"])
    table = pa.table(
        {
            "user_id": ["a", "b", "c"],
            "item_id": ["x", "x", "x"],
            "timestamp": [1, 2, 3],
            "label": [1.0, float("nan"), 0.0],
            "price": [1.0, 1.0, float("inf")],
        }
    )
    result = validate(table, schema)
    assert result.quarantine.column("_reason").to_pylist() == ["bad_label", "bad_numeric"]
    assert result.quarantine.column("label").to_pylist() == ["nan", "0"]


def test_missing_column_is_a_data_error() -> None:
    schema = _schema(numeric=["price"])
    with pytest.raises(DataError, match=r"^table: missing column 'price' \(schema role: numeric\); found"):
        validate(pa.table({"user_id": ["a"], "item_id": ["b"], "timestamp": [1], "label": [1]}), schema)


def test_nothing_to_quarantine_still_has_typed_columns() -> None:
    result = validate(
        _text_table([("u", "i", "1", "1")], ["user_id", "item_id", "timestamp", "label"]), _schema()
    )
    assert result.rows_quarantined == 0
    assert result.quarantine.schema.names == [
        "_file",
        "_row",
        "_reason",
        "user_id",
        "item_id",
        "timestamp",
        "label",
    ]
    assert result.counts == dict.fromkeys(REASONS, 0)


def test_write_outputs_round_trip(tmp_path: Path) -> None:
    result = validate(_text_table(ROWS, NAMES), CLICK)
    paths = write_outputs(result, tmp_path / "out")
    assert paths == {
        "quarantine": tmp_path / "out" / "quarantine.parquet",
        "report": tmp_path / "out" / "validation_report.json",
    }
    report = json.loads(paths["report"].read_text())
    assert report == result.report()
    assert report["rows_read"] == 15 and report["rows_kept"] == 2 and report["rows_quarantined"] == 13
    assert report["by_reason"]["bad_numeric"] == 3
    assert pq.read_table(paths["quarantine"]).equals(result.quarantine)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "quarantine.parquet",
        "validation_report.json",
    ]


def test_read_then_validate_a_csv_file(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text(
        "user_id,item_id,timestamp,label\n1,10,2026-01-01T00:00:00Z,1\n1,10,1767225600,0\n2,,5,1\n"
    )
    schema = _schema()
    result = validate(read_events(tmp_path / "log.csv", "auto", schema), schema)
    assert result.clean.column("_row").to_pylist() == [1]
    assert result.quarantine.column("_reason").to_pylist() == ["duplicate_event", "missing_item"]
    assert result.quarantine.column("_file").to_pylist() == ["log.csv", "log.csv"]


def test_duplicates_across_partitions_point_at_the_later_file(tmp_path: Path) -> None:
    part = pa.table({"user_id": [1, 2], "item_id": [10, 20], "timestamp": [5, 6], "label": [1, 0]})
    pq.write_table(part, tmp_path / "part-0.parquet")
    pq.write_table(part.slice(1), tmp_path / "part-1.parquet")
    schema = _schema()
    result = validate(read_events(tmp_path, "auto", schema), schema)
    assert result.clean.column("user_id").to_pylist() == ["1", "2"]
    assert result.quarantine.column("_file").to_pylist() == ["part-1.parquet"]
    assert result.quarantine.column("_row").to_pylist() == [1]
    assert result.quarantine.column("_reason").to_pylist() == ["duplicate_event"]


def test_column_of_an_impossible_type_is_a_data_error() -> None:
    table = pa.table({"user_id": [[1, 2]], "item_id": ["i"], "timestamp": [1]})
    with pytest.raises(
        DataError, match=r"^column 'user_id' has type list<.*>, which cannot hold ids or categories$"
    ):
        validate(table, IMPLICIT)
    table = pa.table({"user_id": ["u"], "item_id": ["i"], "timestamp": [True]})
    with pytest.raises(DataError, match=r"^column 'timestamp' has type bool, which cannot hold timestamps$"):
        validate(table, IMPLICIT)


# --- timestamp units and range -----------------------------------------------------------------------

INSTANT = 1_767_261_600  # 2026-01-01T10:00:00Z


def _times_table(times: pa.Array) -> pa.Table:
    n = len(times)
    return pa.table({"user_id": [f"u{k}" for k in range(n)], "item_id": ["i"] * n, "timestamp": times})


def test_auto_unit_reads_each_number_in_the_unit_of_its_magnitude(caplog: pytest.LogCaptureFixture) -> None:
    ints = [INSTANT, INSTANT * 1000 + 999, INSTANT * 10**6 + 5, INSTANT * 10**9 + 123_456_789, 0, 9_223_372_036]
    # 1767261600999999999: a float64 rounds it to ...601; the last second before the next one must stay
    texts = [str(v) for v in ints] + [f"{INSTANT}000.5", "1767261600123456789", "1767261600999999999"]
    floats = [float(INSTANT), INSTANT * 1000.0 + 1.5, INSTANT * 1e6, INSTANT * 1e9]
    with caplog.at_level("WARNING", logger="recforge.data.validate"):
        for times in (pa.array(ints, pa.int64()), pa.array(texts), pa.array(floats), pa.array(ints, pa.uint64())):
            result = validate(_times_table(times), IMPLICIT)
            assert result.rows_quarantined == 0
            got = result.clean.column("timestamp").to_pylist()
            assert set(got) <= {INSTANT, 0, 9_223_372_036}
    assert result.report()["time_units"] == {"s": 3, "ms": 1, "us": 1, "ns": 1}
    assert "column 'timestamp' mixes timestamp units (s 3, ms 1, us 1, ns 1)" in caplog.text


def test_implausible_times_are_quarantined_as_out_of_range() -> None:
    year_5138 = 99_972_403_200  # seconds; between the seconds and milliseconds bands
    texts = ["-1", "-1767261600", str(year_5138), "5138-01-01T00:00:00Z", "10000-01-01", "1969-12-31",
             "99999999999999999999999", "50000000000", "1e300", "9223372037", "1767261600"]
    result = validate(_times_table(pa.array(texts)), IMPLICIT)
    assert result.clean.column("timestamp").to_pylist() == [INSTANT]
    assert result.quarantine.column("_reason").to_pylist() == ["timestamp_out_of_range"] * 10
    assert result.quarantine.column("timestamp").to_pylist() == texts[:-1]
    assert result.report()["by_reason"]["timestamp_out_of_range"] == 10
    assert result.counts["bad_timestamp"] == 0


def test_out_of_range_typed_times_and_integers_are_quarantined_not_errors() -> None:
    # Years 5138 and 10000 (beyond Python's datetime) and 1969, written as seconds.
    stamps = pa.array([INSTANT, 99_972_403_200, 253_402_300_800, -86_400], pa.int64()).cast(pa.timestamp("s"))
    result = validate(_times_table(stamps), IMPLICIT)
    assert result.quarantine.column("_reason").to_pylist() == ["timestamp_out_of_range"] * 3
    assert result.quarantine.column("_row").to_pylist() == [2, 3, 4]
    dates = pa.array([INSTANT // 86400, 3_000_000], pa.int32()).cast(pa.date32())  # 3e6 days: year 10183
    assert validate(_times_table(dates), IMPLICIT).counts["timestamp_out_of_range"] == 1
    huge = pa.array([2**64 - 1, INSTANT, 2**63], pa.uint64())
    result = validate(_times_table(huge), IMPLICIT)
    assert result.quarantine.column("_reason").to_pylist() == ["timestamp_out_of_range"] * 2
    assert result.clean.column("timestamp").to_pylist() == [INSTANT]


def test_explicit_time_unit_is_applied_to_every_number() -> None:
    ms_schema = IMPLICIT.model_copy(update={"time_unit": "ms"})
    texts = [str(INSTANT * 1000), str(INSTANT), "9223372036854", "9223372036855", "-1", "2026-01-01T10:00:00Z"]
    result = validate(_times_table(pa.array(texts)), ms_schema)
    # In ms, 1767261600 is 1970-01-21: early, but a time the unit allows.
    assert result.clean.column("timestamp").to_pylist() == [INSTANT, INSTANT // 1000, 9_223_372_036, INSTANT]
    assert result.quarantine.column("_row").to_pylist() == [4, 5]
    assert result.report()["time_units"] == {"ms": 3}  # in-range numbers only
    s_schema = IMPLICIT.model_copy(update={"time_unit": "s"})
    ms_values = pa.array([INSTANT * 1000, INSTANT, INSTANT * 10**9], pa.int64())
    result = validate(_times_table(ms_values), s_schema)
    assert result.clean.column("timestamp").to_pylist() == [INSTANT]
    assert result.quarantine.column("_reason").to_pylist() == ["timestamp_out_of_range"] * 2
    ns_schema = IMPLICIT.model_copy(update={"time_unit": "ns"})
    result = validate(_times_table(pa.array([INSTANT * 10**9, 2**63 - 1], pa.int64())), ns_schema)
    assert result.clean.column("timestamp").to_pylist() == [INSTANT, 9_223_372_036]


def test_time_unit_is_a_strict_config_field() -> None:
    from recforge.config import ConfigError, load

    assert load(overrides=["data.schema.time_unit=ms"]).data.schema_.time_unit == "ms"
    assert SchemaConfig().time_unit == "auto"
    with pytest.raises(ConfigError, match=r"data\.schema\.time_unit"):
        load(overrides=["data.schema.time_unit=minutes"])
