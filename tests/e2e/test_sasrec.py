"""SASRec end to end on the sequential world: it finds the transitions popularity and co-occurrence
cannot (full-catalog leave-one-out evaluation), exports, and the server feeds it the user's sequence
from the online state, so a user's recommendations follow what they just clicked."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from _cli import run
from _serve_world import serving

pytestmark = pytest.mark.slow

WORLD = ["data.generate.world=sequential", "data.generate.users=400", "data.generate.items=150",
         "data.generate.events=15000", "data.generate.days=5", "data.generate.categories=6",
         "data.schema.label.kind=implicit", "data.schema.label.column=null", "data.schema.context=[]",
         "data.schema.numeric=[]", "data.schema.item_features=[category]", "data.split.method=leave_last_out",
         "data.history_length=8", "data.history_from=all", "data.negatives.per_positive=1", "train.progress=false",
         "train.batch_size=256"]
SASREC = ["model.name=sasrec", "model.embedding_dim=32", "model.attention_blocks=1", "train.epochs=4",
          "train.lr=0.003", "train.early_stopping_metric=ndcg@10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("sasrec")
    args = [f"workdir={root / 'w'}", *WORLD]
    run("data", "generate", *args, cwd=root)
    run("data", "prepare", *args, cwd=root)
    run("train", *args, *SASREC, f"run_dir={root / 'sasrec'}", cwd=root, timeout=600)
    return root, args


def test_sasrec_beats_popularity_and_cooccurrence_on_the_sequential_world(world):
    root, args = world
    results = json.loads(run("evaluate", "--json", *args, *SASREC, f"run_dir={root / 'sasrec'}", cwd=root).stdout)
    assert set(results) == {"sasrec", "popularity", "cooccurrence"}
    sasrec, popularity, cooc = (results[name]["ndcg@10"] for name in ("sasrec", "popularity", "cooccurrence"))
    assert sasrec > 2 * popularity and sasrec > 1.5 * cooc, results
    assert results["sasrec"]["users"] > 300  # leave-one-out: every user with 3+ events is asked


def test_the_server_hands_sasrec_the_users_sequence_from_the_online_state(world):
    root, args = world
    run("train", *args, "model.name=dnn", "model.hidden=[32]", "train.epochs=1", f"run_dir={root / 'dnn'}", cwd=root)
    registry = root / "registry"
    for name, model in (("sasrec", "retrieval"), ("dnn", "ranker")):
        run("export", "--run", str(root / name), "--out", str(root / "bundles" / name), cwd=root)
        run("registry", "publish", model, str(root / "bundles" / name), "--registry", str(registry), cwd=root)
        run("registry", "promote", model, "1", "--registry", str(registry), cwd=root)
    with serving(registry, root / "events", root / "server.log", "--set", "num_candidates=5") as server, \
            httpx.Client(base_url=server.url, timeout=30.0) as http:
        def top(user: str) -> list:
            body = http.post("/v1/recommend", json={"user_id": user, "k": 5, "exclude_seen": False}).json()
            return [i["item_id"] for i in body["items"]]

        before = top("fresh-user")  # no sequence yet
        answers = []
        for items in ([3, 17, 42], [88, 120, 7]):
            user = f"user-after-{items[0]}"
            events = [{"type": t, "request_id": f"r-{user}-{i}", "user_id": user, "item_id": item, "position": 0}
                      for i, item in enumerate(items) for t in ("impression", "click")]
            assert http.post("/v1/events", json={"events": events}).json()["accepted"] == 6
            answers.append(top(user))
        assert len(before) == 5 and all(len(a) == 5 for a in answers)
        assert answers[0] != answers[1] and before not in answers  # the sequence, not the id, decides
