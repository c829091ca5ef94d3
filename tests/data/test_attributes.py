"""Attribute tables (data.items, data.users) joined onto events by id: values line up with each event,
an id without a row gets nulls that the report counts, and every way a table can be wrong is an error
that names the file. Prepared data and `predict`'s reading of a raw file see the same joined columns."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.config import Config
from recforge.data.attributes import load_attributes
from recforge.data.batches import SplitData
from recforge.data.schema import DataError
from recforge.data.score_input import read_score_input
from recforge.data.vocab import load_vocabs
from recforge.recipes.prepare import prepare_data
from recforge.storage import read_json


def _log(path, n: int = 3000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp,device"]
    times = np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 20 * 86400, n))
    for t in times:
        lines.append(f"{rng.integers(0, 60)},{rng.integers(0, 40)},{t},{rng.choice(['ios', 'web'])}")
    path.write_text("\n".join(lines) + "\n")


def _config(tmp_path, **data) -> Config:
    return Config.model_validate({
        "seed": 3, "workdir": str(tmp_path / "w"),
        "data": {"source": str(tmp_path / "log.csv"), "format": "csv",
                 "schema": {"label": {"kind": "implicit", "column": None}, "context": ["device", "age"],
                            "item_features": ["genre"], "numeric": []},
                 "negatives": {"per_positive": 1}, **data},
    })


@pytest.fixture
def tables(tmp_path):
    _log(tmp_path / "log.csv")
    # Items 0..34 only (35..39 have no row); ids as integers, as a warehouse export has them.
    pq.write_table(pa.table({"item_id": pa.array(range(35), pa.int64()), "genre": [f"g{i % 4}" for i in range(35)],
                             "length": [float(i) for i in range(35)], "title": [f"t{i}" for i in range(35)]}),
                   tmp_path / "items.parquet")
    (tmp_path / "users.csv").write_text("id,age\n" + "".join(f"{u},a{u // 20}\n" for u in range(60)))
    return tmp_path


def test_events_carry_their_items_and_users_attributes(tables):
    cfg = _config(tables, items={"path": str(tables / "items.parquet")},
                  users={"path": str(tables / "users.csv"), "key": "id"})
    info, result = prepare_data(cfg)
    clean = result.clean
    items = np.asarray(clean.column("item_id").to_pylist(), dtype=int)
    users = np.asarray(clean.column("user_id").to_pylist(), dtype=int)
    genre, age = (clean.column(c).to_pylist() for c in ("genre", "age"))
    for i in range(clean.num_rows):
        if items[i] < 35:
            assert genre[i] == f"g{items[i] % 4}"
        else:
            assert genre[i] is None
        assert age[i] == f"a{users[i] // 20}"
    report = result.report()
    assert report["null_context"]["genre"] == int((items >= 35).sum()) > 0
    assert report["rows_kept"] + report["rows_quarantined"] == report["rows_read"] == 3000
    source = read_json(info.path / "meta.json")["source"]["attributes"]
    assert source["items"]["columns"] == ["genre"] and source["users"]["key"] == "user_id"  # title unused


def test_predict_reads_a_raw_file_with_the_same_attributes(tables):
    cfg = _config(tables, items={"path": str(tables / "items.parquet")},
                  users={"path": str(tables / "users.csv"), "key": "id"})
    info, _ = prepare_data(cfg)
    meta = read_json(info.path / "meta.json")
    rows = read_score_input(tables / "log.csv", "csv", cfg.data.schema_, [], load_vocabs(info.path / "vocab"),
                            meta["numeric"], load_attributes(cfg.data))
    train = SplitData.load(info.path, "train")
    genre = cfg.data.schema_.categorical.index("genre")
    age = cfg.data.schema_.categorical.index("age")
    # The log is sorted by time, so the training split's positives are its first rows, in order.
    positives = train.label.numpy() > 0
    n = int(positives.sum())
    np.testing.assert_array_equal(rows.categorical[:n, genre], train.categorical[positives][:, genre].numpy())
    np.testing.assert_array_equal(rows.categorical[:n, age], train.categorical[positives][:, age].numpy())
    assert (rows.categorical[:, genre] > 0).any() and (rows.categorical[:, genre] == 0).any()


@pytest.mark.parametrize(("setup", "message"), [
    ("repeated", "id '3' has 2 rows in column 'item_id'"),
    ("no id", "row(s) without an id in column 'item_id'"),
    ("no key column", "no id column 'movieId'"),
    ("clash", "log.csv: column(s) ['device'] are in the log and in an attribute table"),
    ("misplaced", "which the schema lists as context; item attributes go in schema.item_features"),
    ("numeric", "which the schema lists as numeric; item attributes go in schema.item_features"),
    ("nothing used", "would add nothing"),
    ("missing file", "no such file"),
    ("corrupt parquet", "cannot read"),
    ("no header", "cannot read"),
])
def test_a_bad_attribute_table_is_an_error_naming_it(tables, setup, message):
    path = tables / "bad.csv"
    rows = "item_id,genre\n" + "".join(f"{i},g{i % 4}\n" for i in range(35))
    items: dict = {"path": str(path)}
    schema = {"label": {"kind": "implicit", "column": None}, "context": ["device"], "item_features": ["genre"]}
    if setup == "repeated":
        rows += "3,g9\n"
    elif setup == "no id":
        rows += ",g1\n"
    elif setup == "no key column":
        items["key"] = "movieId"
    elif setup == "clash":
        rows = "item_id,device\n1,tv\n"
        schema = {**schema, "context": [], "item_features": ["device"]}
    elif setup == "misplaced":
        schema = {**schema, "context": ["device", "genre"], "item_features": []}
    elif setup == "numeric":
        rows = "item_id,length\n1,3.5\n"
        schema = {**schema, "item_features": [], "numeric": ["length"]}
    elif setup == "nothing used":
        rows = "item_id,title\n1,x\n"
    elif setup == "missing file":
        items["path"] = str(tables / "absent.csv")
    elif setup == "corrupt parquet":
        rows = "PAR1 and then nothing a parquet reader can use"
    elif setup == "no header":
        rows = ""
    path.write_text(rows)
    cfg = _config(tables, items=items, schema=schema)
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        prepare_data(cfg)
    if setup != "clash":
        assert items["path"] in str(caught.value)
