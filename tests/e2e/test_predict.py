"""`recforge predict` through the real CLI: a file's rows scored in place (the same scores `evaluate`
computes on the same events), rows that cannot be scored kept with their reason, and exact top-K lists
over the whole catalog that never repeat what the user clicked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _cli import SMALL_WORLD, run

from recforge.data.batches import SplitData
from recforge.data.shards import concat_shards, split_shards
from recforge.data.vocab import load_vocabs
from recforge.evaluate import predict_logits
from recforge.metrics import auc
from recforge.recipes.runs import load_trained_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("predict")
    args = [f"workdir={root / 'w'}", *SMALL_WORLD, "data.generate.events=40000", "train.epochs=2",
            "data.history_length=5"]
    run("data", "generate", *args, cwd=root)
    run("data", "prepare", *args, cwd=root)
    for model in ("din", "two_tower"):
        run("train", *args, f"model.name={model}", f"run_dir={root / model}", cwd=root)
    return root, args


def _events(root: Path) -> pa.Table:
    return pq.ParquetDataset(root / "w" / "raw" / "events").read()


def test_scores_line_up_with_the_input_and_match_evaluate(world):
    root, args = world
    run_args = [*args, "model.name=din", f"run_dir={root / 'din'}"]
    out = root / "scores.parquet"
    report = json.loads(run("predict", "scores", "--input", str(root / "w" / "raw" / "events"), "--out", str(out),
                            "--keep", "label", "--json", *run_args, cwd=root).stdout)
    events = _events(root)
    assert report["rows"] == events.num_rows == report["scored"]
    scores = pq.read_table(out)
    assert scores.column("user_id").to_pylist() == events.column("user_id").to_pylist()  # as read, in order
    assert scores.column("_row").to_pylist()[:3] == [1, 2, 3]
    # The test split's events scored from the raw file get the logits the prepared test split gets (the
    # same encoding and the same leak-free histories) wherever the user is known to the vocabulary; a
    # user it does not know has no history here (their earlier clicks carry no id in the prepared data).
    meta = json.loads((root / "w" / "prepared" / "meta.json").read_text())
    test_rows = np.asarray(events.column("timestamp").to_numpy()) >= meta["split"]["test"]["time_min"]
    assert int(test_rows.sum()) == meta["split"]["test"]["rows"]
    test = SplitData.load(root / "w" / "prepared", "test")
    expected = predict_logits(load_trained_model(root / "din"), test)
    known = test.categorical[:, 0].numpy() > 0
    got = scores.column("logit").to_numpy()[test_rows]
    np.testing.assert_allclose(got[known], expected[known], rtol=1e-5, atol=1e-6)
    assert known.mean() > 0.5
    labels = np.asarray(scores.column("label").to_pylist(), dtype=np.float64)[test_rows]
    evaluated = json.loads(run("evaluate", "--json", *run_args, cwd=root).stdout)["model"]["auc"]
    assert auc(labels, got) == pytest.approx(evaluated, abs=0.01)


def test_rows_that_cannot_be_scored_keep_their_place_and_reason(world):
    root, args = world
    events = _events(root).slice(0, 50).to_pylist()
    lines = ["user_id,item_id,timestamp,hour,device,category,position,label"]
    lines += [",".join(str(e[c]) for c in ("user_id", "item_id", "timestamp", "hour", "device", "category",
                                           "position", "label")) for e in events]
    lines[4] = lines[4].replace(str(events[3]["user_id"]), "", 1)  # missing user
    lines[9] = ",".join([*lines[9].split(",")[:6], "high", "0"])  # bad numeric
    (root / "bad.csv").write_text("\n".join(lines) + "\n")
    out = root / "bad.parquet"
    report = json.loads(run("predict", "scores", "--input", str(root / "bad.csv"), "--out", str(out), "--json",
                            *args, "model.name=din", f"run_dir={root / 'din'}", cwd=root).stdout)
    assert report["rows"] == 50 and report["scored"] == 48
    assert report["not_scored"] == {"missing_user": 1, "bad_numeric": 1}
    scores = pq.read_table(out)
    assert scores.column("_reason").to_pylist()[3] == "missing_user" and scores.column("score")[3].as_py() is None
    assert scores.column("_reason").to_pylist()[8] == "bad_numeric" and scores.column("_row").to_pylist()[8] == 9
    assert scores.column("score").null_count == 2

    refused = run("predict", "scores", "--input", str(root / "bad.csv"), "--out", str(root / "x.parquet"),
                  "--keep", "nope", *args, f"run_dir={root / 'din'}", cwd=root, check=False)
    assert refused.returncode == 1 and "nope" in refused.stderr and not (root / "x.parquet").exists()


@pytest.mark.parametrize("model", ["din", "two_tower"])
def test_top_k_ranks_the_whole_catalog_without_seen_items(world, model):
    root, args = world
    events = _events(root)
    users = [str(u) for u in sorted(set(events.column("user_id").to_pylist()))[:6]] + ["never-seen"]
    out = root / f"top-{model}.parquet"
    result = json.loads(run("predict", "topk", *[a for u in users for a in ("--user", u)], "--k", "15", "--out",
                            str(out), "--json", *args, f"model.name={model}", f"run_dir={root / model}",
                            cwd=root).stdout)
    assert result["users"] == 7 and result["known_users"] == 6
    top = pq.read_table(out).to_pylist()
    assert len(top) == 7 * 15
    prepared = root / "w" / "prepared"
    vocabs = load_vocabs(prepared / "vocab")
    clicked: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        columns = concat_shards(split_shards(prepared, split))
        for u, i, label in zip(vocabs["user_id"].decode(columns["categorical"][:, 0]),
                               vocabs["item_id"].decode(columns["categorical"][:, 1]), columns["label"], strict=True):
            if label > 0:
                clicked.setdefault(u, set()).add(i)
    for user in users:
        rows = [r for r in top if r["user"] == user]
        assert [r["rank"] for r in rows] == list(range(1, 16))
        assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:], strict=False))
        assert not {r["item"] for r in rows} & clicked.get(user, set())
        assert len({r["item"] for r in rows}) == 15
