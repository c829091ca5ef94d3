"""The registry on an S3-compatible store (a real SeaweedFS): the same behaviour as on a directory,
with conditional PUTs for version claims and history, and verified local copies for serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_registry import _make_bundle

from recforge import registry as reg
from recforge import storage
from recforge.bundle import BundleError, load_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("s3-bundles")
    return {"a": _make_bundle(base / "a"), "b": _make_bundle(base / "b", lr=0.01, auc=0.75, seed=1)}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("recforge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "160", "RECFORGE_DEBUG": ""})


def _ok(*args: str) -> str:
    proc = _cli(*args)
    assert proc.returncode == 0, f"recforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_cli_publish_promote_rollback_diff_history_on_s3(s3_prefix: str, bundles: dict[str, Path]) -> None:
    root = f"{s3_prefix}/registry"
    first = json.loads(_ok("registry", "publish", "ranker", str(bundles["a"]), "-r", root, "--note", "first"))
    assert first == {"model": "ranker", "version": 1, "path": f"{root}/ranker/versions/1"}
    assert json.loads(_ok("registry", "publish", "ranker", str(bundles["b"]), "-r", root))["version"] == 2
    reg.promote(root, "ranker", 1, reason="launch")  # in-process: the CLI's promote is exercised just below
    _ok("registry", "promote", "ranker", "2", "-r", root, "--reason", "better auc")
    listed = json.loads(_ok("registry", "list", "ranker", "-r", root, "--json"))
    assert [(v["number"], v["aliases"], v["note"]) for v in listed] == [(1, [], "first"), (2, ["production"], "")]
    assert listed[1]["metrics"]["model.auc"] == 0.75
    back = json.loads(_ok("registry", "rollback", "ranker", "-r", root, "--reason", "latency"))
    assert (back["from"], back["to"]) == (2, 1)
    shown = json.loads(_ok("registry", "show", "ranker", "production", "-r", root, "--json"))
    assert shown["number"] == 1 and shown["aliases"] == ["production"]
    diff = json.loads(_ok("registry", "diff", "ranker", "1", "2", "-r", root, "--json"))
    assert diff["config"]["train.lr"] == [0.001, 0.01] and diff["metrics"]["model.auc"] == [0.7, 0.75]
    history = json.loads(_ok("registry", "history", "ranker", "-r", root, "--json"))
    assert [(h["action"], h["from"], h["to"], h["reason"]) for h in history] == [
        ("promote", None, 1, "launch"), ("promote", 1, 2, "better auc"), ("rollback", 2, 1, "latency")]
    table = _ok("registry", "history", "ranker", "-r", root)
    assert "better auc" in table and "rollback" in table
    # One object per event, listed in order.
    assert storage.list_dir(f"{root}/ranker/history") == ["00000001.json", "00000002.json", "00000003.json"]
    assert json.loads(_ok("registry", "gc", "ranker", "-r", root, "--older-than", "0")) == {"model": "ranker",
                                                                                          "removed": []}
    missing = _cli("registry", "show", "ranker", "7", "-r", root)
    assert missing.returncode == 1 and "has no version 7" in missing.stderr


_PUBLISH = """
import os, sys, time
from recforge import registry
import recforge.bundle  # the slow imports happen before the start line
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.001)
print(registry.publish(sys.argv[1], sys.argv[2], "ranker"), flush=True)
"""


@pytest.mark.slow
def test_concurrent_publisher_processes_get_distinct_gap_free_numbers(s3_prefix: str, bundles: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    root = f"{s3_prefix}/registry"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISH, root, str(bundles["a"]), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    go.touch()  # all four claim at once
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(int(out.strip()) for out, _ in outputs) == [1, 2, 3, 4]
    assert [v.number for v in reg.list_versions(root, "ranker")] == [1, 2, 3, 4]


def test_threads_racing_for_claims_never_share_a_number(s3_prefix: str, bundles: dict[str, Path]) -> None:
    root = f"{s3_prefix}/registry"
    with ThreadPoolExecutor(6) as pool:
        numbers = list(pool.map(lambda _: reg.publish(root, bundles["a"], "ranker"), range(6)))
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]


def test_corrupted_bundle_is_refused_and_never_aliased(s3_prefix: str, bundles: dict[str, Path],
                                                       tmp_path: Path) -> None:
    root = f"{s3_prefix}/registry"
    bad = tmp_path / "bad"
    shutil.copytree(bundles["a"], bad)
    with open(bad / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(BundleError, match="does not match manifest.json"):
        reg.publish(root, bad, "ranker")
    assert storage.list_dir(root) == []  # nothing claimed, nothing uploaded

    assert reg.publish(root, bundles["a"], "ranker") == 1
    assert reg.publish(root, bundles["b"], "ranker") == 2
    reg.promote(root, "ranker", 1)
    storage.put_bytes(f"{root}/ranker/versions/2/model.pt", b"corrupted on the store")
    with pytest.raises(reg.RegistryError, match="refusing 'ranker' version 2: .*model.pt does not match"):
        reg.promote(root, "ranker", 2)
    assert [v.aliases for v in reg.list_versions(root, "ranker")] == [["production"], []]
    assert [(h["from"], h["to"]) for h in reg.history(root, "ranker")] == [(None, 1)]
    with pytest.raises(storage.StorageError, match="does not match"):
        reg.resolve(root, "ranker", 2)  # a corrupt version is never handed to a server either


def test_resolve_gives_a_verified_cached_copy(s3_prefix: str, bundles: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFORGE_CACHE", str(tmp_path / "cache"))
    root = f"{s3_prefix}/registry"
    reg.publish(root, bundles["a"], "ranker")
    reg.promote(root, "ranker", 1)
    with ThreadPoolExecutor(4) as pool:  # concurrent first use: one download wins, all get the same copy
        paths = set(pool.map(lambda _: reg.resolve(root, "ranker", "production"), range(4)))
    (path,) = paths
    assert path.is_relative_to(tmp_path / "cache") and (path / "COMMITTED").is_file()
    assert load_bundle(path).manifest["model_name"] == "dnn"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert reg.location(root, "ranker", "production") == f"{root}/ranker/versions/1"


def test_crashed_publish_slot_is_hidden_does_not_block_and_gc_removes_it(s3_prefix: str,
                                                                         bundles: dict[str, Path]) -> None:
    root = f"{s3_prefix}/registry"
    assert reg.publish(root, bundles["a"], "ranker") == 1
    store = reg.S3Store(root)
    assert store.create_if_absent("ranker/versions/2")  # a publisher claimed 2, uploaded a file, then died
    storage.put_bytes(f"{root}/ranker/versions/2/model.pt", b"partial")
    assert [v.number for v in reg.list_versions(root, "ranker")] == [1]
    assert reg.resolve(root, "ranker", "latest").name == "1"
    assert reg.publish(root, bundles["b"], "ranker") == 3
    assert reg.gc(root, "ranker") == []  # too recent: it could be a slow publisher
    assert reg.gc(root, "ranker", older_than_s=0) == [2]
    assert storage.list_dir(f"{root}/ranker/versions") == ["1", "3"]
    assert [v.number for v in reg.list_versions(root, "ranker")] == [1, 3]


def test_alias_file_is_compare_and_swapped(s3_prefix: str) -> None:
    # Two promoters that both believe they hold the lock (one held it past its expiry): the one whose
    # read is stale cannot overwrite the other's move.
    first, second = reg.S3Store(s3_prefix), reg.S3Store(s3_prefix)
    with pytest.raises(FileNotFoundError):
        first.get("ranker/aliases.json")
    with pytest.raises(FileNotFoundError):
        second.get("ranker/aliases.json")
    second.replace("ranker/aliases.json", b'{"production": 1}')
    with pytest.raises(storage.ConflictError, match="changed by another writer"):
        first.replace("ranker/aliases.json", b'{"production": 2}')
    assert json.loads(first.get("ranker/aliases.json")) == {"production": 1}
    first.replace("ranker/aliases.json", b'{"production": 2}')  # after a fresh read it goes through
    second.get("ranker/aliases.json")
    first.replace("ranker/aliases.json", b'{"production": 4}')  # first's own last write is what it knows
    with pytest.raises(storage.ConflictError):
        second.replace("ranker/aliases.json", b'{"production": 3}')
    assert json.loads(second.get("ranker/aliases.json")) == {"production": 4}
