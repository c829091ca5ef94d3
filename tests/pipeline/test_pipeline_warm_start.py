"""Warm start: the challenger's embedding rows come from the champion's row of the same raw id."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recforge.bundle import Bundle, VocabTable
from recforge.config import ModelConfig
from recforge.data.vocab import Vocab, save_vocabs
from recforge.features import FeatureLayout
from recforge.models import build_model
from recforge.pipeline.warm_start import warm_start_from_bundle

MODEL = ModelConfig(name="dnn", embedding_dim=4, hidden=[8], dropout=0.0)


def _champion() -> tuple[Bundle, torch.nn.Module]:
    features = FeatureLayout(("user_id", "item_id"), (4, 4), ("position",), ("user", "item"))
    torch.manual_seed(0)
    eager = build_model(features, MODEL).eval()
    bundle = Bundle(path=Path("."), manifest={"kind": "ranker"}, module=torch.jit.script(eager),
                    features={"categorical": list(features.categorical), "cardinalities": [4, 4],
                              "numeric": ["position"], "roles": ["user", "item"]},
                    vocab={"user_id": VocabTable("user_id", ("u1", "u2", "u3"), None),
                           "item_id": VocabTable("item_id", ("a", "b", "c"), None)},
                    config={})
    return bundle, eager


def _challenger(tmp_path: Path) -> tuple[torch.nn.Module, FeatureLayout]:
    # New window: users u3, u9 (unknown to the champion); items c, a, z (z is new), in count order.
    users = Vocab.fit("user_id", pa.array(["u3", "u3", "u9"]))
    items = Vocab.fit("item_id", pa.array(["c", "c", "c", "a", "a", "z"]))
    assert users.keys == ("u3", "u9") and items.keys == ("c", "a", "z")
    save_vocabs({"user_id": users, "item_id": items}, tmp_path / "vocab")
    features = FeatureLayout(("user_id", "item_id"), (3, 4), ("position",), ("user", "item"))
    torch.manual_seed(1)
    return build_model(features, MODEL), features


def test_rows_are_copied_by_raw_id_and_new_ids_keep_their_fresh_rows(tmp_path):
    champion, eager = _champion()
    model, features = _challenger(tmp_path)
    fresh = {name: p.detach().clone() for name, p in model.named_parameters()}
    info = warm_start_from_bundle(model, features, tmp_path, champion)

    table_name = next(n for n in fresh if n.endswith("table.weight"))
    new = dict(model.named_parameters())[table_name].detach()
    old = dict(eager.named_parameters())[table_name].detach()
    # Champion layout: users rows 0..3 (unknown, u1, u2, u3), items rows 4..7 (unknown, a, b, c).
    # Challenger layout: users rows 0..2 (unknown, u3, u9), items rows 3..6 (unknown, c, a, z).
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[3])  # unknown user, u3
    assert torch.equal(new[2], fresh[table_name][2])  # u9: new id, fresh row
    assert torch.equal(new[3], old[4]) and torch.equal(new[4], old[7]) and torch.equal(new[5], old[5])
    assert torch.equal(new[6], fresh[table_name][6])  # z: new id, fresh row
    assert info["embedding_rows_from_champion"] == 5 and info["embedding_rows"] == 7

    # Dense layers have the same shapes: copied exactly.
    for name, param in model.named_parameters():
        if name != table_name:
            assert torch.equal(param.detach(), dict(eager.named_parameters())[name].detach()), name


def test_an_architecture_that_shares_nothing_is_refused(tmp_path):
    champion, _ = _champion()
    _, features = _challenger(tmp_path)
    other = build_model(features, ModelConfig(name="dnn", embedding_dim=6, hidden=[5], dropout=0.0))
    champion.features["categorical"] = ["item_id", "user_id"]  # fields in another order: no table remap
    with pytest.raises(ValueError, match="copied nothing"):
        warm_start_from_bundle(other, features, tmp_path, champion)
