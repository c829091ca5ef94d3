"""Scenario `loop`: simulated days of the closed loop, serve -> events -> export -> pipeline -> canary -> promote.

Day by day, simulated users request feeds from the running server (production, plus the canary for
a share of users) and send their events back; the day's events are exported into the pipeline's
events directory as that day's partition, the canary that served the day is promoted, and
`recforge pipeline run` trains a challenger on the grown window and gates it against the champion.
One day's challenger can be deliberately weakened: the gate must refuse it, on the record.

Two things are checked along the way: the ground-truth CTR of what was served (expected clicks per
impression, free of click noise) should rise as the models learn from their own traffic, and every
impression the server accepted must reach the prepared training data of the next cycle.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from recforge.data.shards import split_column
from recforge.experiments.plot import png_figure
from recforge.scenarios import harness
from recforge.scenarios.harness import Log
from recforge.scenarios.settings import SimulateConfig
from recforge.serve.events import export_report
from recforge.storage import read_json, write_text
from recforge.synthetic.online import DayTraffic, FeedClient, draw_requests, play_day
from recforge.synthetic.world import SECONDS_PER_DAY, period_start

_SPLITS = ("train", "valid", "test")


def _date(cfg_start: int, day: int) -> str:
    return datetime.fromtimestamp(cfg_start + day * SECONDS_PER_DAY, tz=UTC).strftime("%Y-%m-%d")


def rows_in_training(cycle_dir: Path, day_start: int) -> tuple[int, int]:
    """(rows, positive labels) of the cycle's prepared data (all splits) with a timestamp on that UTC day.

    The prepared directory is the one the cycle's prepare step recorded in its done-marker.
    """
    marker = cycle_dir / "steps" / "prepare.json"
    prepared = Path(read_json(marker)["prepared"]) if marker.is_file() else cycle_dir / "prepared"
    if not (prepared / "meta.json").is_file():
        return 0, 0
    rows = clicks = 0
    for split in _SPLITS:
        times = split_column(prepared, split, "timestamp")
        labels = split_column(prepared, split, "label")
        on_day = (times >= day_start) & (times < day_start + SECONDS_PER_DAY)
        rows += int(on_day.sum())
        clicks += int((np.asarray(labels)[on_day] > 0).sum())
    return rows, clicks


def _pipeline_config(cfg: SimulateConfig, root: Path) -> Path:
    train_yaml = root / "train.yaml"
    write_text(train_yaml, yaml.safe_dump(cfg.train_config().to_dict(), sort_keys=False))
    path = root / "pipeline.yaml"
    write_text(path, yaml.safe_dump({
        "events_dir": str(root / "events"), "state_dir": str(root / "pipeline-state"),
        "registry": str(root / "registry"), "model_name": "ranker", "window_days": cfg.loop.window_days,
        "training": {"config": str(train_yaml), "overrides": ["train.progress=false"]}
        | ({"warm_start": True} if cfg.loop.warm_start else {}),
        "gate": dict(cfg.loop.gate),
        # The simulator promotes a canary itself once it has served a whole simulated day (wall-clock age
        # means nothing here), so the run's own promote step always waits.
        "canary_min_age_s": 1e9,
    }, sort_keys=False))
    return path


def _forced(version: int) -> dict[str, Any]:
    """A one-arm experiment: every user gets ranker `version` (canary routing is overridden too)."""
    return {"name": "sim_initial", "salt": "sim_initial",
            "variants": [{"name": "initial", "weight": 1.0, "ranker": str(version)}]}


def _decision(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary.get(key) for key in ("decision", "cycle", "gate", "reasons", "version", "canary",
                                              "champion_version", "no_champion")}


def run_loop(cfg: SimulateConfig, log: Log) -> dict[str, Any]:
    began = time.perf_counter()
    root, world, registry = harness.offline_setup(cfg, log, "retrieval, trained on the offline log")

    offline = root / "events" / "offline"
    offline.mkdir(parents=True)
    for day_file in sorted((root / "raw" / "events").glob("*.parquet")):
        shutil.copy(day_file, offline / day_file.name)
    served_dir = root / "events" / "served"
    pipeline_yaml = _pipeline_config(cfg, root)
    promote_now = ["--step", "promote", "canary_min_age_s=0"]
    # The first ranker has no production to protect and no traffic to canary on: the run promotes it at once.
    first = harness.pipeline_run(pipeline_yaml, ["canary_min_age_s=0"], root, log)
    initial = {**_decision(first), "promote": first.get("promote") or {}}
    if initial["decision"] != "pass":
        raise RuntimeError(f"the first ranker did not pass the pipeline's gate against the popularity baseline "
                           f"({'; '.join(initial.get('reasons') or []) or initial['decision']}); train it longer "
                           "(training.train.epochs) or on a larger offline log (training.data.generate.events)")
    if initial["promote"].get("status") != "promoted":
        raise RuntimeError(f"the first ranker was not promoted to production: {initial['promote']}")
    initial_version = int(initial["version"])
    log(f"initial ranker v{initial_version} (gate {initial['decision']}) promoted to production")
    setup_s = time.perf_counter() - began

    start = period_start(world.config)
    days: list[dict[str, Any]] = []
    with harness.running_server(cfg, registry, root / "serve-events", log,
                                {"canary_share": str(cfg.loop.canary_share), "canary_max_p99_ms": "10000"}) as server, \
            FeedClient(server.url, cfg.concurrency, server.token) as client:
        for i in range(cfg.loop.days):
            day = world.config.days + cfg.loop.start_gap_days + i
            date = _date(start, day)
            served = client.ready()["models"]["ranker"]
            seeds = np.random.SeedSequence([cfg.seed, day]).spawn(3)
            requests = draw_requests(world, cfg.requests_per_day, day, np.random.default_rng(seeds[0]))
            t0 = time.perf_counter()
            traffic = play_day(client, world, requests, np.random.default_rng(seeds[1]), k=cfg.k,
                               exclude_seen=cfg.exclude_seen, batch_requests=cfg.batch_requests)
            serve_s = time.perf_counter() - t0
            # The world moves on (tastes drift, items age), so a day's CTR is also read against the first
            # production ranker on the very same requests: what the loop itself added, net of the world.
            client.set_experiments([_forced(initial_version)])
            baseline = play_day(client, world, requests, np.random.default_rng(seeds[2]), k=cfg.k,
                                exclude_seen=cfg.exclude_seen, batch_requests=cfg.batch_requests, send_events=False)
            client.set_experiments([])
            exported = export_report(root / "serve-events", served_dir, since=date, until=date)
            promoted = harness.pipeline_run(pipeline_yaml, promote_now, root, log)
            weak = cfg.loop.weak_day == i
            overrides = [f"training.overrides={['train.progress=false', *cfg.loop.weak_overrides]}"] if weak else []
            t1 = time.perf_counter()
            summary = harness.pipeline_run(pipeline_yaml, overrides, root, log)
            pipeline_s = time.perf_counter() - t1
            cycle_dir = root / "pipeline-state" / "cycles" / str(summary.get("cycle"))
            rows, label_clicks = rows_in_training(cycle_dir, start + day * SECONDS_PER_DAY)
            reloaded = client.reload()["models"]["ranker"]
            record = _day_record(i, day, date, traffic, baseline.expected_ctr, served, serve_s,
                                 exported.days.get(date, 0), promoted, _decision(summary), weak, rows, label_clicks,
                                 pipeline_s, reloaded)
            days.append(record)
            log(f"day {i} ({date}): truth CTR {record['ctr_truth']:.4f} ({100 * record['lift_vs_initial']:+.1f}% vs "
                f"the first ranker), measured {record['ctr_measured']:.4f}; "
                f"promote {promoted.get('status')}; gate {record['gate']['decision']}"
                f"{' (injected weak challenger)' if weak else ''}; impressions accepted {record['events_accepted']:,}"
                f", in training {record['events_in_training']:,}")

    refused = [{"day": d["day"], "cycle": d["gate"]["cycle"], "injected_weak": d["injected_weak"],
                "reasons": d["gate"]["reasons"]} for d in days if d["gate"]["decision"] == "refuse"]
    ctr = [d["ctr_truth"] for d in days]
    return {
        "scenario": "loop", "days": days, "ctr_per_day": ctr, "ctr_measured_per_day": [d["ctr_measured"] for d in days],
        "ctr_initial_model_per_day": [d["ctr_initial_model"] for d in days],
        "lift_vs_initial_per_day": [d["lift_vs_initial"] for d in days],
        "decisions": [d["gate"]["decision"] for d in days], "refused": refused,
        "events_accepted": [d["events_accepted"] for d in days],
        "events_in_training": [d["events_in_training"] for d in days],
        "clicks_accepted": [d["clicks_accepted"] for d in days],
        "clicks_in_training": [d["clicks_in_training"] for d in days],
        "all_events_in_training": all(d["events_accepted"] == d["events_in_training"] for d in days),
        "ctr_rise": (ctr[-1] - ctr[0]) if ctr else 0.0,
        "initial": initial, "requests_per_day": cfg.requests_per_day, "setup_seconds": round(setup_s, 2),
        "seconds": round(time.perf_counter() - began, 2), "workdir": str(root),
    }


def _day_record(i: int, day: int, date: str, traffic: DayTraffic, initial_ctr: float, served: dict[str, Any],
                serve_s: float, exported: int, promoted: dict[str, Any], gate: dict[str, Any], weak: bool, rows: int,
                label_clicks: int, pipeline_s: float, after: dict[str, Any]) -> dict[str, Any]:
    return {
        "day": i, "world_day": day, "date": date, "requests": len(traffic.requests),
        "impressions": traffic.impressions, "ctr_truth": traffic.expected_ctr, "ctr_measured": traffic.measured_ctr,
        "ctr_initial_model": initial_ctr, "lift_vs_initial": traffic.expected_ctr / initial_ctr - 1.0,
        "production": served.get("production"), "canary": served.get("canary"),
        "canary_requests": int(traffic.canary.sum()),
        "events_accepted": traffic.impressions_accepted, "clicks_accepted": traffic.clicks_accepted,
        "event_posts": traffic.event_posts, "exported": exported,
        "events_in_training": rows, "clicks_in_training": label_clicks,
        "promote": {k: promoted.get(k) for k in ("status", "version", "reason")},
        "injected_weak": weak, "gate": gate, "serving_after": after,
        "serve_seconds": round(serve_s, 2), "pipeline_seconds": round(pipeline_s, 2),
    }


def plot_loop(result: dict[str, Any], path: Path) -> Path:
    """Ground-truth and measured CTR per simulated day, each day's gate decision marked."""
    days = result["days"]
    x = [d["day"] for d in days]
    with png_figure(path, figsize=(8, 4)) as (fig, ax):
        ax.plot(x, result["ctr_per_day"], "o-", label="ground-truth CTR of what was served")
        ax.plot(x, result["ctr_initial_model_per_day"], "s:", color="grey",
                label="ground-truth CTR of the first ranker, same requests")
        ax.plot(x, result["ctr_measured_per_day"], "x--", alpha=0.7, label="measured CTR (drawn clicks)")
        for d in days:
            mark = "pass" if d["gate"]["decision"] == "pass" else "refused" + (" (weak)" if d["injected_weak"] else "")
            served = f"prod v{d['production']}" + (f" + canary v{d['canary']}" if d["canary"] is not None else "")
            ax.annotate(f"{served}\ngate: {mark}", (d["day"], d["ctr_truth"]),
                        textcoords="offset points", xytext=(0, 10), ha="center", fontsize=7)
        ax.set_xlabel("simulated day")
        ax.set_ylabel("CTR")
        ax.set_xticks(x)
        ax.set_title("closed loop: serve -> events -> pipeline -> canary -> promote")
        ax.legend(fontsize=8, loc="lower right")
        ax.margins(y=0.3)
    return path
