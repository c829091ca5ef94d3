"""Readers: every format yields the schema's columns plus _file/_row; bad input fails in one line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.config import LabelConfig, SchemaConfig
from recforge.data.schema import DataError, check_columns, required_columns
from recforge.data.sources import detect_format, read_events


def _schema(label: LabelConfig | None = None, **roles: list[str]) -> SchemaConfig:
    """A schema with every role spelled out, so the tests do not depend on config defaults."""
    fields = {"context": [], "item_features": [], "numeric": [], **roles}
    return SchemaConfig(label=label or LabelConfig(kind="click", column="label"), **fields)


PLAIN = _schema()
CLICK = _schema(context=["device"], numeric=["price"])
RATING = _schema(LabelConfig(kind="rating", column="rating", min=0.5, max=5.0))
IMPLICIT = _schema(LabelConfig(kind="implicit", column=None))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _events(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(range(start, start + n), pa.int64()),
            "item_id": [f"i{k}" for k in range(n)],
            "timestamp": pa.array([1_700_000_000 + k for k in range(n)], pa.int64()),
            "label": pa.array([k % 2 for k in range(n)], pa.int8()),
            "device": ["ios"] * n,
            "price": [1.5] * n,
            "unused": [0] * n,
        }
    )


# --- schema ----------------------------------------------------------------------------------------


def test_required_columns_follow_roles_and_skip_label_for_implicit() -> None:
    schema = _schema(context=["hour"], item_features=["cat"], numeric=["price"])
    assert required_columns(schema) == ["user_id", "item_id", "timestamp", "label", "hour", "cat", "price"]
    assert required_columns(IMPLICIT) == ["user_id", "item_id", "timestamp"]


def test_check_columns_names_every_missing_column_with_its_role() -> None:
    with pytest.raises(DataError) as err:
        check_columns(["user_id", "item_id", "timestamp"], CLICK, "events.csv")
    assert str(err.value) == (
        "events.csv: missing columns 'label' (schema role: label), 'device' (schema role: context), "
        "'price' (schema role: numeric); found columns: user_id, item_id, timestamp"
    )
    with pytest.raises(DataError, match=r"^events.csv: missing column 'label' \(schema role: label\); found"):
        check_columns(["user_id", "item_id", "timestamp"], PLAIN, "events.csv")
    check_columns(["extra", "user_id", "item_id", "timestamp", "label"], PLAIN, "ok.csv")


# --- formats ---------------------------------------------------------------------------------------


def test_parquet_keeps_types_and_only_schema_columns(tmp_path: Path) -> None:
    pq.write_table(_events(3), tmp_path / "events.parquet")
    table = read_events(tmp_path / "events.parquet", "auto", CLICK)
    assert table.column_names == [
        "user_id",
        "item_id",
        "timestamp",
        "label",
        "device",
        "price",
        "_file",
        "_row",
    ]
    assert table.schema.field("user_id").type == pa.int64()
    assert table.column("item_id").to_pylist() == ["i0", "i1", "i2"]
    assert table.column("_file").to_pylist() == ["events.parquet"] * 3
    assert table.column("_row").to_pylist() == [1, 2, 3]
    assert table.schema.field("_row").type == pa.int64()


def test_csv_reads_every_column_as_text_and_empty_cells_as_null(tmp_path: Path) -> None:
    _write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp,label,device,price,extra\n7,42,1700000000,1,ios,2.50,x\n8,43,,0,,NA,y\n",
    )
    table = read_events(tmp_path / "log.csv", "auto", CLICK)
    assert all(field.type == pa.string() for field in table.schema if not field.name.startswith("_"))
    assert "extra" not in table.column_names
    assert table.column("price").to_pylist() == ["2.50", "NA"]  # text as written, not 2.5
    assert table.column("timestamp").to_pylist() == ["1700000000", None]
    assert table.column("device").to_pylist() == ["ios", None]
    assert table.column("_row").to_pylist() == [1, 2]


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    _write(tmp_path / "bom.csv", "\ufeffuser_id,item_id,timestamp,label\n1,2,3,1\n")
    table = read_events(tmp_path / "bom.csv", "csv", PLAIN)
    assert table.column("user_id").to_pylist() == ["1"]


def test_movielens_u_data(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    table = read_events(tmp_path / "u.data", "auto", RATING)
    assert table.column_names == ["user_id", "item_id", "timestamp", "rating", "_file", "_row"]
    assert table.column("user_id").to_pylist() == ["196", "186"]
    assert table.column("item_id").to_pylist() == ["242", "302"]
    assert table.column("rating").to_pylist() == ["3", "3"]
    assert table.column("timestamp").to_pylist() == ["881250949", "891717742"]


def test_movielens_ratings_csv_is_renamed(tmp_path: Path) -> None:
    _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n",
    )
    assert detect_format(tmp_path / "ratings.csv") == "movielens"
    table = read_events(tmp_path / "ratings.csv", "auto", RATING)
    assert table.column("item_id").to_pylist() == ["31", "1029"]
    assert table.column("rating").to_pylist() == ["2.5", "3.0"]
    assert table.column("_row").to_pylist() == [1, 2]


def test_movielens_ratings_dat_double_colon_with_crlf(tmp_path: Path) -> None:
    _write(
        tmp_path / "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\r\n\r\n2::3068::4::978299000"
    )
    table = read_events(tmp_path / "ratings.dat", "auto", RATING)
    assert table.column("user_id").to_pylist() == ["1", "1", "2"]
    assert table.column("item_id").to_pylist() == ["1193", "661", "3068"]
    assert table.column("rating").to_pylist() == ["5", "3", "4"]
    assert table.column("timestamp").to_pylist() == ["978300760", "978302109", "978299000"]
    assert table.column("_row").to_pylist() == [1, 2, 3]


def test_movielens_with_implicit_schema_drops_rating(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n")
    assert read_events(tmp_path / "ratings.dat", "movielens", IMPLICIT).column_names == [
        "user_id",
        "item_id",
        "timestamp",
        "_file",
        "_row",
    ]


def test_auto_detection_by_name_and_header(tmp_path: Path) -> None:
    _write(tmp_path / "plain.csv", "user_id,item_id,timestamp,label\n1,2,3,1\n")
    pq.write_table(_events(1), tmp_path / "x.pq")
    assert detect_format(tmp_path / "plain.csv") == "csv"
    assert detect_format(tmp_path / "x.pq") == "parquet"
    assert detect_format(tmp_path / "u.data") == "movielens"
    assert detect_format(tmp_path / "ratings.dat") == "movielens"
    with pytest.raises(DataError, match=r"cannot tell the format of .*events\.json"):
        detect_format(tmp_path / "events.json")


def test_explicit_format_overrides_the_name(tmp_path: Path) -> None:
    _write(tmp_path / "events.txt", "user_id,item_id,timestamp,label\n1,2,3,1\n")
    _write(tmp_path / "u1.base", "5\t6\t4\t100\n")
    assert read_events(tmp_path / "events.txt", "csv", PLAIN).num_rows == 1
    assert read_events(tmp_path / "u1.base", "movielens", RATING).column("item_id").to_pylist() == ["6"]


# --- directories -----------------------------------------------------------------------------------


def test_directory_of_parquet_partitions_is_concatenated_in_name_order(tmp_path: Path) -> None:
    root = tmp_path / "events"
    root.mkdir()
    pq.write_table(_events(2, start=100), root / "part-1.parquet")
    pq.write_table(_events(3, start=0), root / "part-0.parquet")
    (root / "day=2").mkdir()
    pq.write_table(_events(1, start=500), root / "day=2" / "part-0.parquet")
    _write(root / "_SUCCESS", "")
    _write(root / ".tmp-part-2.parquet-abc", "half written")
    _write(root / "README.txt", "notes")
    table = read_events(root, "auto", CLICK)
    assert (
        table.column("_file").to_pylist()
        == ["day=2/part-0.parquet"] + ["part-0.parquet"] * 3 + ["part-1.parquet"] * 2
    )
    assert table.column("_row").to_pylist() == [1, 1, 2, 3, 1, 2]
    assert table.column("user_id").to_pylist() == [500, 0, 1, 2, 100, 101]


def test_partitions_with_disagreeing_types_fall_back_to_text(tmp_path: Path) -> None:
    pq.write_table(_events(1), tmp_path / "a.parquet")
    pq.write_table(_events(1).set_column(0, "user_id", pa.array(["u9"])), tmp_path / "b.parquet")
    table = read_events(tmp_path, "parquet", CLICK)
    assert table.schema.field("user_id").type == pa.string()
    assert table.column("user_id").to_pylist() == ["0", "u9"]


def test_directory_without_data_files(tmp_path: Path) -> None:
    _write(tmp_path / "notes.txt", "x")
    _write(tmp_path / ".hidden.csv", "user_id\n1\n")
    with pytest.raises(DataError, match=rf"^directory {tmp_path} holds no data files"):
        read_events(tmp_path, "auto", CLICK)


def test_directory_mixing_formats(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "user_id,item_id,timestamp,label\n1,2,3,1\n")
    pq.write_table(_events(1), tmp_path / "b.parquet")
    with pytest.raises(DataError) as err:
        read_events(tmp_path, "auto", PLAIN)
    assert str(err.value) == (
        f"directory {tmp_path} mixes formats: a.csv (csv), b.parquet (parquet); keep one format per directory"
    )


# --- errors ----------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^no such file or directory: {tmp_path / 'nope.csv'}$"):
        read_events(tmp_path / "nope.csv", "auto", CLICK)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero.csv", ""),
        ("header.csv", "user_id,item_id,timestamp,label\n"),
        ("zero.parquet", ""),
        ("u.data", "\n"),
        ("ratings.dat", "\r\n\r\n"),
    ],
)
def test_empty_files(tmp_path: Path, name: str, content: str) -> None:
    _write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"^{tmp_path / name} is empty: no data rows$"):
        read_events(tmp_path / name, "auto", IMPLICIT)


def test_parquet_without_rows_is_empty(tmp_path: Path) -> None:
    pq.write_table(_events(0), tmp_path / "none.parquet")
    with pytest.raises(DataError, match=r"none\.parquet is empty: no data rows$"):
        read_events(tmp_path / "none.parquet", "auto", CLICK)


def test_csv_missing_columns_fail_on_the_header_before_rows_are_parsed(tmp_path: Path) -> None:
    # The body is malformed too: the column check must come first, from the header alone.
    _write(tmp_path / "events.csv", "user_id,item_id,timestamp\n1,2\n1,2,3,4,5\n")
    with pytest.raises(DataError) as err:
        read_events(tmp_path / "events.csv", "csv", PLAIN)
    assert str(err.value) == (
        f"{tmp_path / 'events.csv'}: missing column 'label' (schema role: label); "
        "found columns: user_id, item_id, timestamp"
    )


def test_parquet_missing_columns(tmp_path: Path) -> None:
    pq.write_table(_events(2).drop_columns(["device", "price"]), tmp_path / "p.parquet")
    with pytest.raises(
        DataError,
        match=r"p\.parquet: missing columns 'device' \(schema role: context\), "
        r"'price' \(schema role: numeric\); found columns: user_id, item_id, timestamp, label, unused",
    ):
        read_events(tmp_path / "p.parquet", "auto", CLICK)


def test_movielens_missing_context_column(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(
        DataError,
        match=r"u\.data: missing column 'device' .*found columns: user_id, item_id, "
        r"rating, timestamp$",
    ):
        read_events(tmp_path / "u.data", "auto", RATING.model_copy(update={"context": ["device"]}))


def test_corrupt_parquet_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 20 + b"PAR1")
    with pytest.raises(DataError, match=r"^cannot read .*bad\.parquet as parquet: ") as err:
        read_events(tmp_path / "bad.parquet", "auto", CLICK)
    assert "\n" not in str(err.value)


def test_wrong_explicit_format_is_named(tmp_path: Path) -> None:
    pq.write_table(_events(1), tmp_path / "e.parquet")
    _write(tmp_path / "e.csv", "user_id,item_id,timestamp,label\n1,2,3,1\n")
    with pytest.raises(
        DataError, match=r"e\.parquet is a parquet file, not csv; use format parquet or auto$"
    ):
        read_events(tmp_path / "e.parquet", "csv", CLICK)
    with pytest.raises(DataError, match=r"e\.csv is not a parquet file"):
        read_events(tmp_path / "e.csv", "parquet", CLICK)
    with pytest.raises(
        DataError, match=r"e\.csv: header user_id,item_id,timestamp,label is not the MovieLens"
    ):
        read_events(tmp_path / "e.csv", "movielens", RATING)


def _quarantined(path: Path, schema: SchemaConfig) -> list[tuple[int, str]]:
    from recforge.data.validate import validate

    q = validate(read_events(path, "auto", schema), schema).quarantine
    return list(zip(q.column("_row").to_pylist(), q.column("_reason").to_pylist(), strict=True))


def test_malformed_rows_are_quarantined_with_their_row_number_not_fatal(tmp_path: Path) -> None:
    # These used to fail the whole file; now each bad row is a quarantined row of nulls.
    _write(tmp_path / "ratings.dat", "1::2::3::4\n1::2::3\n\n5::6::4::7\n")
    table = read_events(tmp_path / "ratings.dat", "auto", RATING)
    assert table.column("_row").to_pylist() == [1, 2, 3]
    assert table.column("_malformed").to_pylist() == [False, True, False]
    assert table.column("user_id").to_pylist() == ["1", None, "5"]
    assert _quarantined(tmp_path / "ratings.dat", RATING) == [(2, "malformed_row")]
    _write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\n5\t6\t4\t8\n")
    assert _quarantined(tmp_path / "u.data", RATING) == [(2, "malformed_row")]
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4,5\n5,6,4,8\n")
    assert _quarantined(tmp_path / "ratings.csv", RATING) == [(2, "malformed_row")]
    _write(tmp_path / "bad.csv", "user_id,item_id,timestamp,label\n1,2,3,1\n1,2\n\n4,5,6,0\n")
    assert read_events(tmp_path / "bad.csv", "csv", PLAIN).column("_row").to_pylist() == [1, 2, 3]
    assert _quarantined(tmp_path / "bad.csv", PLAIN) == [(2, "malformed_row")]


def test_one_ragged_row_among_a_thousand(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from recforge.data.validate import validate

    header = "user_id,item_id,timestamp,label,device,price,a,b\n"
    good = [f"{k},i{k},{1_700_000_000 + k},1,ios,1.5,x,y\n" for k in range(1000)]
    _write(tmp_path / "events.csv", header + "".join(good[:600]) + "7,8,9\n" + "".join(good[600:]))
    with caplog.at_level("WARNING", logger="recforge.data.sources"):
        result = validate(read_events(tmp_path / "events.csv", "auto", CLICK), CLICK)
    assert result.rows_kept == 1000 and result.rows_read == 1001
    assert result.quarantine.column("_row").to_pylist() == [601]  # line 602 of the file
    assert result.quarantine.column("_reason").to_pylist() == ["malformed_row"]
    assert result.report()["by_reason"]["malformed_row"] == 1
    assert result.clean.column("_row").to_pylist() == [*range(1, 601), *range(602, 1002)]
    assert "events.csv: 1 row(s) could not be parsed" in caplog.text
    assert "row 601: expected 8 columns, got 3" in caplog.text


def test_a_50_mb_line_does_not_stop_the_rest_of_the_file(tmp_path: Path) -> None:
    from recforge.data.validate import validate

    huge = "x" * 50_000_000
    lines = [f"{k},i{k},{1_700_000_000 + k},1\n" for k in range(300)]
    text = "".join(lines[:100]) + f"{huge}\n" + "".join(lines[100:200]) + f"9,{huge},1700000000,0\n"
    _write(tmp_path / "events.csv", "user_id,item_id,timestamp,label\n" + text + "".join(lines[200:]))
    result = validate(read_events(tmp_path / "events.csv", "auto", PLAIN), PLAIN)
    assert result.quarantine.column("_row").to_pylist() == [101]
    assert result.quarantine.column("_reason").to_pylist() == ["malformed_row"]
    assert result.rows_kept == 301  # the valid huge row is read too
    assert result.clean.column("_row").to_pylist()[-1] == 302


def test_a_timestamp_beyond_int64_is_quarantined_with_its_row(tmp_path: Path) -> None:
    _write(tmp_path / "t.csv", "user_id,item_id,timestamp,label\n1,2,99999999999999999999999,1\n1,3,1700000000,1\n")
    assert _quarantined(tmp_path / "t.csv", PLAIN) == [(1, "timestamp_out_of_range")]
    pq.write_table(
        pa.table({"user_id": [1, 2], "item_id": [1, 1], "timestamp": pa.array([2**64 - 1, 1], pa.uint64())}),
        tmp_path / "t.parquet",
    )
    assert _quarantined(tmp_path / "t.parquet", IMPLICIT) == [(1, "timestamp_out_of_range")]


def test_partitions_with_and_without_malformed_rows_concatenate(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "user_id,item_id,timestamp,label\n1,2,3,1\n")
    _write(tmp_path / "b.csv", "user_id,item_id,timestamp,label\n1,2\n4,5,6,0\n")
    table = read_events(tmp_path, "auto", PLAIN)
    assert table.column("_malformed").to_pylist() == [False, True, False]
    assert table.column("_row").to_pylist() == [1, 1, 2]


def test_repeated_header_column(tmp_path: Path) -> None:
    _write(tmp_path / "dup.csv", "user_id,item_id,timestamp,label,user_id\n1,2,3,1,9\n")
    with pytest.raises(DataError, match=r"dup\.csv: column\(s\) user_id appear more than once in the header"):
        read_events(tmp_path / "dup.csv", "csv", PLAIN)


MOVIELENS_SMALL = Path("/work/shared/data/ml-latest-small/ratings.csv")


@pytest.mark.skipif(not MOVIELENS_SMALL.is_file(), reason="MovieLens ml-latest-small not present")
def test_real_movielens_small_reads_fully_and_validates_clean() -> None:
    from recforge.data.validate import validate

    with open(MOVIELENS_SMALL, "rb") as handle:
        data_rows = sum(1 for line in handle if line.strip()) - 1
    schema = _schema(LabelConfig(kind="rating", column="rating", threshold=4, min=0.5, max=5))
    table = read_events(MOVIELENS_SMALL, "auto", schema)
    assert table.num_rows == data_rows
    assert table.column("_row").to_pylist()[-1] == data_rows
    result = validate(table, schema)
    assert result.rows_quarantined == 0
    assert result.rows_kept == data_rows
    assert result.clean.schema.field("rating").type == pa.float64()
