"""Every model through the real CLI, retrieval over the full catalog, and two-stage recommendations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import SMALL_WORLD, run

pytestmark = pytest.mark.slow

WORLD = [*SMALL_WORLD, "data.history_length=10", "train.epochs=2", "train.patience=5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("zoo")
    run("data", "generate", f"workdir={work}", *WORLD, cwd=work)
    run("data", "prepare", f"workdir={work}", *WORLD, cwd=work)
    return work


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "din"])
def test_ranking_models_train_and_beat_popularity(world, model):
    args = [f"workdir={world}", *WORLD, f"model.name={model}", f"run_dir={world / model}"]
    run("train", *args, cwd=world)
    results = json.loads(run("evaluate", "--json", *args, cwd=world).stdout)
    assert results["model"]["auc"] > results["popularity"]["auc"] + 0.02, results


def test_din_without_histories_says_what_to_do(tmp_path, world):
    args = [f"workdir={tmp_path}", *SMALL_WORLD, "model.name=din"]
    run("data", "generate", *args, cwd=tmp_path)
    run("data", "prepare", *args, cwd=tmp_path)
    proc = run("train", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "data.history_length" in proc.stderr


def test_two_tower_retrieval_and_two_stage_recommend(world):
    tower = [f"workdir={world}", *WORLD, "model.name=two_tower", "model.hidden=[64]", "train.batch_size=512",
             "train.early_stopping_metric=recall@20", f"run_dir={world / 'two_tower'}"]
    trained = run("train", *tower, cwd=world)
    assert "item index: flat" in trained.stderr
    assert "valid_recall@20" in trained.stderr  # early stopping on full-catalog validation recall
    assert (world / "two_tower" / "index" / "index.json").is_file()
    results = json.loads(run("evaluate", "--json", *tower, cwd=world).stdout)
    assert set(results) == {"two_tower", "popularity", "cooccurrence"}
    for metrics in results.values():
        assert 0.0 <= metrics["recall@10"] <= metrics["recall@20"] <= 1.0
        assert metrics["users"] > 50
    warm = json.loads(run("evaluate", "--json", "--users", "warm", *tower, cwd=world).stdout)
    assert 0 < warm["two_tower"]["users"] < results["two_tower"]["users"]  # the world has cold test users
    # early stopping on any cut-off of either retrieval metric, over warm users only
    ndcg = run("train", *tower, "train.early_stopping_metric=ndcg@10", "train.retrieval_users=warm", "train.epochs=1",
               f"run_dir={world / 'two_tower_ndcg'}", cwd=world)
    assert "valid_ndcg@10" in ndcg.stderr and "valid_recall@10" in ndcg.stderr
    # The ranker for stage two.
    run("train", f"workdir={world}", *WORLD, f"run_dir={world / 'dnn'}", cwd=world)
    vocab = json.loads((world / "prepared" / "vocab" / "user_id.json").read_text())
    user = vocab["keys"][0]  # the most active user
    proc = run("recommend", f"workdir={world}", "--user", user, "--user", "no-such-user", "--k", "5",
               "--candidates", "50", "--context", "hour=20", "--json", cwd=world)
    answers = json.loads(proc.stdout)
    assert [a["user"] for a in answers] == [user, "no-such-user"]
    assert answers[0]["known_user"] and not answers[1]["known_user"]
    items = [entry["item"] for entry in answers[0]["items"]]
    assert len(items) == 5 and len(set(items)) == 5
    scores = [entry["ranking_score"] for entry in answers[0]["items"]]
    assert scores == sorted(scores, reverse=True)
    # Items the user already clicked are not recommended again.
    clicked = _clicked_items(world, user)
    assert clicked and not set(items) & clicked
    bad = run("recommend", f"workdir={world}", "--user", user, "--context", "weather=rain", cwd=world, check=False)
    assert bad.returncode == 1 and "unknown context field" in bad.stderr


def _clicked_items(world: Path, user: str) -> set[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(world / "raw" / "events")
    users = table.column("user_id").to_pylist()
    items = table.column("item_id").to_pylist()
    labels = table.column("label").to_pylist()
    return {str(i) for u, i, label in zip(users, items, labels, strict=True) if str(u) == user and label == 1}
