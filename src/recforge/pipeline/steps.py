"""The cycle's steps: prepare -> train -> export -> evaluate -> gate -> publish -> canary, and promote.

Each step is a plain function of a `Cycle` that returns its outputs (what the done-marker keeps).
They compose the library through recforge.recipes, the same functions the CLI verbs call, so a step
and the matching command cannot drift apart. Steps are idempotent on their own too: a bundle that
already exists is verified and reused, and publish finds a version it published before by the
cycle's fingerprint instead of publishing again.
"""

from __future__ import annotations

import io
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from recforge import bundle as bundle_module
from recforge import registry as reg
from recforge.data.batches import SplitData
from recforge.evaluate import predict_logits
from recforge.models.popularity import popularity_baseline
from recforge.pipeline import gate as gate_module
from recforge.pipeline.cycle import Cycle, crash_point
from recforge.pipeline.holdout import encode_for_bundle, item_known
from recforge.pipeline.settings import PipelineConfig
from recforge.pipeline.warm_start import warm_start_from_bundle
from recforge.recipes.evaluate import evaluate_run
from recforge.recipes.export import export_run
from recforge.recipes.prepare import prepare_data
from recforge.recipes.runs import feature_layout
from recforge.recipes.train import train_model
from recforge.storage import write_bytes, write_json

SCORES = "holdout_scores.npz"
GATE = "gate.json"


def prepare(cycle: Cycle) -> dict[str, Any]:
    info, result = prepare_data(cycle.training())
    split = info.meta["split"]
    return {"prepared": str(info.path), "rows": info.meta["rows"], "validation": result.report(),
            "splits": {name: split[name]["rows"] for name in ("train", "valid", "test")}}


def features(cycle: Cycle) -> dict[str, Any]:
    """Users' histories from the cycle's log (the rows its model trains on, validated the same way) into the
    servers' Redis: right after prepare, so serving's histories follow the log even on a cycle whose gate
    refuses its model (the histories belong to the log, not to a model version)."""
    from recforge.recipes.features import materialize_features

    online = cycle.cfg.online
    assert online is not None
    report = materialize_features(cycle.training(), online.state, online.prefix)
    cycle.log(f"features: {report.users:,} users' histories materialized into {online.state}")
    return {"users": report.users, "clicks": report.clicks_written, "later_events": report.later_events,
            "state": online.state}


def train(cycle: Cycle) -> dict[str, Any]:
    cfg = cycle.training()
    # A checkpoint without a train marker is a run that was killed: continue it, do not restart.
    resume = (cfg.resolved_run_dir / "checkpoints" / "last.pt").exists()
    warm: dict[str, Any] = {}
    init = None
    if cycle.cfg.training.warm_start:
        number, path = _champion(cycle.cfg)
        if number is None or path is None:
            warm = {"warm_start": "no champion: trained from scratch"}
        else:
            champion = bundle_module.load_bundle(path)
            prepared = cfg.resolved_prepared_dir

            def init(model: Any, features: Any) -> dict[str, Any]:
                info = warm_start_from_bundle(model, features, prepared, champion)
                warm.update({"warm_start": f"champion v{number}", **info})
                return info

    result = train_model(cfg, resume=resume, init_weights=init, log=cycle.log)
    if result.interrupted:
        raise RuntimeError(f"training of cycle {cycle.id} stopped early (train.stop_after_steps); run again to resume")
    return {"run_dir": str(result.run_dir), "resumed": resume, "best_epoch": result.state.best_epoch,
            "best_valid": result.state.best_metric, "global_step": result.state.global_step, **warm}


def export(cycle: Cycle) -> dict[str, Any]:
    """Evaluate the run (its metrics travel in the bundle), then export; a parity failure is a result."""
    cfg = cycle.training()
    metrics = evaluate_run(cfg, "test", log=cycle.log)
    out = cycle.bundle_dir
    if not out.exists():
        try:
            export_run(cfg.resolved_run_dir, out, parity_rows=cycle.cfg.parity_rows)
        except bundle_module.BundleError as exc:
            return {"bundle": None, "parity_ok": False, "parity": str(exc), "metrics": metrics}
    manifest = bundle_module.read_manifest(out)
    bundle_module.verify_bundle(out, manifest)  # a bundle left by a killed run is reused only if whole
    parity = manifest.get("parity_max_abs_diff", {})
    # write_bundle refuses a failing export itself; this re-check covers a bundle reused after a crash.
    ok = all(float(v) <= bundle_module.PARITY_ATOL for v in parity.values() if isinstance(v, (int, float)))
    return {"bundle": str(out), "parity_ok": ok, "parity": parity, "metrics": metrics}


def _champion(cfg: PipelineConfig) -> tuple[int | None, Path | None]:
    try:
        info = reg.show(cfg.registry, cfg.model_name, cfg.production_alias)
    except reg.RegistryError:
        return None, None
    return int(info["number"]), Path(info["path"])


def evaluate(cycle: Cycle) -> dict[str, Any]:
    """Challenger (its bundle), champion (its bundle, re-encoded) and popularity on the same holdout."""
    exported = cycle.marker("export")
    if not exported["bundle"]:
        return {"skipped": "no bundle (export parity failed)", "champion_version": None}
    cfg = cycle.training()
    prepared = cfg.resolved_prepared_dir
    test = SplitData.load(prepared, "test")
    challenger = bundle_module.load_bundle(exported["bundle"])
    item_column = challenger.layout.item_column
    train_split = SplitData.load(prepared, "train")
    features = feature_layout(prepared)
    popularity = popularity_baseline(train_split, features)
    arrays = {
        "label": test.label.numpy().astype(np.float64),
        "user_key": np.asarray(test.user_key),
        "challenger": predict_logits(challenger.module, test, cfg.train.eval_batch_size),
        "popularity": predict_logits(popularity, test, cfg.train.eval_batch_size),
        "challenger_item_known": item_known(test, item_column),
    }
    version, path = _champion(cycle.cfg)
    notes: dict[str, Any] = {}
    if version is not None and path is not None:
        champion = bundle_module.load_bundle(path)
        encoded, notes = encode_for_bundle(test, prepared, champion)
        arrays["champion"] = predict_logits(champion.module, encoded, cfg.train.eval_batch_size)
        arrays["champion_item_known"] = item_known(encoded, champion.layout.item_column)
        cycle.log(f"champion: version {version} scored on the new holdout ({len(test):,} rows)")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(cycle.dir / SCORES, buffer.getvalue())
    return {"scores": str(cycle.dir / SCORES), "rows": len(test), "champion_version": version,
            "champion_path": str(path) if path else None, "champion_encoding": notes}


def gate(cycle: Cycle) -> dict[str, Any]:
    exported = cycle.marker("export")
    evaluated = cycle.marker("evaluate")
    if not exported["parity_ok"] or evaluated.get("skipped"):
        decision = {"decision": "refuse", "summary": "refuse",
                    "reasons": [f"export parity failed: {exported['parity']}"],
                    "checks": {"parity": {"ok": False, "detail": exported["parity"]}}, "paired_test": None,
                    "no_champion": evaluated.get("champion_version") is None}
    else:
        with np.load(evaluated["scores"]) as data:
            scores = {k: data[k] for k in data.files}
        decision = gate_module.decide(scores, cycle.cfg.gate, parity_ok=True, parity_detail=exported["parity"],
                                      champion_version=evaluated.get("champion_version"))
    decision = {"cycle": cycle.id, **decision}
    write_json(cycle.dir / GATE, decision)
    return decision


def _note(cycle: Cycle) -> str:
    return f"pipeline cycle {cycle.id} fingerprint={cycle.record['fingerprint']}"


def find_published(cfg: PipelineConfig, fingerprint: str) -> int | None:
    """The version an earlier (possibly killed) attempt of this cycle already published."""
    try:
        versions = reg.list_versions(cfg.registry, cfg.model_name)
    except reg.RegistryError:
        return None
    hits = [v.number for v in versions if f"fingerprint={fingerprint}" in v.note]
    return hits[0] if hits else None


def publish(cycle: Cycle) -> dict[str, Any]:
    existing = find_published(cycle.cfg, cycle.record["fingerprint"])
    if existing is not None:
        cycle.log(f"version {existing} already holds cycle {cycle.id}: not publishing again")
        return {"version": existing, "reused": True}
    version = reg.publish(cycle.cfg.registry, cycle.marker("export")["bundle"], cycle.cfg.model_name, _note(cycle))
    crash_point("publish:after-registry")
    return {"version": version, "reused": False}


def canary(cycle: Cycle) -> dict[str, Any]:
    version = int(cycle.marker("publish")["version"])
    cfg = cycle.cfg
    try:
        current = int(reg.show(cfg.registry, cfg.model_name, cfg.canary_alias)["number"])
    except reg.RegistryError:
        current = None
    if current == version:
        return {"version": version, "alias": cfg.canary_alias, "moved": False}
    gate_summary = cycle.marker("gate").get("summary", "")
    record = reg.promote(cfg.registry, cfg.model_name, version, cfg.canary_alias,
                         reason=f"pipeline cycle {cycle.id}: gate {gate_summary}")
    return {"version": version, "alias": cfg.canary_alias, "moved": True, "record": record}


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def promote(cfg: PipelineConfig, now: float | None = None) -> dict[str, Any]:
    """Move production to the canary once it is old enough and was never rolled back.

    The serving side rolls a bad canary back itself and the registry history records it; a
    version that was rolled back, from either alias, is never promoted by the pipeline.
    """
    now = time.time() if now is None else now
    try:
        history = reg.history(cfg.registry, cfg.model_name)
        versions = reg.list_versions(cfg.registry, cfg.model_name)
    except reg.RegistryError as exc:
        return {"status": "nothing", "reason": f"no model in the registry yet ({exc})"}
    aliases = {alias: v.number for v in versions for alias in v.aliases}
    moves = [(i, r) for i, r in enumerate(history)
             if r.get("alias") == cfg.canary_alias and r.get("action") == "promote"]
    if not moves:
        return {"status": "nothing", "reason": f"no version was ever made {cfg.canary_alias}"}
    index, record = moves[-1]
    version = int(record["to"])
    rolled = [r for r in history[index + 1:] if r.get("action") == "rollback" and r.get("from") == version]
    if rolled:
        return {"status": "refused", "version": version,
                "reason": f"version {version} was rolled back from {rolled[-1]['alias']} at {rolled[-1]['time']}"
                          f" ({rolled[-1].get('reason') or 'no reason given'}); it is not promoted"}
    if aliases.get(cfg.canary_alias) != version:
        return {"status": "refused", "version": version,
                "reason": f"{cfg.canary_alias} now points at {aliases.get(cfg.canary_alias)}, not {version}"}
    if aliases.get(cfg.production_alias) == version:
        return {"status": "nothing", "version": version, "reason": f"version {version} is already production"}
    age = now - _unix(record["time"])
    if age < cfg.canary_min_age_s:
        return {"status": "waiting", "version": version, "age_s": round(age, 1),
                "reason": f"canary for {age:.0f}s of the {cfg.canary_min_age_s:.0f}s required (canary_min_age_s)"}
    moved = reg.promote(cfg.registry, cfg.model_name, version, cfg.production_alias,
                        reason=f"pipeline: canary for {age:.0f}s without rollback")
    return {"status": "promoted", "version": version, "age_s": round(age, 1), "record": moved}
