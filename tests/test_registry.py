"""The model registry: numbered versions that concurrent publishers never share, half-written versions
that nobody sees, verified bundles only, alias moves that are atomic, recorded and reversible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recforge import registry as reg
from recforge.bundle import BundleError, write_bundle
from recforge.config import ModelConfig
from recforge.data.vocab import Vocab
from recforge.features import FeatureLayout
from recforge.models import build_model


def _make_bundle(out: Path, *, lr: float = 0.001, auc: float = 0.7, seed: int = 0) -> Path:
    """A real bundle from a tiny eager DNN (no training: what matters here is the bundle format)."""
    vocab_dir = out.parent / f"{out.name}-vocab"
    vocab_dir.mkdir(parents=True)
    Vocab.fit("user_id", pa.array(["a", "b", "c"])).save(vocab_dir / "user_id.json")
    torch.manual_seed(seed)
    spec = FeatureLayout(categorical=("user_id", "item_id"), cardinalities=(4, 4), numeric=("x",))
    model = build_model(spec, ModelConfig(embedding_dim=4, hidden=[8]))
    inputs = (torch.tensor([[1, 2], [3, 0]]), torch.zeros(2, 1), None, None)
    return write_bundle(model, out, model_name="dnn", features={"categorical": ["user_id", "item_id"]},
                        vocab_dir=vocab_dir, config={"model": {"name": "dnn", "embedding_dim": 4},
                                                     "train": {"lr": lr, "epochs": 1}},
                        metrics={"model": {"auc": auc, "logloss": 0.5}}, data_fingerprint={}, parity_inputs=inputs)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bundles")
    return {"a": _make_bundle(base / "a"), "b": _make_bundle(base / "b", lr=0.01, auc=0.75, seed=1)}


def test_publish_twice_gives_versions_1_and_2(tmp_path: Path, bundles: dict[str, Path]) -> None:
    assert reg.publish(tmp_path, bundles["a"], "ranker", note="first") == 1
    assert reg.publish(tmp_path, bundles["b"], "ranker") == 2
    versions = reg.list_versions(tmp_path, "ranker")
    assert [v.number for v in versions] == [1, 2]
    assert versions[0].note == "first" and versions[0].kind == "ranker"
    assert versions[1].metrics == {"model.auc": 0.75, "model.logloss": 0.5}
    assert reg.resolve(tmp_path, "ranker", "latest") == tmp_path / "ranker" / "versions" / "2"
    assert reg.resolve(tmp_path, "ranker", 1) == tmp_path / "ranker" / "versions" / "1"
    stored = tmp_path / "ranker" / "versions" / "1"
    assert (stored / "COMMITTED").is_file() and json.loads((stored / "registry.json").read_text())["note"] == "first"
    assert not list((tmp_path / "ranker" / "versions").glob(".tmp-*"))
    assert reg.list_models(tmp_path) == ["ranker"]


def test_concurrent_publishers_get_distinct_consecutive_numbers(tmp_path: Path, bundles: dict[str, Path]) -> None:
    barrier = threading.Barrier(8)
    results: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(reg.publish(tmp_path, bundles["a"], "ranker"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == list(range(1, 9))
    assert [v.number for v in reg.list_versions(tmp_path, "ranker")] == list(range(1, 9))


def test_a_slot_claimed_by_another_publisher_is_skipped(tmp_path: Path, bundles: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Another publisher claims number 1 between our listing and our claim: we must take 2.
    real = reg.LocalStore.create_if_absent

    def racing(self: reg.LocalStore, key: str, data: bytes | None = None) -> bool:
        if key == "ranker/versions/1" and not (self.root / "ranker" / "versions" / "1").exists():
            real(self, key)
        return real(self, key, data)

    monkeypatch.setattr(reg.LocalStore, "create_if_absent", racing)
    assert reg.publish(tmp_path, bundles["a"], "ranker") == 2
    assert not any((tmp_path / "ranker" / "versions" / "1").iterdir())


def test_tampered_bundle_is_refused_and_nothing_is_created(tmp_path: Path, bundles: dict[str, Path]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundles["a"], bad)
    with open(bad / "config.json", "a") as handle:
        handle.write(" ")
    root = tmp_path / "registry"
    with pytest.raises(BundleError, match="does not match manifest.json"):
        reg.publish(root, bad, "ranker")
    assert not root.exists()
    manifest = json.loads((bundles["a"] / "manifest.json").read_text())
    unknown = tmp_path / "unknown"
    shutil.copytree(bundles["a"], unknown)
    (unknown / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99"):
        reg.publish(root, unknown, "ranker")
    assert not root.exists()


def test_half_written_version_is_invisible_and_does_not_block(tmp_path: Path, bundles: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    reg.publish(tmp_path, bundles["a"], "ranker")
    versions = tmp_path / "ranker" / "versions"
    # A publisher that crashed after claiming 3 and copying part of the bundle, without the marker.
    (versions / "3").mkdir()
    shutil.copyfile(bundles["a"] / "manifest.json", versions / "3" / "manifest.json")
    # And one that crashes mid-copy right now.
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(reg.shutil, "copytree", crash)
    with pytest.raises(OSError, match="disk full"):
        reg.publish(tmp_path, bundles["a"], "ranker")
    monkeypatch.undo()
    assert [v.number for v in reg.list_versions(tmp_path, "ranker")] == [1, 2]
    assert reg.resolve(tmp_path, "ranker", "latest").name == "2"
    for number in (3, 4):
        with pytest.raises(reg.RegistryError, match=f"no version {number}"):
            reg.resolve(tmp_path, "ranker", number)
    with pytest.raises(reg.RegistryError, match="no version 3"):
        reg.promote(tmp_path, "ranker", 3)
    assert not list(versions.glob(".tmp-*"))
    assert reg.publish(tmp_path, bundles["a"], "ranker") == 5
    assert [v.number for v in reg.list_versions(tmp_path, "ranker")] == [1, 2, 5]


def test_promote_and_rollback_move_the_alias_and_record_history(tmp_path: Path, bundles: dict[str, Path]) -> None:
    for _ in range(3):
        reg.publish(tmp_path, bundles["a"], "ranker")
    with pytest.raises(reg.RegistryError, match="no promotion to roll back"):
        reg.rollback(tmp_path, "ranker")
    reg.promote(tmp_path, "ranker", 1, reason="launch")
    reg.promote(tmp_path, "ranker", 2, reason="better auc")
    reg.promote(tmp_path, "ranker", "latest", reason="retrain")
    reg.promote(tmp_path, "ranker", 3, alias="canary")
    assert reg.resolve(tmp_path, "ranker", "production").name == "3"
    assert json.loads((tmp_path / "ranker" / "aliases.json").read_text()) == {"production": 3, "canary": 3}
    record = reg.rollback(tmp_path, "ranker", reason="regression")
    assert (record["from"], record["to"], record["reason"]) == (3, 2, "regression")
    assert reg.resolve(tmp_path, "ranker", "production").name == "2"
    assert reg.resolve(tmp_path, "ranker", "canary").name == "3"  # other aliases untouched
    reg.rollback(tmp_path, "ranker")
    assert reg.resolve(tmp_path, "ranker", "production").name == "1"
    with pytest.raises(reg.RegistryError, match="before its first promotion"):
        reg.rollback(tmp_path, "ranker")
    lines = (tmp_path / "ranker" / "history.jsonl").read_text().splitlines()
    moves = [(r["alias"], r["from"], r["to"], r["reason"], r["action"]) for r in map(json.loads, lines)]
    assert moves == [("production", None, 1, "launch", "promote"), ("production", 1, 2, "better auc", "promote"),
                     ("production", 2, 3, "retrain", "promote"), ("canary", None, 3, "", "promote"),
                     ("production", 3, 2, "regression", "rollback"), ("production", 2, 1, "", "rollback")]
    assert all(r["time"] and r["user"] for r in map(json.loads, lines))
    assert [v.aliases for v in reg.list_versions(tmp_path, "ranker")] == [["production"], [], ["canary"]]
    assert not (tmp_path / "ranker" / ".aliases.lock").exists()


def test_rolling_back_a_first_canary_withdraws_it(tmp_path: Path, bundles: dict[str, Path]) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    reg.publish(tmp_path, bundles["a"], "ranker")
    reg.promote(tmp_path, "ranker", 1)
    reg.promote(tmp_path, "ranker", 2, alias="canary")
    record = reg.rollback(tmp_path, "ranker", alias="canary", reason="error rate")
    assert (record["alias"], record["from"], record["to"], record["action"]) == ("canary", 2, None, "rollback")
    assert json.loads((tmp_path / "ranker" / "aliases.json").read_text()) == {"production": 1}
    with pytest.raises(reg.RegistryError):
        reg.resolve(tmp_path, "ranker", "canary")
    with pytest.raises(reg.RegistryError, match="no promotion to roll back"):
        reg.rollback(tmp_path, "ranker", alias="canary")  # the withdrawal is itself a rollback: nothing left


def test_promote_refuses_missing_or_corrupted_versions(tmp_path: Path, bundles: dict[str, Path]) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    with pytest.raises(reg.RegistryError, match="no version 7"):
        reg.promote(tmp_path, "ranker", 7)
    with pytest.raises(reg.RegistryError, match="not in the registry"):
        reg.promote(tmp_path, "other", 1)
    with pytest.raises(reg.RegistryError, match="invalid model name"):
        reg.publish(tmp_path, bundles["a"], "../escape")
    (tmp_path / "ranker" / "versions" / "1" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(reg.RegistryError, match="refusing 'ranker' version 1: .*model.pt does not match"):
        reg.promote(tmp_path, "ranker", 1)
    assert not (tmp_path / "ranker" / "aliases.json").exists()
    assert not (tmp_path / "ranker" / "history.jsonl").exists()


def test_stale_lock_is_broken_but_a_live_one_waits(tmp_path: Path, bundles: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    lock = tmp_path / "ranker" / ".aliases.lock"
    lock.write_text(json.dumps({"token": "crashed", "unix": 0}))
    reg.promote(tmp_path, "ranker", 1)
    assert not lock.exists()
    lock.write_text(json.dumps({"token": "live", "unix": 1e12}))
    monkeypatch.setattr(reg, "LOCK_WAIT_S", 0.1)
    with pytest.raises(reg.RegistryError, match="locked"):
        reg.promote(tmp_path, "ranker", 1, alias="canary")
    assert lock.exists() and "canary" not in json.loads((tmp_path / "ranker" / "aliases.json").read_text())


def test_diff_shows_differing_config_and_all_metrics(tmp_path: Path, bundles: dict[str, Path]) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    reg.publish(tmp_path, bundles["b"], "ranker")
    reg.promote(tmp_path, "ranker", 1)
    result = reg.diff(tmp_path, "ranker", "production", "latest")
    assert (result["a"]["version"], result["b"]["version"]) == (1, 2)
    assert result["config"] == {"train.lr": [0.001, 0.01]}
    assert result["metrics"] == {"model.auc": [0.7, 0.75], "model.logloss": [0.5, 0.5]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("recforge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    env = {**os.environ, "COLUMNS": "200", "RECFORGE_DEBUG": ""}
    return subprocess.run([*cmd, "registry", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_round_trip(tmp_path: Path, bundles: dict[str, Path]) -> None:
    root = str(tmp_path / "reg")
    for name in ("a", "b"):
        proc = _cli("publish", "ranker", str(bundles[name]), "--registry", root, "--note", f"bundle {name}")
        assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 2
    assert _cli("promote", "ranker", "1", "--registry", root, "--reason", "launch").returncode == 0
    assert _cli("promote", "ranker", "2", "--registry", root).returncode == 0
    listed = json.loads(_cli("list", "ranker", "--registry", root, "--json").stdout)
    assert [(v["number"], v["aliases"], v["note"]) for v in listed] == [(1, [], "bundle a"),
                                                                        (2, ["production"], "bundle b")]
    rolled = _cli("rollback", "ranker", "--registry", root, "--reason", "bad canary")
    assert rolled.returncode == 0 and json.loads(rolled.stdout)["to"] == 1
    shown = json.loads(_cli("show", "ranker", "production", "--registry", root, "--json").stdout)
    assert shown["number"] == 1 and shown["aliases"] == ["production"]
    diffed = _cli("diff", "ranker", "1", "2", "--registry", root)
    assert diffed.returncode == 0 and "train.lr" in diffed.stdout and "model.auc" in diffed.stdout
    missing = _cli("promote", "ranker", "9", "--registry", root)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "no version 9" in missing.stderr
    bad = tmp_path / "bad"
    shutil.copytree(bundles["a"], bad)
    (bad / "metrics.json").write_text("{}")
    refused = _cli("publish", "ranker", str(bad), "--registry", root)
    assert refused.returncode == 1 and "does not match manifest.json" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0


def test_publish_refuses_links_and_files_the_manifest_does_not_list(tmp_path: Path, bundles: dict[str, Path]) -> None:
    root = tmp_path / "registry"
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0")
    linked = tmp_path / "linked"
    shutil.copytree(bundles["a"], linked)
    (linked / "passwd").symlink_to(secret)
    with pytest.raises(BundleError, match="passwd is a symbolic link"):
        reg.publish(root, linked, "ranker")
    extra = tmp_path / "extra"
    shutil.copytree(bundles["a"], extra)
    vocab = json.loads((extra / "vocab" / "user_id.json").read_text())
    (extra / "vocab" / "zz_user_id.json").write_text(json.dumps({**vocab, "keys": ["z"]}))
    with pytest.raises(BundleError, match="does not list: vocab/zz_user_id.json"):
        reg.publish(root, extra, "ranker")
    assert not root.exists()


def test_store_copy_refuses_links_even_past_publish(tmp_path: Path, bundles: dict[str, Path]) -> None:
    linked = tmp_path / "linked"
    shutil.copytree(bundles["a"], linked)
    (linked / "certs").symlink_to(tmp_path, target_is_directory=True)
    store = reg.LocalStore(tmp_path / "registry")
    assert store.create_if_absent("ranker/versions/1")
    with pytest.raises(OSError, match="certs is a symbolic link"):
        store.put_dir(linked, "ranker/versions/1", {})
    assert list((tmp_path / "registry" / "ranker" / "versions" / "1").iterdir()) == []


def test_promote_refuses_a_version_with_a_file_dropped_in(tmp_path: Path, bundles: dict[str, Path]) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    stored = tmp_path / "ranker" / "versions" / "1"
    (stored / "vocab" / "zz_item_id.json").write_text("{}")
    with pytest.raises(reg.RegistryError, match="refusing 'ranker' version 1: .*vocab/zz_item_id.json"):
        reg.promote(tmp_path, "ranker", 1)
    (stored / "vocab" / "zz_item_id.json").unlink()
    assert reg.promote(tmp_path, "ranker", 1)["to"] == 1  # the registry's own files are no intruders


def test_a_torn_history_line_is_reported_and_the_rest_kept(tmp_path: Path, bundles: dict[str, Path],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        reg.publish(tmp_path, bundles["a"], "ranker")
    reg.promote(tmp_path, "ranker", 1)
    reg.promote(tmp_path, "ranker", 2)
    path = tmp_path / "ranker" / "history.jsonl"
    path.write_bytes(path.read_bytes() + b'{"alias": "production", "fr')  # torn outside recforge, no newline
    reg.promote(tmp_path, "ranker", 3, reason="after the tear")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["reason"] == "after the tear"
    with caplog.at_level("WARNING", logger="recforge.registry"):
        moves = reg.history(tmp_path, "ranker")
    assert [(m["from"], m["to"]) for m in moves] == [(None, 1), (1, 2), (2, 3)]
    assert f"{path} line 3" in caplog.text
    assert reg.rollback(tmp_path, "ranker")["to"] == 2


@pytest.mark.parametrize("content", [b'{"production": 1, "can', b"", b'{"production": 1, "\xff": 2}'])
def test_a_damaged_aliases_file_is_named(tmp_path: Path, bundles: dict[str, Path], content: bytes) -> None:
    reg.publish(tmp_path, bundles["a"], "ranker")
    (tmp_path / "ranker" / "aliases.json").write_bytes(content)
    with pytest.raises(ValueError, match="aliases.json: (not valid JSON|empty|not UTF-8)"):
        reg.resolve(tmp_path, "ranker", "production")
    (tmp_path / "ranker" / "aliases.json").unlink()
    manifest = tmp_path / "ranker" / "versions" / "1" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"manifest.json: not valid JSON \(Unterminated string"):
        reg.show(tmp_path, "ranker", 1)


def test_names_and_versions_are_checked_whole(tmp_path: Path, bundles: dict[str, Path]) -> None:
    with pytest.raises(reg.RegistryError, match="invalid model name"):
        reg.publish(tmp_path, bundles["a"], "ranker\n")
    reg.publish(tmp_path, bundles["a"], "ranker")
    with pytest.raises(reg.RegistryError, match="invalid alias"):
        reg.promote(tmp_path, "ranker", 1, alias="canary\n")
    for version in ("²", "v²", "١"):
        with pytest.raises(reg.RegistryError, match="ASCII digits"):
            reg.resolve(tmp_path, "ranker", version)
    (tmp_path / "ranker" / "versions" / "²").mkdir()  # a stray slot name is not a version
    assert [v.number for v in reg.list_versions(tmp_path, "ranker")] == [1]
    assert not (tmp_path / "ranker" / "aliases.json").exists()
