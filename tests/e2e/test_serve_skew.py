"""Training/serving skew, measured end to end: the history a real `recforge serve --state redis://...` reads
for held-out events equals the history the prepared training data holds for the same user and time.

The log is cut at a time T. `recforge features materialize` seeds Redis from the part before T; then the
events after T are replayed against the server in time order, as a client would: at each (user, second) a
recommend request, then the impressions of its answer, then the clicks. Each impression stores what its
request was served with (`served_history`); `recforge events ingest` and `events export --lake` carry it
to the exported log, and it is compared with `data prepare`'s histories of the whole log.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _cli import run
from _redis import RedisServer
from _serve_world import WORLD, start_server

from recforge import registry as reg
from recforge.data.shards import concat_shards, split_shards

pytestmark = pytest.mark.slow
HISTORY = 4


def _prepared_histories(prepared: Path) -> dict[tuple[int, int, int], list[int]]:
    """(user row, item row, timestamp) -> the history rows training holds, over every split; keys that occur
    more than once (an unknown item's row 0 for two items of one second) are left out."""
    user_col, item_col = 0, 1
    layout = json.loads((prepared / "features.json").read_text())["categorical"]
    assert layout[user_col] == "user_id" and layout[item_col] == "item_id", layout
    out: dict[tuple[int, int, int], list[int]] = {}
    seen: Counter[tuple[int, int, int]] = Counter()
    for split in ("train", "valid", "test"):
        cols = concat_shards(split_shards(prepared, split))
        values, offsets = cols["history_values"], cols["history_offsets"]
        for r in range(len(cols["label"])):
            key = (int(cols["categorical"][r, user_col]), int(cols["categorical"][r, item_col]),
                   int(cols["timestamp"][r]))
            seen[key] += 1
            out[key] = [int(v) for v in values[offsets[r]:offsets[r + 1]]]
    return {k: v for k, v in out.items() if seen[k] == 1}


def _rows(vocab_file: Path) -> dict[str, int]:
    return {str(k): i + 1 for i, k in enumerate(json.loads(vocab_file.read_text())["keys"])}


def test_the_history_served_for_held_out_events_equals_the_training_datas(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # history_from=all: the server's online state holds every earlier click, and so must the comparison.
    common = [f"workdir={work}", *WORLD, f"data.history_length={HISTORY}", "data.history_from=all"]
    run("data", "generate", *common, cwd=tmp_path)
    run("data", "prepare", *common, cwd=tmp_path)
    for name, model in (("dnn", "dnn"), ("tt", "two_tower")):
        run("train", *common, f"model.name={model}", f"run_dir={work / name}", cwd=tmp_path, timeout=600)
        run("export", "--run", str(work / name), "--out", str(tmp_path / "bundles" / name), cwd=tmp_path)
    registry = tmp_path / "registry"
    for kind, bundle in (("retrieval", "tt"), ("ranker", "dnn")):
        reg.promote(registry, kind, reg.publish(registry, tmp_path / "bundles" / bundle, kind), reason="first")

    log = ds.dataset(work / "raw" / "events", format="parquet").to_table().sort_by([("timestamp", "ascending")])
    times = log.column("timestamp").to_numpy()
    cut = int(np.quantile(times, 0.8))
    before = tmp_path / "before" / "log.parquet"
    before.parent.mkdir()
    pq.write_table(log.filter(pa.compute.less(log.column("timestamp"), cut)), before)

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    server = start_server(registry, tmp_path / "events", tmp_path / "serve.log", "--state", redis.url,
                          "--poll-interval-s", "0", "--set", "redis_prefix=sk", "--set", "event_max_age_s=1e12",
                          "--set", "event_max_ahead_s=1e12")
    try:
        seeded = run("features", "materialize", "--state", redis.url, "--prefix", "sk", *common,
                     f"data.source={before}", "--json", cwd=tmp_path)
        assert json.loads(seeded.stdout)["users"] > 100, seeded.stdout

        # The held-out events of users the model knows, replayed in time order, one (user, second) at a time.
        prepared_user = _rows(work / "prepared" / "vocab" / "user_id.json")
        after = [r for r in log.filter(pa.compute.greater_equal(log.column("timestamp"), cut)).to_pylist()
                 if str(r["user_id"]) in prepared_user]
        users = sorted({r["user_id"] for r in after})[:40]
        after = [r for r in after if r["user_id"] in set(users)]
        groups: dict[tuple[int, int], list[dict]] = {}
        for r in after:
            groups.setdefault((int(r["timestamp"]), r["user_id"]), []).append(r)
        with server.client() as client:
            for (ts, user), rows in sorted(groups.items()):
                answer = client.post("/v1/recommend", json={"user_id": user, "k": 3}).json()
                assert answer["degraded"] is False, answer
                events = [{"type": "impression", "request_id": answer["request_id"], "user_id": user,
                           "item_id": r["item_id"], "position": i, "timestamp": ts} for i, r in enumerate(rows)]
                events += [{**e, "type": "click"} for e, r in zip(events, rows, strict=True) if r["label"]]
                stored = client.post("/v1/events", json={"events": events})
                assert stored.status_code == 200, stored.text
        lake, exported = tmp_path / "lake", tmp_path / "exported"
        run("events", "ingest", "--state", redis.url, "--prefix", "sk", "--lake", str(lake), cwd=tmp_path)
        run("events", "export", "--lake", str(lake), "--out", str(exported), cwd=tmp_path)
    finally:
        server.stop()
        redis.stop()

    served = ds.dataset(exported, format="parquet").to_table().to_pylist()
    assert len(served) == len(after) and all(r["served_history"] is not None for r in served)
    trained = _prepared_histories(work / "prepared")
    item_row = _rows(work / "prepared" / "vocab" / "item_id.json")
    compared = non_empty = 0
    for r in served:
        key = (prepared_user[str(r["user_id"])], item_row.get(str(r["item_id"]), 0), int(r["timestamp"]))
        if key not in trained:
            continue
        assert [item_row.get(i, 0) for i in r["served_history"]] == trained[key], (r, trained[key])
        compared += 1
        non_empty += bool(trained[key])
    # Most held-out rows are compared, and most of them read a non-empty history (the check has teeth).
    assert compared >= 0.9 * len(served) and non_empty >= 0.5 * compared, (compared, non_empty, len(served))
