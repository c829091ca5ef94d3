"""`recforge serve` end to end over HTTP: recommend, score, events, limits, auth, metrics, A/B split,
the export -> `recforge data prepare` round trip, and a schemathesis run against the OpenAPI schema."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from _cli import run
from _serve_world import TOKEN, Server, World, serve_world, start_server

from recforge.serve import ab

pytestmark = pytest.mark.slow

EXPERIMENTS = {"experiments": [
    {"name": "ranker_test", "salt": "salt-ranker", "variants": [
        {"name": "control", "weight": 1}, {"name": "treatment", "weight": 1, "ranker": "production"}]},
    {"name": "layout", "salt": "salt-layout", "variants": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]},
]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return serve_world(tmp_path_factory)


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("serve-api")
    experiments = base / "experiments.json"
    experiments.write_text(json.dumps(EXPERIMENTS))
    srv = start_server(world.registry_copy(base / "registry"), base / "events", base / "server.log",
                       "--experiments", str(experiments), "--poll-interval-s", "0",
                       # The events test replays days of 2026-01, and schemathesis sends any timestamp the
                       # schema allows: a bound relative to the server's clock cannot be written in OpenAPI
                       # (tests/serve/test_serve_app.py tests the bounds).
                       "--set", "event_max_age_s=inf", "--set", "event_max_ahead_s=inf")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_recommend_returns_k_ranked_items_with_versions_and_assignments(http: httpx.Client, world: World) -> None:
    user = world.known_users[0]
    r = http.post("/v1/recommend", json={"user_id": user, "context": {"hour": 20, "device": "ios"}, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] is False and body["user_id"] == user
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 7 == len(set(items)) and set(items) <= set(world.items)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert body["model_versions"] == {"retrieval": 1, "ranker": 1}
    assert body["model_version"] == "retrieval:1,ranker:1"
    assert set(body["assignments"]) == {"ranker_test", "layout"} and len(body["request_id"]) == 32
    # Deterministic: the same request gives the same list.
    again = http.post("/v1/recommend", json={"user_id": user, "context": {"hour": 20, "device": "ios"}, "k": 7})
    assert [i["item_id"] for i in again.json()["items"]] == items


def test_unknown_user_gets_a_cold_start_answer_by_context_popularity(http: httpx.Client, world: World) -> None:
    answers = {}
    for hour in (3, 20):
        r = http.post("/v1/recommend", json={"user_id": "never-seen", "context": {"hour": hour}, "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cold_start"] is True
        answers[hour] = [i["item_id"] for i in body["items"]]
        assert len(answers[hour]) == 10 == len(set(answers[hour]))
    assert answers[3] != answers[20], "popularity must depend on the request context"


def test_exclude_seen_drops_items_from_accepted_events(http: httpx.Client, world: World) -> None:
    user = world.known_users[1]
    first = [i["item_id"] for i in http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["items"]]
    events = [{"type": "impression", "request_id": "seen-1", "user_id": user, "item_id": item, "position": p}
              for p, item in enumerate(first)]
    assert http.post("/v1/events", json={"events": events}).json()["accepted"] == 5
    after = [i["item_id"] for i in http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["items"]]
    assert not set(after) & set(first)
    kept = http.post("/v1/recommend", json={"user_id": user, "k": 5, "exclude_seen": False}).json()
    assert [i["item_id"] for i in kept["items"]] == first


def test_score_reports_unknown_items_instead_of_failing(http: httpx.Client, world: World) -> None:
    known = world.items[:3]
    r = http.post("/v1/score", json={"user_id": world.known_users[0], "item_ids": [*known, "no-such-item", 10**12],
                                     "context": {"hour": 8}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["item_id"] for s in body["scores"]] == known
    assert all(0 < s["score"] < 1 for s in body["scores"])
    assert body["unknown_items"] == ["no-such-item", 10**12]


@pytest.mark.parametrize(("path", "payload", "field"), [
    ("/v1/recommend", {"user_id": 1, "k": 101}, ["body", "k"]),
    ("/v1/recommend", {"user_id": 1, "k": 0}, ["body", "k"]),
    ("/v1/recommend", {"k": 3}, ["body", "user_id"]),
    ("/v1/score", {"user_id": 1, "item_ids": list(range(1001))}, ["body", "item_ids"]),
    ("/v1/events", {"events": [{"type": "click", "request_id": "r", "user_id": 1, "item_id": 2, "position": 0},
                               {"type": "click", "request_id": "r", "user_id": 1, "item_id": 2, "position": -1}]},
     ["body", "events", 1, "position"]),
    ("/v1/events", {"events": [{"type": "view", "request_id": "r", "user_id": 1, "item_id": 2, "position": 0}]},
     ["body", "events", 0, "type"]),
])
def test_limits_and_bad_fields_are_422_naming_the_field(http: httpx.Client, path: str, payload: dict,
                                                        field: list) -> None:
    r = http.post(path, json=payload)
    assert r.status_code == 422, r.text
    body = r.json()
    assert any(e["loc"][: len(field)] == field for e in body["detail"])
    assert body["message"].startswith(".".join(map(str, field)))


def test_oversized_body_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/events", content=b'{"events": [' + b" " * (1 << 20) + b"]}",
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


def test_admin_routes_need_the_bearer_token(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.post(f"{server.url}/admin/reload", headers=headers).status_code == 401
        assert httpx.get(f"{server.url}/admin/experiments", headers=headers).status_code == 401
    with server.client(TOKEN) as admin:
        assert admin.get("/admin/experiments").json() == {"experiments": [
            {**e, "variants": [{"ranker": None, "retrieval": None, **v, "weight": float(v["weight"])}
                               for v in e["variants"]]} for e in EXPERIMENTS["experiments"]]}
        reload = admin.post("/admin/reload")
        assert reload.status_code == 200 and reload.json()["changed"] is False
        bad = {"experiments": [{"name": "x", "salt": "s", "variants": [{"name": "v", "weight": 1, "ranker": "99"}]}]}
        r = admin.put("/admin/experiments", json=bad)
        assert r.status_code == 409 and "variant 'v'" in r.json()["detail"] and "no version 99" in r.json()["detail"]
        assert admin.put("/admin/experiments", json=EXPERIMENTS).status_code == 200
    with server.client() as client:
        assert set(client.post("/v1/recommend", json={"user_id": 1, "k": 1}).json()["assignments"]) == {
            "ranker_test", "layout"}


def test_ab_split_is_sticky_and_within_tolerance_over_2000_users(http: httpx.Client) -> None:
    users = [f"ab-user-{i}" for i in range(2000)]
    seen: dict[str, dict[str, str]] = {}
    for user in users:
        r = http.post("/v1/score", json={"user_id": user, "item_ids": []})
        seen[user] = r.json()["assignments"]
    layout = Counter(a["layout"] for a in seen.values())
    ranker = Counter(a["ranker_test"] for a in seen.values())
    n = len(users)
    # 4 standard deviations of a binomial share.
    assert abs(layout["a"] / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    assert abs(ranker["control"] / n - 0.5) < 4 * math.sqrt(0.25 / n)
    # Independent experiments: the layout split is the same within each ranker arm.
    for arm in ("control", "treatment"):
        members = [a for a in seen.values() if a["ranker_test"] == arm]
        share = sum(a["layout"] == "a" for a in members) / len(members)
        assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(members))
    # Sticky, and exactly the pure function of (user, salt).
    experiments = [ab.Experiment(e["name"], e["salt"], tuple(ab.Variant(v["name"], v["weight"])
                                                             for v in e["variants"]))
                   for e in EXPERIMENTS["experiments"]]
    for user in users[:100]:
        again = http.post("/v1/recommend", json={"user_id": user, "k": 1}).json()["assignments"]
        assert again == seen[user] == {name: v.name for name, v in ab.assign_all(user, experiments).items()}


def test_metrics_expose_requests_latency_versions_reloads_and_events(http: httpx.Client, server: Server) -> None:
    http.post("/v1/recommend", json={"user_id": "metrics-user", "k": 2})
    assert http.get("/metrics").status_code == 401  # metrics=admin by default: a scraper sends the token
    with server.client(TOKEN) as admin:
        text = admin.get("/metrics").text
    for series in ('recforge_requests_total{route="recommend"', 'recforge_request_seconds_bucket{le="0.005",'
                   'route="recommend"', 'recforge_model_version{kind="ranker",model="ranker",role="production"} 1.0',
                   'recforge_reloads_total{result="changed"} 1.0', 'recforge_events_accepted_total{type="impression"}',
                   "# TYPE recforge_canary_rollbacks_total counter", "recforge_batch_size_bucket",
                   "recforge_cold_start_total"):
        assert series in text, series


def test_events_export_round_trips_through_data_prepare(http: httpx.Client, server: Server, world: World,
                                                       tmp_path: Path) -> None:
    day = 86_400
    start = 1_767_225_600  # 2026-01-01 00:00 UTC
    accepted = 0
    for d in range(4):
        events = []
        for i in range(150):
            user, item = world.known_users[i % 40], world.items[(i * 7 + d) % len(world.items)]
            rid = f"rt-{d}-{i // 10}"
            common = {"request_id": rid, "user_id": user, "item_id": item, "position": i % 10,
                      "timestamp": start + d * day + i * 60, "context": {"hour": (i // 10) % 24, "device": "ios"},
                      "assignments": {"ranker_test": "control"}, "model_version": "retrieval:1,ranker:1"}
            events.append({"type": "impression", **common})
            if i % 3 == 0:
                events.append({"type": "click", **common})
        r = http.post("/v1/events", json={"events": events})
        assert r.status_code == 200, r.text
        accepted += r.json()["accepted"]
    assert accepted == 4 * 200
    out = tmp_path / "log"
    args = ["events", "export", "--events-dir", str(Path(server.args[server.args.index("--events-dir") + 1])),
            "--out", str(out), "--since", "2026-01-01", "--until", "2026-01-04"]
    report = json.loads(run(*args, cwd=tmp_path).stdout)
    assert report["exported_rows"] == 600 and report["days"] == {f"2026-01-0{d + 1}": 150 for d in range(4)}
    again = json.loads(run(*args, cwd=tmp_path).stdout)
    assert again["exported_rows"] == 600 and sorted(p.name for p in out.glob("*.parquet")) == [
        f"2026-01-0{d + 1}.parquet" for d in range(4)]
    table = pq.read_table(out / "2026-01-02.parquet")
    types = {f.name: str(f.type) for f in table.schema}
    assert types["user_id"] == types["item_id"] == types["timestamp"] == types["hour"] == "int64"
    assert types["category"] == types["position"] == types["label"] == "int64" and types["device"] == "string"
    assert table.column("label").to_pylist().count(1) == 50 and table.num_rows == 150
    assert json.loads(table.column("assignments")[0].as_py()) == {"ranker_test": "control"}
    assert table.column("category").null_count == 0
    work = tmp_path / "retrain"
    proc = run("data", "prepare", f"workdir={work}", f"data.source={out}", cwd=tmp_path)
    assert proc.returncode == 0
    meta = json.loads((work / "prepared" / "meta.json").read_text())
    assert meta["events"] == 600 and meta["positives"]["train"] + meta["positives"]["valid"] + \
        meta["positives"]["test"] == 200


def test_the_schema_and_docs_are_for_the_admin_token_by_default(http: httpx.Client, server: Server) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert http.get(path).status_code == 401, path
    with server.client(TOKEN) as admin:
        assert "/admin/experiments" in admin.get("/openapi.json").json()["paths"]
    assert http.get("/readyz").json() == {"status": "ready"}  # no versions without the token


def test_schemathesis_finds_no_server_errors_or_schema_violations(server: Server, tmp_path: Path) -> None:
    """Last in this module: it PUTs random (valid) experiments."""
    st = Path(__import__("sys").executable).with_name("st")
    proc = subprocess.run(
        [str(st), "run", f"{server.url}/openapi.json", "--max-examples", "10", "--generation-deterministic",
         "--no-shrink", "--phases", "examples,coverage,fuzzing", "-H", f"Authorization: Bearer {TOKEN}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
         "response_schema_conformance,negative_data_rejection,positive_data_acceptance", "--no-color"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    tail = "\n".join(line[:300] for line in proc.stdout.splitlines()[-60:])
    assert proc.returncode == 0, tail
    assert "No issues found" in proc.stdout, tail


def test_impressions_store_what_their_request_was_served_with(http: httpx.Client, server: Server, world: World,
                                                              tmp_path: Path) -> None:
    user = world.known_users[3]
    answer = http.post("/v1/recommend", json={"user_id": user, "k": 3}).json()
    ts = 1_769_904_000  # 2026-02-01 00:00 UTC
    events = [{"type": "impression", "request_id": rid, "user_id": user, "item_id": item["item_id"], "position": i,
               "timestamp": ts + i} for i, (rid, item) in enumerate(
                   [(answer["request_id"], item) for item in answer["items"]] + [("never-served", answer["items"][0])])]
    assert http.post("/v1/events", json={"events": events}).status_code == 200
    out = tmp_path / "log"
    run("events", "export", "--events-dir", str(Path(server.args[server.args.index("--events-dir") + 1])),
        "--out", str(out), "--since", "2026-02-01", "--until", "2026-02-01", cwd=tmp_path)
    # These models read no history: what was served is an empty one, recorded; the unknown request has no record.
    assert pq.read_table(out / "2026-02-01.parquet").column("served_history").to_pylist() == [[], [], [], None]
