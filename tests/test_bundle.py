"""Bundles: a trained run exported through the real CLI loads with torch alone, scores exactly as
the eager model, and is refused when tampered with or of an unknown version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recforge import bundle, jobs
from recforge.data.batches import SplitData

WORLD = ["data.generate.users=800", "data.generate.items=300", "data.generate.events=20000", "data.generate.days=6",
         "train.epochs=1", "train.batch_size=512", "train.progress=false"]


def _recforge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("recforge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "recforge.cli"]
    env = {**os.environ, "COLUMNS": "200", "RECFORGE_DEBUG": ""}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny world, a DNN ranker and a two-tower model trained on it, both exported."""
    work = tmp_path_factory.mktemp("bundle")
    common = [f"workdir={work}", *WORLD]
    _ok(_recforge("data", "generate", *common, cwd=work))
    _ok(_recforge("data", "prepare", *common, cwd=work))
    _ok(_recforge("train", *common, f"run_dir={work / 'dnn'}", cwd=work))
    _ok(_recforge("train", *common, "model.name=two_tower", f"run_dir={work / 'tt'}", cwd=work))
    for run in ("dnn", "tt"):
        out = _ok(_recforge("export", "--run", str(work / run), "--out", str(work / "bundles" / run), cwd=work))
        (work / f"{run}.export.json").write_text(out.stdout)
    return work


def _copy(work: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(work / "bundles" / name, target)
    return target


def test_export_prints_one_json_line_and_writes_a_complete_bundle(work: Path) -> None:
    line = (work / "dnn.export.json").read_text().strip()
    assert "\n" not in line
    summary = json.loads(line)
    assert summary["bundle"] == str(work / "bundles" / "dnn")
    assert summary["kind"] == "ranker" and summary["model_name"] == "dnn" and summary["schema_version"] == 1
    root = work / "bundles" / "dnn"
    manifest = json.loads((root / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    for name in ("model.pt", "features.json", "config.json", "metrics.json", "data.json", "env.json",
                 "vocab/item_id.json", "vocab/user_id.json"):
        assert name in listed, name
    data = json.loads((root / "data.json").read_text())
    assert data["rows"] == 20000 and set(data["split"]) == {"train", "valid", "test"}
    assert json.loads((root / "config.json").read_text())["model"]["name"] == "dnn"


def test_no_temporary_directories_are_left_behind(work: Path) -> None:
    assert sorted(p.name for p in (work / "bundles").iterdir()) == ["dnn", "tt"]
    assert not [p for p in (work / "bundles").rglob(".tmp-*")]


def test_export_refuses_to_overwrite_a_bundle(work: Path) -> None:
    before = (work / "bundles" / "dnn" / "manifest.json").read_bytes()
    proc = _recforge("export", "--run", str(work / "dnn"), "--out", str(work / "bundles" / "dnn"), cwd=work)
    assert proc.returncode == 1
    assert "already exists" in proc.stderr
    assert (work / "bundles" / "dnn" / "manifest.json").read_bytes() == before


# Run in a fresh interpreter where the training side cannot be imported at all.
_LOAD_WITHOUT_TRAINING = """
import sys, json
import importlib.abc

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in FORBIDDEN or any(name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError(f"{name} must not be imported when loading a bundle")
        return None

FORBIDDEN = ("recforge.models", "recforge.train", "recforge.nn", "recforge.jobs", "recforge.data.prepare",
             "recforge.data.validate", "recforge.data.sources")
sys.meta_path.insert(0, Refuse())
import torch
from recforge.bundle import load_bundle

b = load_bundle(sys.argv[1])
inputs = torch.load(sys.argv[2])
logits = b.score(inputs["categorical"], inputs["numeric"])
torch.save(logits, sys.argv[3])
user = b.vocab["user_id"]
print(json.dumps({"kind": b.kind, "modules": sorted(m for m in sys.modules if m.startswith("recforge")),
                  "first_user_row": user.lookup([user.keys[0], "no-such-user", None])}))
"""


def test_bundle_loads_without_training_code_and_matches_the_eager_model(work: Path, tmp_path: Path) -> None:
    run_cfg = jobs.load_run_config(work / "dnn")
    test = SplitData.load(run_cfg.resolved_prepared_dir, "test")
    rows = test.batch(torch.arange(len(test)))
    torch.save({"categorical": rows.categorical, "numeric": rows.numeric}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_TRAINING)
    proc = _ok(subprocess.run([sys.executable, str(script), str(work / "bundles" / "dnn"), str(tmp_path / "inputs.pt"),
                               str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=120))
    report = json.loads(proc.stdout)
    assert report["kind"] == "ranker"
    assert not [m for m in report["modules"] if m.startswith(("recforge.models", "recforge.train", "recforge.jobs"))]
    assert report["first_user_row"] == [1, 0, 0]
    with torch.no_grad():
        eager = jobs.load_trained_model(work / "dnn")(rows.categorical, rows.numeric)
    scripted = torch.load(tmp_path / "logits.pt")
    assert scripted.shape == eager.shape == (len(test),)
    torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("victim", ["vocab/item_id.json", "model.pt"])
def test_a_tampered_file_is_refused_naming_it(work: Path, tmp_path: Path, victim: str) -> None:
    root = _copy(work, "dnn", tmp_path)
    expected = json.loads((root / "manifest.json").read_text())["files"][victim]
    raw = bytearray((root / victim).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (root / victim).write_bytes(bytes(raw))
    with pytest.raises(bundle.BundleError) as err:
        bundle.load_bundle(root)
    assert victim in str(err.value) and expected in str(err.value)


def test_a_missing_file_is_refused(work: Path, tmp_path: Path) -> None:
    root = _copy(work, "dnn", tmp_path)
    (root / "vocab" / "user_id.json").unlink()
    with pytest.raises(bundle.BundleError, match="vocab/user_id.json"):
        bundle.load_bundle(root)


def test_an_unknown_schema_version_is_refused(work: Path, tmp_path: Path) -> None:
    root = _copy(work, "dnn", tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle.BundleError, match=r"schema_version 99.*schema_version 1"):
        bundle.load_bundle(root)


def test_a_missing_manifest_is_refused(work: Path, tmp_path: Path) -> None:
    root = _copy(work, "dnn", tmp_path)
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        bundle.load_bundle(root)


def test_export_refuses_a_model_whose_script_differs(work: Path, tmp_path: Path) -> None:
    """Parity is enforced: an eager model whose forward diverges from its scripted form is refused."""

    class Diverging(torch.nn.Module):
        def forward(self, categorical: torch.Tensor, numeric: torch.Tensor, history_values: torch.Tensor | None = None,
                    history_offsets: torch.Tensor | None = None) -> torch.Tensor:
            bump = 0.0 if torch.jit.is_scripting() else 1.0
            return categorical.float().sum(1) + bump

    prepared = jobs.load_run_config(work / "dnn").resolved_prepared_dir
    inputs = (torch.ones(4, 2, dtype=torch.long), torch.zeros(4, 1), None, None)
    with pytest.raises(bundle.BundleError, match="parity"):
        bundle.write_bundle(Diverging(), tmp_path / "b", model_name="x", features={}, vocab_dir=prepared / "vocab",
                            config={}, metrics={}, data_fingerprint={}, parity_inputs=inputs)
    assert list(tmp_path.iterdir()) == []


def test_two_tower_bundle_searches_like_the_eager_model(work: Path) -> None:
    loaded = bundle.load_bundle(work / "bundles" / "tt")
    assert loaded.kind == "retrieval" and loaded.index is not None and loaded.item_features is not None
    eager = jobs.load_trained_model(work / "tt")
    prepared = jobs.load_run_config(work / "tt").resolved_prepared_dir
    test = SplitData.load(prepared, "test")
    rows = test.batch(torch.arange(64))
    with torch.no_grad():
        users = loaded.module.user_vector(rows.categorical, rows.numeric, None, None).numpy()
        expected_users = eager.user_vector(rows.categorical, rows.numeric).numpy()
        items = eager.item_vector(torch.from_numpy(loaded.item_features)).numpy()[1:]
    np.testing.assert_allclose(users, expected_users, atol=1e-5)
    _, ids = loaded.index.search(users, 10)
    exact = np.argsort(-(expected_users @ items.T), axis=1, kind="stable")[:, :10]
    assert (ids >= 0).all()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert overlap > 0.99
