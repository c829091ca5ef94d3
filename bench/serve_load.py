"""The inference service under real load on loopback: `recforge serve` over a 100k-item catalog.

Two routes, each driven by a load generator (wrk) in its own process:
  recommend   POST /v1/recommend: retrieve 200 candidates (FAISS), rank them (DNN), return 10.
  score       POST /v1/score: the ranker's scores for 500 given items.

For each route:
  closed      closed loop (every connection sends its next request when the last one is answered)
              at concurrency 1, 8 and 32: saturation throughput, p50, p99, errors.
  paced_400   a fixed offered rate of 400 req/s over 32 connections (what `hey -c 32 -q 12.5`
              offers): each wrk thread hands out send slots on a fixed schedule to its free
              connections (wrk2-style pacing in the Lua script). wrk times a request from its send,
              so requests sent late because every connection was still busy are counted apart
              (late_sends, late_max_ms): when they are 0 the latencies are those of a true fixed rate.
  in_process  the same work without HTTP: the server's own Service and model code (routing, the
              per-user memory, one model call per request, one thread) called in a loop in a fresh
              process: the limit the service is measured against (overhead = closed c=1 p50 minus
              this p50).
  index       recall@200 / @10 of the HNSW and IVF item indexes against exact search on real user
              vectors, and their search times (the three are published as registry aliases hnsw,
              flat, ivf; --index picks the one served).

Requests cycle through 10,000 known user ids with varying contexts (and, for score, random item
sets), so no cache could fake the result. wrk and the server share the machine's cores: that is
the setup the targets assume. The 1-minute load average is recorded around every run, and so is the
CPU time the server (all its processes) and wrk spent per request, because other work on the
machine shows up as latency here.

Why not hey for the paced run: it sends one fixed body file for every request, which would make
every request the same user; wrk's Lua script varies the body per request.

The registry (two_tower retrieval + dnn ranker trained one epoch on a synthetic world of 100k
items) is built once through the real CLI and cached under .bench/serve_registry (--rebuild
builds it again). The server runs with --workers 2 (one per core) unless --workers says otherwise.

    apt-get install -y wrk                                    # the load generator (root)
    .venv/bin/python bench/serve_load.py                      # table
    .venv/bin/python bench/serve_load.py --json               # one JSON object
    .venv/bin/python bench/serve_load.py --routes recommend --concurrency 32 --duration 5 --workers 1
    .venv/bin/python bench/serve_load.py --state local,redis --routes recommend   # the shared state beside local

With --state redis the server runs `--state redis://...` against a redis-server started here on loopback
(appendonly yes, appendfsync always: the no-loss setting), so every request reads the user's state from
Redis and every event is fsynced there before its 200. Several states are measured one after the other
in one sitting, and the redis/local ratios are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recforge.runtime import free_port

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench" / "serve_registry"
WORLD = ["data.generate.users=20000", "data.generate.items=100000", "data.generate.events=1500000",
         "data.generate.days=14", "train.epochs=1", "train.batch_size=4096", "train.progress=false"]
USERS = 10_000
SCORE_ITEMS = 500
K = 10
CANDIDATES = 200
HOURS = 24
DEVICES = ("ios", "android", "web")
ROUTES = ("recommend", "score")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _recforge() -> list[str]:
    script = Path(sys.executable).with_name("recforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]


def _cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "RECFORGE_DEBUG": ""}
    proc = subprocess.run([*_recforge(), *args], cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"recforge {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# The catalog: a registry with a 100k-item retrieval model and a ranker, built once.


def build_registry(target: Path) -> None:
    """generate -> prepare -> train dnn and two_tower -> export -> publish -> promote, into `target`.

    The retrieval model is published three times, identical but for its item index: v1 as training
    built it (kind "auto": HNSW at this size), v2 exact (flat), v3 IVF; the aliases "hnsw", "flat" and
    "ivf" name them (with ranker v1), "production" is v1. Steps leave a marker when done, so an
    interrupted build resumes; the registry is renamed into place last, so a half-built one is never
    taken for the cache."""
    work = target.parent / (target.name + ".building")
    work.mkdir(parents=True, exist_ok=True)
    common = [f"workdir={work / 'data'}", *WORLD]
    steps: list[tuple[str, list[str]]] = [
        ("data generate", ["data", "generate", *common]),
        ("data prepare", ["data", "prepare", *common]),
        ("train dnn", ["train", *common, f"run_dir={work / 'dnn'}"]),
        ("train two_tower", ["train", *common, "model.name=two_tower", f"run_dir={work / 'tt'}"]),
    ]
    for name, args in steps:
        marker = work / f".done-{name.replace(' ', '-')}"
        if marker.is_file():
            continue
        for stale in (work / "dnn", work / "tt"):  # a run cut off mid-way: `recforge train` refuses to overwrite it
            if f"run_dir={stale}" in args:
                shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        _cli(*args, cwd=work)
        marker.touch()
        _say(f"build: {name} ({time.perf_counter() - started:.0f}s)")
    for kind in ("flat", "ivf"):
        _reindex(work / "tt", work / f"tt_{kind}", kind)
    bundles = work / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    for run in ("dnn", "tt", "tt_flat", "tt_ivf"):
        _cli("export", "--run", str(work / run), "--out", str(bundles / run), cwd=work)
    registry = work / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    for model, bundle in (("ranker", "dnn"), ("retrieval", "tt"), ("retrieval", "tt_flat"), ("retrieval", "tt_ivf")):
        _cli("registry", "publish", model, str(bundles / bundle), "--registry", str(registry), cwd=work)
    aliases = {"production": 1, "hnsw": 1, "flat": 2, "ivf": 3}
    for alias, version in aliases.items():
        for model, number in (("retrieval", version), ("ranker", 1)):
            _cli("registry", "promote", model, str(number), "--registry", str(registry), "--alias", alias,
                 "--reason", "serve_load bench", cwd=work)
    users = [json.loads((bundles / b / "vocab" / "user_id.json").read_text())["keys"] for b in ("dnn", "tt")]
    known = sorted(set(users[0]) & set(users[1]), key=int)
    items = json.loads((bundles / "tt" / "vocab" / "item_id.json").read_text())["keys"]
    indexes = {}
    for alias, bundle in (("hnsw", "tt"), ("flat", "tt_flat"), ("ivf", "tt_ivf")):
        meta = json.loads((bundles / bundle / "index" / "index.json").read_text())
        indexes[alias] = {k: meta[k] for k in ("kind", "count", "params", "build_recall")}
    (registry / "world.json").write_text(json.dumps({
        "known_users": [int(u) for u in known], "items": [int(i) for i in items], "world": WORLD,
        "indexes": indexes}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(registry, target)
    shutil.rmtree(work, ignore_errors=True)


def _reindex(run: Path, out: Path, kind: str) -> None:
    """A copy of a trained two-tower run whose item index is rebuilt as `kind` from the same item vectors."""
    from recforge.index import ItemIndex

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoint*", "*.ckpt"))
    built = ItemIndex.load(run / "index")
    vectors = built.index.reconstruct_n(0, built.count)
    shutil.rmtree(out / "index")
    ItemIndex.build(vectors, kind=kind, metric=built.metric).save(out / "index")  # type: ignore[arg-type]


def ensure_registry(rebuild: bool) -> dict[str, Any]:
    if rebuild or not (CACHE / "world.json").is_file():
        _say(f"building the 100k-item registry under {CACHE} (once; later runs reuse it)")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        build_registry(CACHE)
    return json.loads((CACHE / "world.json").read_text())


# --------------------------------------------------------------------------------------------
# Requests: the same bodies for wrk and for the in-process limit.

# Every wrk thread builds its bodies in Lua from the data file (user ids, item ids), so bodies vary per
# request at no cost to the server. With a positive interval the thread paces its connections
# wrk2-style: request slots are due every `interval` microseconds on one schedule per thread, a free
# connection waits for the next slot, and a connection that frees up after its slot was due sends at
# once; how late such sends were is counted, since wrk times a request from its send.
LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } rf_timespec;
int clock_gettime(int clk_id, rf_timespec *tp);
]]
local ts = ffi.new("rf_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local users, items, devices = {}, {}, {"android", "ios", "web", "tablet"}
local route, interval, nth, next_due, score_items = "recommend", 0, 0, nil, 500
late, late_max = 0, 0  -- globals: done() reads them with thread:get

function init(args)
  route, interval = args[2], tonumber(args[3])
  score_items = tonumber(args[4])
  local section = nil
  for line in io.lines(args[1]) do
    if line == "users" or line == "items" then section = line
    elseif section == "users" then users[#users + 1] = line
    else items[#items + 1] = line end
  end
  math.randomseed(1000 + tid)
  nth = tid * 7919
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function delay()
  if interval <= 0 then return 0 end
  local now = now_us()
  if next_due == nil then next_due = now + math.random() * interval end
  local due = next_due
  next_due = next_due + interval
  if due <= now then
    local behind = now - due
    if behind > 1000 then late = late + 1 end
    if behind > late_max then late_max = behind end
    return 0
  end
  return math.floor((due - now) / 1000)
end

function request()
  nth = nth + 1
  local user = users[(nth % #users) + 1]
  local context = '{"hour":' .. (nth % 24) .. ',"device":"' .. devices[(nth % 4) + 1] .. '"}'
  local body
  if route == "recommend" then
    wrk.path = "/v1/recommend"
    body = '{"user_id":' .. user .. ',"context":' .. context .. ',"k":10}'
  else
    wrk.path = "/v1/score"
    local picked = {}
    for i = 1, score_items do picked[i] = items[math.random(#items)] end
    body = '{"user_id":' .. user .. ',"context":' .. context .. ',"item_ids":[' .. table.concat(picked, ",") .. ']}'
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local late_total, late_worst = 0, 0
  for _, thread in ipairs(threads) do
    late_total = late_total + (thread:get("late") or 0)
    late_worst = math.max(late_worst, thread:get("late_max") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"late_sends":%d,"late_max_us":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout, late_total, late_worst))
end
"""


def write_request_data(world: dict[str, Any], path: Path) -> None:
    """The users (10k known ids, shuffled with a fixed seed) and the item ids the Lua script draws from."""
    rng = random.Random(20261128)
    users = list(world["known_users"])
    rng.shuffle(users)
    lines = ["users", *map(str, users[:USERS]), "items", *map(str, world["items"])]
    path.write_text("\n".join(lines) + "\n")


def tools() -> dict[str, str]:
    """The load generator must be installed; the bench installs nothing itself."""
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed: run `apt-get install -y wrk` (as root), then rerun")
    version = subprocess.run([found, "-v"], capture_output=True, text=True, check=False)
    first = (version.stdout + version.stderr).strip().splitlines()[0]
    return {"wrk": found, "wrk_version": first.split(" Copyright")[0]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (the server and its workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, route: str, connections: int, duration: float, interval_us: float, data: Path,
            script: Path, server_pgid: int) -> dict[str, Any]:
    """One wrk run: closed loop when interval_us is 0, else each of its threads paced (see LUA)."""
    threads = min(2, connections)
    # Pacing is per wrk thread: each thread offers its share of the rate.
    per_thread_interval = interval_us * threads
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--timeout", "5s",
           "-s", str(script), url, "--", str(data), route, f"{per_thread_interval:.3f}", str(SCORE_ITEMS)]
    load_start = loadavg()[0]
    cpu_server, cpu_children = group_cpu_s(server_pgid), _children_cpu_s()
    cpu_redis = [group_cpu_s(pgid) for pgid in REDIS_PGIDS]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 60)
    cpu_server, cpu_children = group_cpu_s(server_pgid) - cpu_server, _children_cpu_s() - cpu_children
    cpu_redis = [group_cpu_s(pgid) - before for pgid, before in zip(REDIS_PGIDS, cpu_redis, strict=True)]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    raw = json.loads(line[len("RESULT "):])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {"rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": round(raw["p50_us"] / 1000, 3), "p99_ms": round(raw["p99_us"] / 1000, 3),
            "errors": errors, "requests": raw["requests"], "p90_ms": round(raw["p90_us"] / 1000, 3),
            "max_ms": round(raw["max_us"] / 1000, 3), "error_kinds": {k: raw[k] for k in (
                "connect", "read", "write", "status", "timeout") if raw[k]},
            "connections": connections, "threads": threads, "duration_s": duration,
            "late_sends": raw["late_sends"], "late_max_ms": round(raw["late_max_us"] / 1000, 3),
            # CPU per answered request: the server's (all its processes) and the load generator's.
            "server_cpu_ms_per_req": round(cpu_server * 1e3 / max(1, raw["requests"]), 3),
            "wrk_cpu_ms_per_req": round(cpu_children * 1e3 / max(1, raw["requests"]), 3),
            **({"redis_cpu_ms_per_req": round(sum(cpu_redis) * 1e3 / max(1, raw["requests"]), 3)} if cpu_redis else {}),
            "loadavg_1m_start": load_start, "loadavg_1m_end": loadavg()[0]}


# --------------------------------------------------------------------------------------------
# The limit: the server's own model work, called in-process in a fresh interpreter.


def in_process_worker(route: str, duration: float, data: Path, result: Path, registry: Path, alias: str) -> None:
    """Sequential calls of exactly what one request costs the server behind HTTP: routing, the per-user
    memory lookup, and the model call (recommend: user tower + FAISS + ranker; score: ranker on 500 items)."""
    import faiss
    import torch

    from recforge.serve.inference import Query, recommend_batch, score_items
    from recforge.serve.service import Service
    from recforge.serve.settings import ServeSettings

    torch.set_num_threads(1)  # as the server does (serve/lifecycle.py, serve/inference.py)
    faiss.omp_set_num_threads(1)
    lines = data.read_text().split("\n")
    split = lines.index("items")
    users, items = [int(u) for u in lines[1:split]], [int(i) for i in lines[split + 1:] if i]
    rng = random.Random(1000)
    # Item sets drawn before timing: the in-process limit is the server's work, not building requests.
    item_sets = [[items[rng.randrange(len(items))] for _ in range(SCORE_ITEMS)] for _ in range(64)]
    with tempfile.TemporaryDirectory() as events:
        settings = ServeSettings.load({"registry": str(registry), "events_dir": events, "poll_interval_s": 0,
                                       "alias": alias})
        svc = Service(settings)
        svc.loader.reload()
        snapshot = svc.loader.ready()
        loop = asyncio.new_event_loop()  # the user state is read with await, as a request reads it

        def call(n: int) -> None:
            user = users[n % len(users)]
            context = {"hour": n % HOURS, "device": DEVICES[n % len(DEVICES)]}
            routed = svc.route(snapshot, user)
            seen, clicked = loop.run_until_complete(svc.online.users.get(user))
            if route == "recommend":
                query = Query(user, context, K, True, seen, clicked)
                retrieval = snapshot.model("retrieval", routed.retrieval)
                ranker = snapshot.model("ranker", routed.ranker)
                recommend_batch(retrieval, ranker, snapshot.pairs[(routed.retrieval, routed.ranker)], [query],
                                settings.num_candidates)
            else:
                query = Query(user, context, 1, False, seen, clicked)
                score_items(snapshot.model("ranker", routed.ranker), snapshot.scoring[routed.ranker], query,
                            item_sets[n % len(item_sets)])

        for n in range(100):  # warm-up: TorchScript's first calls, caches
            call(n)
        times = []
        cpu_started = time.process_time()
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < duration:
            t0 = time.perf_counter()
            call(n)
            times.append(time.perf_counter() - t0)
            n += 1
        total = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        svc.close()
    times.sort()
    result.write_text(json.dumps({"rps": round(len(times) / total, 1), "p50_ms": round(_pct(times, 50) * 1e3, 3),
                                  "p99_ms": round(_pct(times, 99) * 1e3, 3), "errors": 0, "requests": len(times),
                                  "server_cpu_ms_per_req": round(cpu * 1e3 / len(times), 3)}))


def index_worker(data: Path, result: Path, registry: Path) -> None:
    """Recall@200 (the candidates the ranker sees) and @10 of each approximate index against the exact one,
    on real user vectors (the retrieval model's user tower on the bench's requests), and the search time
    of one query (what a lone request pays) and of a batch of 32 (what a micro-batch pays per request)."""
    import faiss
    import numpy as np
    import torch

    from recforge.serve.inference import Query, encode_requests, load_model

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    lines = data.read_text().split("\n")
    users = [int(u) for u in lines[1:lines.index("items")]][:2000]
    indexes = {}
    vectors = None
    for alias, version in (("flat", 2), ("hnsw", 1), ("ivf", 3)):
        model = load_model(registry, "retrieval", version)
        indexes[alias] = model.bundle.index
        if vectors is None:
            queries = [Query(u, {"hour": n % HOURS, "device": DEVICES[n % len(DEVICES)]}, K, False, (), ())
                       for n, u in enumerate(users)]
            r = encode_requests(model, queries)
            with torch.no_grad():
                vectors = model.bundle.module.user_vector(r.categorical, r.numeric, r.history_values,
                                                          r.history_offsets).float().numpy()
    assert vectors is not None
    exact = indexes["flat"].search(vectors, CANDIDATES)[1]
    out: dict[str, Any] = {}
    for alias, index in indexes.items():
        found = index.search(vectors, CANDIDATES)[1]
        recall = {}
        for k in (CANDIDATES, K):
            recall[f"recall@{k}"] = round(float(np.mean([len(set(a[:k]) & set(b[:k])) / k
                                                         for a, b in zip(found, exact, strict=True)])), 4)
        one = []
        for row in vectors[:300]:
            t0 = time.perf_counter()
            index.search(row[None, :], CANDIDATES)
            one.append(time.perf_counter() - t0)
        batch = []
        for start in range(0, 640, 32):
            t0 = time.perf_counter()
            index.search(vectors[start:start + 32], CANDIDATES)
            batch.append((time.perf_counter() - t0) / 32)
        one.sort()
        batch.sort()
        out[alias] = {"kind": index.kind, "params": index.params, **recall,
                      "search_ms_batch1_p50": round(_pct(one, 50) * 1e3, 3),
                      "search_ms_per_query_batch32_p50": round(_pct(batch, 50) * 1e3, 3)}
    result.write_text(json.dumps(out))


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_index_study(data: Path, registry: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = Path(handle.name)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "index", "--data", str(data),
               "--result", str(result), "--registry", str(registry)]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"index study failed (exit status {proc.returncode}); see the messages above")
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


def run_in_process(route: str, duration: float, data: Path, registry: Path, alias: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = Path(handle.name)
    load_start = loadavg()[0]
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", route, "--duration", str(duration),
               "--data", str(data), "--result", str(result), "--registry", str(registry), "--index", alias]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"in-process {route} failed (exit status {proc.returncode}); see the messages above")
        out = json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)
    return {**out, "loadavg_1m_start": load_start, "loadavg_1m_end": loadavg()[0]}


# --------------------------------------------------------------------------------------------
# The server.


# The redis-servers running now (their process groups), whose CPU each wrk run reports beside the server's.
REDIS_PGIDS: list[int] = []


@contextlib.contextmanager
def redis_state() -> Iterator[str]:
    """A throwaway redis-server on loopback with the no-loss settings; yields its URL for `--state`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--state redis needs redis-server: tools/ensure_redis.sh installs it")
    port, data = free_port(), Path(tempfile.mkdtemp(prefix="serve-load-redis-"))
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
                             ).stdout.strip() != "PONG":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.1)
        REDIS_PGIDS.append(proc.pid)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        with contextlib.suppress(ValueError):
            REDIS_PGIDS.remove(proc.pid)
        proc.kill()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def state_args(state: str) -> Iterator[list[str]]:
    if state == "local":
        yield []
        return
    with redis_state() as url:
        yield ["--state", url]


@contextlib.contextmanager
def server(serve_args: list[str], log: Path, registry: Path) -> Iterator[tuple[str, int]]:
    """`recforge serve` on a free loopback port, ready (models loaded) when this yields its URL."""
    import urllib.error
    import urllib.request

    port = free_port()
    events = Path(tempfile.mkdtemp(prefix="serve-load-events-"))
    cmd = [*_recforge(), "serve", "--registry", str(registry), "--port", str(port), "--events-dir", str(events),
           "--poll-interval-s", "60", "--set", "log_level=warning", *serve_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFORGE_SERVE_")}
    with open(log, "ab") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"recforge serve exited {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"recforge serve was not ready in 180 s; see {log}")
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(f"{url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    break
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(events, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Driving it.


def _median_entry(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of the headline numbers; errors summed (any error counts)."""
    entry: dict[str, Any] = {key: round(statistics.median(r[key] for r in runs), 3) for key in
                             ("rps", "p50_ms", "p99_ms")}
    entry["errors"] = sum(r["errors"] for r in runs)
    entry["runs"] = runs
    return entry


def measure(args: argparse.Namespace, data: Path, script: Path, log: Path, state: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {route: {"closed": {}, } for route in args.routes}
    for route in args.routes:
        runs = [run_in_process(route, args.duration, data, args.registry, args.index) for _ in range(args.repeats)]
        results[route]["in_process"] = _median_entry(runs)
        _say(f"{route:<9} in-process      {_line(results[route]['in_process'])}")
    workers = ["--workers", str(args.workers)] if args.workers != 1 else []  # (servers before --workers existed)
    serve_args = [*workers, "--set", f"alias={args.index}", *state, *args.serve_arg]
    with server(serve_args, log, args.registry) as (url, pgid):
        for route in args.routes:
            run_wrk(url, route, 8, min(3.0, args.duration), 0, data, script, pgid)  # warm-up, not recorded
            for repeat in range(args.repeats):
                for connections in args.concurrency:
                    record = run_wrk(url, route, connections, args.duration, 0, data, script, pgid)
                    results[route]["closed"].setdefault(str(connections), []).append(record)
                    _say(f"{route:<9} closed c={connections:<3}    {_line(record)}  (repeat {repeat + 1})")
                if args.rate:
                    record = run_wrk(url, route, args.paced_connections, args.duration, 1e6 / args.rate, data,
                                     script, pgid)
                    results[route].setdefault(f"paced_{args.rate:g}", []).append(record)
                    _say(f"{route:<9} paced {args.rate:g}/s   {_line(record)}  late sends {record['late_sends']}"
                         f" (max {record['late_max_ms']:.1f} ms)  (repeat {repeat + 1})")
    out: dict[str, Any] = {}
    for route, parts in results.items():
        out[route] = {"closed": {c: _median_entry(runs) for c, runs in parts["closed"].items()}}
        for key, value in parts.items():
            if key.startswith("paced_"):
                out[route][key] = _median_entry(value)
        out[route]["in_process"] = parts["in_process"]
        one = out[route]["closed"].get("1")
        if one is not None:
            out[route]["overhead_c1_p50_ms"] = round(one["p50_ms"] - parts["in_process"]["p50_ms"], 3)
            out[route]["ratio_c1_p50_to_in_process"] = round(one["p50_ms"] / parts["in_process"]["p50_ms"], 2)
    return out


def state_ratios(by_state: dict[str, Any]) -> dict[str, Any]:
    """redis over local for each closed-loop throughput and paced p99, side by side from one sitting."""
    if not {"local", "redis"} <= set(by_state):
        return {}
    ratios: dict[str, Any] = {}
    local, shared = by_state["local"], by_state["redis"]
    for route in ROUTES:
        if route not in local or route not in shared:
            continue
        for c, entry in local[route]["closed"].items():
            other = shared[route]["closed"].get(c)
            if other and entry["rps"]:
                ratios[f"{route}_c{c}_rps"] = round(other["rps"] / entry["rps"], 3)
        for key in local[route]:
            if key.startswith("paced_") and key in shared[route]:
                ratios[f"{route}_{key}_p99_ms"] = {"local": local[route][key]["p99_ms"],
                                                   "redis": shared[route][key]["p99_ms"]}
    c32 = ratios.get("recommend_c32_rps")
    if c32 is not None:
        ratios["recommend_c32_rps_redis>=0.8x_local"] = c32 >= 0.8
    return ratios


def _line(e: dict[str, Any]) -> str:
    return f"{e['rps']:>8,.1f} req/s  p50 {e['p50_ms']:>7.2f} ms  p99 {e['p99_ms']:>7.2f} ms  errors {e['errors']}"


def targets(out: dict[str, Any], rate: float) -> dict[str, Any]:
    """The service's targets on a 2-core machine, and how far each result is from its target."""
    checks: dict[str, Any] = {}
    for route in out:
        if route not in ROUTES:
            continue
        if "overhead_c1_p50_ms" in out[route]:
            checks[f"{route}_overhead_c1_p50_ms<=1"] = {"value": out[route]["overhead_c1_p50_ms"],
                                                        "met": out[route]["overhead_c1_p50_ms"] <= 1.0}
        paced = out[route].get(f"paced_{rate:g}")
        if paced is not None:
            checks[f"{route}_paced_{rate:g}_p99_ms<=50"] = {"value": paced["p99_ms"],
                                                            "met": paced["p99_ms"] <= 50 and paced["errors"] == 0}
    c32 = out.get("recommend", {}).get("closed", {}).get("32")
    if c32 is not None:
        checks["recommend_c32_rps>=800"] = {"value": c32["rps"], "met": c32["rps"] >= 800 and c32["errors"] == 0}
    return checks


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _git(*cmd: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    return None


def print_table(out: dict[str, Any], meta: dict[str, Any]) -> None:
    print(f"{meta['cpu_count']} CPUs ({meta['cpu_model']}), {meta['wrk_version']}, catalog {meta['catalog']}")
    print(f"item indexes (alias: kind, params, build recall@10 vs exact): {meta['indexes']}")
    print(f"recforge serve --workers {meta['workers']} (index: {meta['index']}) {' '.join(meta['serve_args'])}; "
          f"commit {meta['commit']}, "
          f"src/ modified: {meta['src_modified']}; {meta['repeats']} repeat(s) of {meta['duration_s']:g} s")
    print(f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}")
    header = (f"{'route':<10} {'run':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
              f"{'server CPU ms/req':>18}  load 1m")
    print(header)
    print("-" * len(header))
    for route, parts in out.items():
        if route not in ROUTES:
            continue
        rows = [(f"closed c={c}", e) for c, e in parts["closed"].items()]
        rows += [(k, v) for k, v in parts.items() if k.startswith("paced_")]
        rows.append(("in-process", parts["in_process"]))
        for name, e in rows:
            loads = ", ".join(f"{r['loadavg_1m_start']:.1f}" for r in e["runs"])
            cpu = statistics.median(r["server_cpu_ms_per_req"] for r in e["runs"])
            print(f"{route:<10} {name:<12} {e['rps']:>9,.1f} {e['p50_ms']:>8.2f} {e['p99_ms']:>8.2f} "
                  f"{e['errors']:>7} {cpu:>18.2f}  {loads}")
        if "overhead_c1_p50_ms" in parts:
            print(f"{route:<10} service overhead at c=1: +{parts['overhead_c1_p50_ms']:.2f} ms p50 "
                  f"({parts['ratio_c1_p50_to_in_process']:.2f}x in-process)")
    for alias, e in (out.get("index") or {}).items():
        print(f"index {alias:<5} {e['kind']:<5} {e['params']}: recall@{CANDIDATES} {e[f'recall@{CANDIDATES}']:.4f}, "
              f"recall@{K} {e[f'recall@{K}']:.4f} vs exact; search {e['search_ms_batch1_p50']:.3f} ms alone, "
              f"{e['search_ms_per_query_batch32_p50']:.3f} ms/query in batches of 32")
    for name, check in out["targets"].items():
        print(f"target {name}: {check['value']} -> {'met' if check['met'] else 'MISSED'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma list of recommend, score")
    parser.add_argument("--concurrency", default="1,8,32", help="closed-loop connection counts")
    parser.add_argument("--rate", type=float, default=400.0, help="offered req/s of the paced run (0: skip)")
    parser.add_argument("--paced-connections", type=int, default=32, help="connections of the paced run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (median reported)")
    parser.add_argument("--workers", type=int, default=2,
                        help="`recforge serve --workers N`: server processes (2 = one per core on the 2-core machines "
                             "the targets are set for)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra `recforge serve` argument (repeat), e.g. --serve-arg=--set "
                             "--serve-arg=model_threads=2")
    parser.add_argument("--rebuild", action="store_true", help="build the cached registry again")
    parser.add_argument("--registry", type=Path, default=None,
                        help="measure this registry instead (it needs the world.json the build writes beside "
                             "the models: known_users, items)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--state", default="local",
                        help="comma list of local, redis: the server's online state (redis: a loopback redis-server "
                             "started here); several are measured in turn in one sitting")
    parser.add_argument("--index", choices=("production", "hnsw", "flat", "ivf"), default="production",
                        help="which item index the retrieval model serves with (registry alias; production is "
                             "the index training built: HNSW at 100k items)")
    parser.add_argument("--no-index-study", action="store_true", help="skip the recall/search-time comparison")
    parser.add_argument("--worker", choices=(*ROUTES, "index"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if set(args.routes) - set(ROUTES) or not args.routes:
        parser.error(f"--routes: choose from {', '.join(ROUTES)}")
    args.state = [s.strip() for s in args.state.split(",") if s.strip()]
    if set(args.state) - {"local", "redis"} or not args.state:
        parser.error("--state: choose from local, redis")
    if args.repeats < 1 or args.duration <= 0:
        parser.error("--repeats must be >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "index":
            index_worker(args.data, args.result, args.registry)
        else:
            in_process_worker(args.worker, args.duration, args.data, args.result, args.registry, args.index)
        return
    tool = tools()
    if args.registry is None:
        world = ensure_registry(args.rebuild)
        args.registry = CACHE
    else:
        world = json.loads((args.registry / "world.json").read_text())
    meta: dict[str, Any] = {
        **tool, "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _git("rev-parse", "--short", "HEAD"),
        "src_modified": bool(_git("status", "--porcelain", "--", "src")), "serve_args": args.serve_arg,
        "repeats": args.repeats, "duration_s": args.duration, "index": args.index, "workers": args.workers,
        "users": USERS,
        "score_items": SCORE_ITEMS,
        "registry": str(args.registry), "catalog": f"{len(world['items']):,} items", "indexes": world.get("indexes"),
        "loadavg_before": loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        data, script = Path(tmp) / "requests.txt", Path(tmp) / "requests.lua"
        write_request_data(world, data)
        script.write_text(LUA)
        log = REPO / ".bench" / "serve_load_server.log"
        log.parent.mkdir(parents=True, exist_ok=True)  # absent when --registry points elsewhere
        by_state = {}
        for state in args.state:
            _say(f"state: {state}")
            with state_args(state) as extra:
                by_state[state] = measure(args, data, script, log, extra)
            by_state[state]["targets"] = targets(by_state[state], args.rate)
        out = by_state[args.state[0]] if len(args.state) == 1 else {"states": by_state,
                                                                   "redis_vs_local": state_ratios(by_state)}
        if not args.no_index_study and world.get("indexes"):
            out["index"] = run_index_study(data, args.registry)
    meta["loadavg_after"] = loadavg()
    meta["states"] = args.state
    if len(args.state) == 1:
        out["targets"] = by_state[args.state[0]]["targets"]
    out["meta"] = meta
    if args.json:
        print(json.dumps(out))
        return
    for state, result in by_state.items():
        print(f"== state: {state}")
        print_table({**result, "index": out.get("index") if state == args.state[-1] else None}, meta)
    for name, ratio in out.get("redis_vs_local", {}).items():
        print(f"redis / local {name}: {ratio}")


if __name__ == "__main__":
    main()
