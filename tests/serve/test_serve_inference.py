"""Loading a registry version for serving: environment drift is reported, vocabularies are decoded once."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recforge import bundle
from recforge import registry as reg
from recforge.config import ModelConfig
from recforge.data.vocab import Vocab
from recforge.features import FeatureLayout
from recforge.models import build_model
from recforge.serve.inference import Query, encode_requests, load_model, popular


def _ranker_bundle(out: Path) -> Path:
    vocab_dir = out.parent / "vocab"
    vocab_dir.mkdir(parents=True)
    Vocab.fit("user_id", pa.array(["7", "8", "8"])).save(vocab_dir / "user_id.json")
    Vocab.fit("item_id", pa.array(["10", "11", "11", "x"])).save(vocab_dir / "item_id.json")
    torch.manual_seed(0)
    spec = FeatureLayout(categorical=("user_id", "item_id"), cardinalities=(3, 4), numeric=("position",))
    model = build_model(spec, ModelConfig(embedding_dim=4, hidden=[8]))
    features = {"categorical": ["user_id", "item_id"], "cardinalities": [3, 4], "numeric": ["position"],
                "roles": ["user", "item"]}
    return bundle.write_bundle(model, out, model_name="dnn", features=features, vocab_dir=vocab_dir,
                               config={"data": {"history_length": 0}}, metrics={}, data_fingerprint={},
                               parity_inputs=(torch.tensor([[1, 2], [0, 1]]), torch.zeros(2, 1), None, None))


def test_a_bundle_from_another_environment_is_reported_as_drift(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "env_fingerprint", lambda: {"torch": "1.13.1", "cuda": "11.7"})
    reg.publish(tmp_path / "registry", _ranker_bundle(tmp_path / "b"), "ranker")
    monkeypatch.undo()
    loaded = load_model(tmp_path / "registry", "ranker", 1)
    assert any(line.startswith("torch 1.13.1 recorded") for line in loaded.drift)
    assert any("CUDA build 11.7" in line for line in loaded.drift)


def test_loaded_model_encodes_requests_and_decodes_item_ids(tmp_path: Path) -> None:
    reg.publish(tmp_path / "registry", _ranker_bundle(tmp_path / "b"), "ranker")
    loaded = load_model(tmp_path / "registry", "ranker", 1)
    assert loaded.drift == [] and loaded.user_col == 0 and loaded.item_columns == [1]
    # Vocabulary order is by training count: "11" (twice) first; keys come back as JSON ints where canonical.
    assert list(loaded.item_keys) == [None, 11, 10, "x"]
    requests = encode_requests(loaded, [Query(8, {}, 3, False, (), ()), Query("nobody", {}, 3, False, (), ())])
    assert requests.categorical[:, 0].tolist() == [1, 0] and requests.numeric.tolist() == [[0.0], [0.0]]
    # Without popularity tables, cold start falls back to that count order, seen items left out.
    answer = popular(loaded, Query("nobody", {}, 2, True, ("11",), ()))
    assert answer.cold_start and answer.items == [10, "x"]
