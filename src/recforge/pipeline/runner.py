"""`recforge pipeline run`: the steps in order, each done at most once per cycle, all recorded.

A whole run: ingest (open or resume a cycle; none -> "no_new_data"), then every cycle step whose
done-marker is missing, then promote (which needs no new data: a canary matures on its own).
A single step (`--step NAME`, what each Airflow task runs) does just that step of the open cycle.
The cycle closes (the watermark moves) when the gate refuses or once the canary is set.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from recforge.pipeline import ingest
from recforge.pipeline.cycle import Cycle, Log, crash_point
from recforge.pipeline.runlog import RunLog, read_marker, write_marker
from recforge.pipeline.settings import PipelineConfig
from recforge.storage import exclusive_lock

CYCLE_STEPS = ("prepare", "features", "train", "export", "evaluate", "gate", "publish", "canary")
STEPS = ("ingest", *CYCLE_STEPS, "promote")
# Runs that resume the same open cycle before it is reported as stuck.
STUCK_AFTER = 3
_AFTER_PASS = ("publish", "canary")


def _step_function(name: str) -> Callable[..., dict[str, Any]]:
    # Imported on first use: the steps pull in torch and the trainer, which a run with no new
    # data, an ingest or a reused marker never needs.
    from recforge.pipeline import steps

    return getattr(steps, name)


def _gate_decision(cycle: Cycle) -> str | None:
    marker = read_marker(cycle.dir, "gate")
    return None if marker is None else str(marker["decision"])


def _unconfigured(name: str, cycle: Cycle) -> str | None:
    """Why a step has nothing to do in this pipeline's config (it is skipped, and needs no marker), or None."""
    online = cycle.cfg.online
    if name == "features" and (online is None or not online.materialize):
        return "no online: state to materialize users' histories into" if online is None else \
            "online.materialize is false"
    return None


def _run_cycle_step(name: str, cycle: Cycle, runlog: RunLog) -> dict[str, Any]:
    """Run one step unless its marker says it is done; close the cycle where it ends."""
    previous = list(CYCLE_STEPS)[: list(CYCLE_STEPS).index(name)]
    missing = [p for p in previous if read_marker(cycle.dir, p) is None and _unconfigured(p, cycle) is None and not (
        p in _AFTER_PASS and _gate_decision(cycle) == "refuse")]
    if missing:
        raise RuntimeError(f"cycle {cycle.id}: step '{name}' needs step '{missing[0]}' first "
                           f"(run `recforge pipeline run --step {missing[0]}`)")
    done = read_marker(cycle.dir, name)
    if (unconfigured := _unconfigured(name, cycle)) is not None:
        runlog.event(name, "skipped", cycle=cycle.id, reason=unconfigured)
        return {"skipped": unconfigured}
    if done is not None:
        runlog.event(name, "reused", cycle=cycle.id, outputs=done)
        cycle.log(f"{name}: already done in cycle {cycle.id} (finished {done.get('finished')})")
        outputs = done
    elif name in _AFTER_PASS and _gate_decision(cycle) != "pass":
        outputs = {"skipped": "the gate refused the challenger"}
        runlog.event(name, "skipped", cycle=cycle.id, reason=outputs["skipped"])
        cycle.log(f"{name}: skipped, {outputs['skipped']}")
        return outputs
    else:
        runlog.event(name, "started", cycle=cycle.id)
        cycle.log(f"{name}: cycle {cycle.id}")
        try:
            outputs = _step_function(name)(cycle)
        except Exception as exc:
            runlog.event(name, "failed", cycle=cycle.id, error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(limit=5))
            raise
        write_marker(cycle.dir, name, outputs)
        runlog.event(name, "done", cycle=cycle.id, outputs=outputs)
        crash_point(f"{name}:after-marker")
    decision = _gate_decision(cycle)
    if (name == "gate" and decision == "refuse") or name == "canary":
        ingest.close_cycle(cycle.cfg.state, cycle.record, "refuse" if name == "gate" else "canary")
        runlog.event("close", "done", cycle=cycle.id, decision=decision)
        why = "; ".join((read_marker(cycle.dir, "gate") or {}).get("reasons", []))
        cycle.log(f"cycle {cycle.id} closed: " + (f"gate refused: {why}" if name == "gate" else "canary set"))
    return outputs


def _drain_stream(cfg: PipelineConfig, runlog: RunLog, log: Log) -> None:
    """The shared stream into the lake, then the lake's days of the training window into events_dir (each day
    file rewritten whole: a day that gained events is a changed partition, one that did not keeps its size)."""
    from recforge.serve.stream_lake import export_lake, ingest_stream

    online = cfg.online
    assert online is not None
    ingested = ingest_stream(online.state, online.lake, online.prefix)
    since = (datetime.now(UTC).date() - timedelta(days=cfg.window_days + 1)).isoformat()
    exported = export_lake(online.lake, cfg.events_dir, since=since)
    runlog.event("ingest", "stream", ingested=ingested.written, lake=online.lake, exported_rows=exported.exported_rows,
                 days=exported.days)
    log(f"stream: {ingested.written:,} new event(s) into {online.lake}; exported {exported.exported_rows:,} "
        f"impressions of {len(exported.days)} day(s) since {since} into {cfg.events_dir}")


def _ingest(cfg: PipelineConfig, runlog: RunLog, log: Log) -> Cycle | None:
    if cfg.online is not None:
        Path(cfg.events_dir).mkdir(parents=True, exist_ok=True)
        _drain_stream(cfg, runlog, log)
    record = ingest.open_cycle(cfg.events_dir, cfg.state, cfg.window_days)
    if record is None:
        future = ingest.split_future(ingest.list_partitions(cfg.events_dir))[1]
    else:
        future = [] if record["resumed"] else record.get("future", [])
    if future:
        runlog.event("ingest", "future_partitions", partitions=future)
        log(f"warning: ignoring {len(future)} partition(s) dated after today (UTC) until their day comes: "
            f"{', '.join(future[:5])}{' ...' if len(future) > 5 else ''}")
    if record is None:
        runlog.event("ingest", "no_new_data", reason="no partitions newer than the watermark",
                     watermark=ingest.read_watermark(cfg.state).get("last_day"))
        log("no new event partitions since the last cycle: nothing to train")
        return None
    if record["resumed"] and int(record.get("resumes", 0)) >= STUCK_AFTER:
        runlog.event("ingest", "stuck", cycle=record["cycle"], resumes=record["resumes"], opened=record.get("opened"))
        log(f"warning: cycle {record['cycle']} (opened {record.get('opened', '?')}) has been resumed "
            f"{record['resumes']} times without finishing; if it cannot finish, `recforge pipeline abandon` "
            "closes it (its partitions are retried by the next cycle unless --consume)")
    runlog.event("ingest", "resumed" if record["resumed"] else "done", cycle=record["cycle"], new=record["new"],
                 window=record["window"])
    log(f"cycle {record['cycle']}: {'resumed' if record['resumed'] else 'opened'} with {len(record['new'])} new "
        f"partition(s), training on {len(record['window'])}")
    return Cycle(cfg, record, log)


def _summary(cycle: Cycle | None, promoted: dict[str, Any] | None) -> dict[str, Any]:
    if cycle is None:
        return {"decision": "no_new_data", "reason": "no new event partitions since the watermark",
                "promote": promoted}
    gate = read_marker(cycle.dir, "gate") or {}
    published = read_marker(cycle.dir, "publish") or {}
    return {"decision": gate.get("decision", "incomplete"), "cycle": cycle.id, "gate": gate.get("summary"),
            "reasons": gate.get("reasons", []), "paired_test": gate.get("paired_test"),
            "no_champion": gate.get("no_champion"), "champion_version": gate.get("champion_version"),
            "version": published.get("version"), "canary": (read_marker(cycle.dir, "canary") or {}).get("version"),
            "promote": promoted}


def _exclusive(state: Path) -> contextlib.AbstractContextManager[None]:
    """One pipeline run per state dir at a time; the OS drops the lock when a killed run dies."""
    return exclusive_lock(state / ".lock", f"another `recforge pipeline run` (pid {{pid}}) is using {state}; "
                          "wait for it to finish")


def run(cfg: PipelineConfig, step: str | None = None, log: Log = print) -> dict[str, Any]:
    """Run the whole pipeline (step None) or one step; returns the summary also written to the run log."""
    if step is not None and step not in STEPS:
        raise ValueError(f"unknown pipeline step {step!r}; choose one of {', '.join(STEPS)}")
    with _exclusive(cfg.state):
        return _run_locked(cfg, step, log)


def abandon(cfg: PipelineConfig, consume: bool = False, log: Log = print) -> dict[str, Any]:
    """Close the open cycle unfinished (`recforge pipeline abandon`): for a cycle that fails on every run."""
    with _exclusive(cfg.state):
        runlog = RunLog(cfg.state, "abandon")
        closed = ingest.abandon_cycle(cfg.state, consume)
        if closed is None:
            log("no open cycle to abandon")
            return runlog.finish({"step": "abandon", "decision": "no_open_cycle"})
        runlog.event("abandon", "done", cycle=closed["cycle"], consumed=consume, new=closed["new"])
        log(f"cycle {closed['cycle']} abandoned; its {len(closed['new'])} new partition(s) "
            + ("are marked consumed" if consume else "will be retried by the next cycle"))
        return runlog.finish({"step": "abandon", "decision": "abandoned", "cycle": closed["cycle"],
                              "consumed": consume, "partitions": closed["new"]})


def _run_locked(cfg: PipelineConfig, step: str | None, log: Log) -> dict[str, Any]:
    runlog = RunLog(cfg.state, step)
    try:
        if step is None:
            cycle = _ingest(cfg, runlog, log)
            if cycle is not None:
                for name in CYCLE_STEPS:
                    _run_cycle_step(name, cycle, runlog)
            promoted = _step_function("promote")(cfg)
            runlog.event("promote", promoted["status"], outputs=promoted)
            log(f"promote: {promoted['status']}: {promoted.get('reason', '')}")
            return runlog.finish(_summary(cycle, promoted))
        if step == "promote":
            promoted = _step_function("promote")(cfg)
            runlog.event("promote", promoted["status"], outputs=promoted)
            return runlog.finish({"step": step, "decision": promoted["status"], **promoted})
        if step == "ingest":
            cycle = _ingest(cfg, runlog, log)
            return runlog.finish({"step": step, **_summary(cycle, None)})
        record = ingest.current_cycle(cfg.state)
        if record is None:
            runlog.event(step, "skipped", reason="no open cycle (no new data, or it was closed)")
            return runlog.finish({"step": step, "decision": "no_new_data",
                                  "reason": "no open cycle: no new data since the watermark, or the cycle closed"})
        cycle = Cycle(cfg, record, log)
        outputs = _run_cycle_step(step, cycle, runlog)
        return runlog.finish({"step": step, "outputs": outputs, **_summary(cycle, None)})
    except Exception as exc:
        runlog.finish({"decision": "failed", "step": step, "error": f"{type(exc).__name__}: {exc}"})
        raise
