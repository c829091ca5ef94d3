"""End-to-end continuous training through the real `recforge pipeline run`, on a tiny synthetic world.

Two independent pipelines share one generated world: `lineage` grows a champion and challenges it,
`crashy` is killed mid-cycle and has its canary rolled back. Tests within each run in file order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _pipeline_cli import TRAIN, World, last_json, recforge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_days(tmp_path_factory) -> Path:
    gen = tmp_path_factory.mktemp("world")
    (gen / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    recforge("data", "generate", "--config", str(gen / "train.yaml"), f"workdir={gen}", cwd=gen)
    return gen / "raw" / "events"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, world_days) -> World:
    return World(tmp_path_factory.mktemp("lineage"), world_days)


@pytest.fixture(scope="module")
def crashy(tmp_path_factory, world_days) -> World:
    return World(tmp_path_factory.mktemp("crashy"), world_days)


def test_first_run_publishes_a_canary_and_a_rerun_without_data_trains_nothing(lineage):
    lineage.arrive(4)
    first = last_json(lineage.pipeline())
    assert first["decision"] == "pass" and first["no_champion"] is True
    assert "no champion" in first["gate"]
    assert first["version"] == 1 and first["canary"] == 1
    assert lineage.versions() == [1] and lineage.aliases() == {"canary": 1}
    assert first["promote"]["status"] == "waiting"  # canary_min_age_s=3600
    summary = json.loads((lineage.run_logs()[-1] / "summary.json").read_text())
    assert summary["decision"] == "pass"
    steps = [json.loads(line) for line in (lineage.run_logs()[-1] / "log.jsonl").read_text().splitlines()]
    done = [e["step"] for e in steps if e["status"] == "done"]
    assert done == ["ingest", "prepare", "train", "export", "evaluate", "gate", "publish", "canary", "close"]
    assert [(e["step"], e["reason"]) for e in steps if e["status"] == "skipped"] == [
        ("features", "no online: state to materialize users' histories into")]  # nothing to seed, nothing blocked

    again = lineage.pipeline()
    assert last_json(again)["decision"] == "no_new_data" and again.returncode == 0
    assert lineage.versions() == [1]
    assert not any((p / "steps").is_dir() and len(list((p / "steps").iterdir())) == 0
                   for p in (lineage.root / "state" / "cycles").iterdir())
    assert len(list((lineage.root / "state" / "cycles").iterdir())) == 1


def test_canary_is_promoted_only_after_its_minimum_age(lineage):
    waiting = json.loads((lineage.run_logs()[0] / "summary.json").read_text())["promote"]
    assert waiting["status"] == "waiting" and "canary_min_age_s" in waiting["reason"]
    assert "production" not in lineage.aliases()
    promoted = last_json(lineage.pipeline("--step", "promote", "canary_min_age_s=0"))
    assert promoted["status"] == "promoted" and promoted["version"] == 1
    assert lineage.aliases()["production"] == 1


def test_new_day_trains_a_challenger_judged_against_the_champion_on_the_same_holdout(lineage):
    lineage.arrive(5)
    result = last_json(lineage.pipeline("training.warm_start=true"))
    assert result["no_champion"] is False and result["champion_version"] == 1
    test = result["paired_test"]
    assert test["test"] == "paired_bootstrap" and test["n_users"] >= 30
    assert test["ci_low"] <= test["mean_diff"] <= test["ci_high"] and 0 < test["p_value"] <= 1
    cycle = lineage.root / "state" / "cycles" / result["cycle"]
    gate = json.loads((cycle / "gate.json").read_text())
    assert gate["reference"] == "champion" and set(gate["guardrails"]) == {"challenger", "champion"}
    trained = json.loads((cycle / "steps" / "train.json").read_text())
    assert trained["warm_start"] == "champion v1" and trained["embedding_rows_from_champion"] > 0, trained
    evaluated = json.loads((cycle / "steps" / "evaluate.json").read_text())
    assert evaluated["champion_version"] == 1 and evaluated["champion_encoding"]["item_field"] == "item_id"
    if result["decision"] == "pass":
        assert lineage.versions() == [1, 2] and lineage.aliases()["canary"] == 2
    else:
        assert result["reasons"] and lineage.versions() == [1]


def test_a_worse_challenger_is_refused_with_the_reason(lineage):
    before = lineage.versions()
    lineage.arrive(6)
    result = last_json(lineage.pipeline('training.overrides=["train.lr=0.000001"]'))
    assert result["decision"] == "refuse"
    assert any("guardrail" in r for r in result["reasons"]), result["reasons"]
    assert any("not significant" in r for r in result["reasons"]), result["reasons"]
    assert lineage.versions() == before
    watermark = json.loads((lineage.root / "state" / "watermark.json").read_text())
    assert watermark["last_decision"] == "refuse" and watermark["last_day"] == "2026-01-06"
    assert last_json(lineage.pipeline())["decision"] == "no_new_data"  # refused data is not retried forever


def test_killed_after_publish_reruns_without_a_duplicate_version(crashy):
    crashy.arrive(4)
    killed = crashy.pipeline(check=False, env={"RECFORGE_PIPELINE_CRASH_AT": "publish:after-registry"})
    assert killed.returncode == 137
    assert crashy.versions() == [1] and crashy.aliases() == {}  # published, canary not set yet
    rerun = last_json(crashy.pipeline())
    assert rerun["decision"] == "pass" and rerun["version"] == 1 and rerun["canary"] == 1
    assert crashy.versions() == [1] and crashy.aliases() == {"canary": 1}
    log = [json.loads(line) for line in (crashy.run_logs()[-1] / "log.jsonl").read_text().splitlines()]
    by_step = {e["step"]: e for e in log}
    assert by_step["ingest"]["status"] == "resumed"
    assert by_step["train"]["status"] == "reused" and by_step["gate"]["status"] == "reused"
    assert by_step["publish"]["status"] == "done" and by_step["publish"]["outputs"]["reused"] is True
    assert by_step["canary"]["status"] == "done" and by_step["close"]["status"] == "done"


def test_a_rolled_back_canary_is_never_promoted(crashy):
    crashy.arrive(5)
    result = last_json(crashy.pipeline())  # no production yet: gated against popularity
    assert result["decision"] == "pass" and crashy.aliases()["canary"] == 2
    crashy.registry("rollback", "ranker", "--alias", "canary", "--reason", "error rate above threshold")
    assert crashy.aliases()["canary"] == 1
    refused = last_json(crashy.pipeline("--step", "promote", "canary_min_age_s=0"))
    assert refused["status"] == "refused" and "rolled back" in refused["reason"]
    assert "production" not in crashy.aliases()


def test_single_steps_follow_the_same_cycle(crashy):
    """What each Airflow task runs: one step of the open cycle, refusing to skip ahead."""
    crashy.arrive(6)
    assert last_json(crashy.pipeline("--step", "train"))["decision"] == "no_new_data"  # no cycle open yet
    opened = last_json(crashy.pipeline("--step", "ingest"))
    assert opened["decision"] == "incomplete" and opened["cycle"]
    assert last_json(crashy.pipeline("--step", "ingest"))["cycle"] == opened["cycle"]  # idempotent
    missing = crashy.pipeline("--step", "train", check=False)
    assert missing.returncode == 1 and "needs step 'prepare' first" in missing.stderr
    whole = last_json(crashy.pipeline())  # a whole run continues the cycle the single steps opened
    assert whole["cycle"] == opened["cycle"] and whole["decision"] in ("pass", "refuse")
    out = crashy.root / "gate.json"
    gate = last_json(crashy.pipeline("--step", "gate", "--json-out", str(out)))
    assert gate["decision"] == "no_new_data"  # the cycle closed: the branch reads the decision either way
    reused = json.loads((crashy.root / "state" / "cycles" / opened["cycle"] / "gate.json").read_text())
    assert reused["decision"] == whole["decision"] and json.loads(out.read_text())["decision"] == "no_new_data"
