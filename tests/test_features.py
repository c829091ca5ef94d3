"""The feature layout: one class that prepare writes, runs copy, bundles carry and the server reads,
and that still reads every older file it replaced (features.json without a version or roles, a
prepared directory with only meta.json, a schema-1 bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recforge import bundle
from recforge.config import NegativesConfig, SchemaConfig, SplitConfig, VocabConfig
from recforge.data.prepare import PrepareOptions, prepare
from recforge.data.validate import validate
from recforge.features import FEATURES_FILE, LAYOUT_VERSION, FeatureLayout, row_keys, vocab_remap

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = FeatureLayout(("user_id", "item_id", "device", "category"), (4, 6, 3, 5), ("position",),
                       ("user", "item", "context", "item_feature"))


def test_a_layout_round_trips_through_its_file_with_a_version(tmp_path: Path):
    LAYOUT.save(tmp_path / FEATURES_FILE)
    written = json.loads((tmp_path / FEATURES_FILE).read_text())
    assert written["layout_version"] == LAYOUT_VERSION
    assert FeatureLayout.load(tmp_path / FEATURES_FILE) == LAYOUT
    assert FeatureLayout.load(tmp_path) == LAYOUT  # a run or bundle directory


def test_columns_by_role():
    assert LAYOUT.item_column == 1 and LAYOUT.column("user") == 0
    assert LAYOUT.item_columns == [1, 3]
    assert LAYOUT.columns("context") == [2]
    assert LAYOUT.field_name("item") == "item_id"
    with pytest.raises(ValueError, match="no item_feature field"):
        FeatureLayout(("u", "i"), (2, 2), (), ("user", "item")).column("item_feature")


def test_old_features_json_without_version_or_roles_still_loads(tmp_path: Path):
    (tmp_path / FEATURES_FILE).write_text(json.dumps({"categorical": ["u", "i", "hour"], "cardinalities": [3, 4, 24],
                                                      "numeric": []}))
    layout = FeatureLayout.load(tmp_path / FEATURES_FILE)
    assert layout.roles == () and layout.field_roles == ("user", "item", "context")
    assert layout.item_column == 1


def test_an_old_prepared_directory_is_read_from_its_meta(tmp_path: Path):
    meta = {"fields": [{"name": "user_id", "cardinality": 4, "role": "user", "hashed": False},
                       {"name": "item_id", "cardinality": 6, "role": "item", "hashed": False}],
            "numeric": [{"name": "position", "mean": 1.0, "std": 2.0}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert FeatureLayout.load(tmp_path) == FeatureLayout(("user_id", "item_id"), (4, 6), ("position",),
                                                         ("user", "item"))


def test_the_schema1_bundle_fixture_reads_its_layout():
    loaded = bundle.load_bundle(FIXTURES / "bundle_schema1")
    assert loaded.layout == FeatureLayout(("user_id", "item_id", "device"), (4, 5, 3), ("position",),
                                          ("user", "item", "context"))


def test_a_newer_or_broken_layout_is_refused_naming_the_file(tmp_path: Path):
    path = tmp_path / FEATURES_FILE
    path.write_text(json.dumps({**LAYOUT.to_dict(), "layout_version": LAYOUT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"{FEATURES_FILE}: feature layout version {LAYOUT_VERSION + 1}"):
        FeatureLayout.load(path)
    path.write_text(json.dumps({"categorical": ["u", "i"], "numeric": []}))
    with pytest.raises(ValueError, match="missing cardinalities"):
        FeatureLayout.load(path)
    with pytest.raises(ValueError, match="2 categorical fields but 1 cardinalities"):
        FeatureLayout(("u", "i"), (3,), ())
    with pytest.raises(ValueError, match="unknown role"):
        FeatureLayout(("u", "i"), (3, 3), (), ("user", "product"))


def test_vocab_remap_carries_rows_by_raw_key():
    source = row_keys(("b", "c", "z"), 4)  # rows: 0 unknown, 1 b, 2 c, 3 z
    target = {"a": 1, "c": 2, "b": 3}
    mapping = vocab_remap(source, lambda keys: [0 if k is None else target.get(k, 0) for k in keys])
    assert mapping.tolist() == [0, 3, 2, 0]
    assert row_keys(None, 3) == [None, None, None]  # a hashed vocabulary has no keys to carry


def test_prepare_writes_the_layout_its_meta_describes(tmp_path: Path):
    schema = SchemaConfig(context=["device"], item_features=["category"], numeric=["position"])
    rng = np.random.default_rng(0)
    n = 400
    items = rng.integers(0, 20, n)
    table = pa.table({"user_id": rng.integers(0, 30, n), "item_id": items,
                      "timestamp": np.sort(rng.integers(1_700_000_000, 1_700_000_000 + 5 * 86400, n)),
                      "device": rng.choice(["ios", "web"], n), "category": items % 3,
                      "position": rng.integers(0, 5, n), "label": rng.integers(0, 2, n)})
    info = prepare(validate(table, schema).clean, schema, SplitConfig(), VocabConfig(), NegativesConfig(),
                   tmp_path / "prepared", PrepareOptions(seed=1, history_length=7))
    written = FeatureLayout.load(info.path / FEATURES_FILE)
    assert written == FeatureLayout.from_prepared_meta(info.meta)
    assert set(written.field_roles) == {"user", "item", "context", "item_feature"}
    assert written.numeric == ("position",)
    assert written.history_length == 7  # models, runs and the server read the history length from here


def test_history_length_is_recorded_but_not_part_of_the_identity(tmp_path: Path):
    """Layouts written before it was recorded read as 0, and a run's resume digest does not change with it."""
    with_history = FeatureLayout(LAYOUT.categorical, LAYOUT.cardinalities, LAYOUT.numeric, LAYOUT.roles, 20)
    with_history.save(tmp_path / FEATURES_FILE)
    assert FeatureLayout.load(tmp_path).history_length == 20
    old = {key: value for key, value in with_history.to_dict().items() if key != "history_length"}
    assert FeatureLayout.from_dict(old).history_length == 0
    assert with_history.identity() == LAYOUT.identity()
