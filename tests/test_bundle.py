"""Bundles: a trained run exported through the real CLI loads with torch alone (and onnxruntime for
the ONNX runtime), scores exactly as the eager model, carries the item catalog and cold-start
popularity tables, and is refused when tampered with or of an unknown version."""

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

from recforge import bundle
from recforge.data.batches import SplitData
from recforge.recipes.runs import feature_layout, item_catalog, load_run_config, load_trained_model

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
        out = _ok(_recforge("export", "--run", str(work / run), "--out", str(work / "bundles" / run),
                            "--format", "onnx", "--parity-rows", "500", cwd=work))
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
    assert summary["kind"] == "ranker" and summary["model_name"] == "dnn" and summary["schema_version"] == 2
    assert summary["formats"] == ["torchscript", "onnx"]
    assert summary["onnx_parity_max_abs_diff"]["logits"] <= 1e-5
    root = work / "bundles" / "dnn"
    manifest = json.loads((root / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    for name in ("model.pt", "model.onnx", "features.json", "config.json", "metrics.json", "data.json", "env.json",
                 "vocab/item_id.json", "vocab/user_id.json", "item_features.npy", "popularity/overall.npy",
                 "popularity/hour.npy", "popularity/device.npy"):
        assert name in listed, name
    data = json.loads((root / "data.json").read_text())
    assert data["rows"] == 20000 and set(data["split"]) == {"train", "valid", "test"}
    assert json.loads((root / "config.json").read_text())["model"]["name"] == "dnn"
    onnx = manifest["onnx"]
    assert onnx["files"] == {"model.onnx": "forward"} and onnx["parity_rows"] == 500
    assert onnx["parity_rows"] != onnx["export_batch"]  # parity ran on another batch size than the traced one
    assert manifest["popularity"] == {"overall": "popularity/overall.npy", "hour": "popularity/hour.npy",
                                      "device": "popularity/device.npy"}


def test_catalog_and_popularity_match_the_training_data(work: Path) -> None:
    loaded = bundle.load_bundle(work / "bundles" / "dnn")
    prepared = load_run_config(work / "dnn").resolved_prepared_dir
    features = feature_layout(prepared)
    np.testing.assert_array_equal(loaded.item_features, item_catalog(prepared, features).numpy())
    assert loaded.item_features.dtype == np.int64 and loaded.item_features[0, 0] == 0
    train = SplitData.load(prepared, "train")
    positives = train.categorical[train.label > 0].numpy()
    item, hour = features.categorical.index("item_id"), features.categorical.index("hour")
    n_items = features.cardinalities[item]
    overall = loaded.popularity["overall"]
    assert overall.dtype == np.float32 and overall.shape == (n_items,)
    np.testing.assert_array_equal(overall, np.bincount(positives[:, item], minlength=n_items))
    by_hour = loaded.popularity["hour"]
    assert by_hour.shape == (features.cardinalities[hour], n_items)
    h, i = positives[0, hour], positives[0, item]
    assert by_hour[h, i] == np.sum((positives[:, hour] == h) & (positives[:, item] == i)) > 0
    for name in ("hour", "device"):  # every positive has exactly one value of each context field
        np.testing.assert_array_equal(loaded.popularity[name].sum(0), overall)


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

FORBIDDEN = ("recforge.models", "recforge.train", "recforge.nn", "recforge.recipes", "recforge.data.prepare",
             "recforge.data.validate", "recforge.data.sources")
sys.meta_path.insert(0, Refuse())
import torch
from recforge.bundle import load_bundle

b = load_bundle(sys.argv[1], runtime=sys.argv[4])
inputs = torch.load(sys.argv[2])
logits = b.score(inputs["categorical"], inputs["numeric"])
torch.save(logits, sys.argv[3])
user = b.vocab["user_id"]
print(json.dumps({"kind": b.kind, "modules": sorted(m for m in sys.modules if m.startswith("recforge")),
                  "first_user_row": user.lookup([user.keys[0], "no-such-user", None]),
                  "onnx": b.onnx is not None, "catalog": list(b.item_features.shape),
                  "popularity": {k: list(v.shape) for k, v in sorted(b.popularity.items())},
                  "onnxruntime_imported": "onnxruntime" in sys.modules}))
"""


@pytest.mark.parametrize("runtime", ["torchscript", "onnx"])
def test_bundle_loads_without_training_code_and_matches_the_eager_model(work: Path, tmp_path: Path,
                                                                         runtime: str) -> None:
    run_cfg = load_run_config(work / "dnn")
    prepared = run_cfg.resolved_prepared_dir
    test = SplitData.load(prepared, "test")
    rows = test.batch(torch.arange(len(test)))
    torch.save({"categorical": rows.categorical, "numeric": rows.numeric}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_TRAINING)
    proc = _ok(subprocess.run([sys.executable, str(script), str(work / "bundles" / "dnn"), str(tmp_path / "inputs.pt"),
                               str(tmp_path / "logits.pt"), runtime], capture_output=True, text=True, timeout=120))
    report = json.loads(proc.stdout)
    assert report["kind"] == "ranker"
    assert not [m for m in report["modules"] if m.startswith(("recforge.models", "recforge.train", "recforge.recipes"))]
    assert report["first_user_row"] == [1, 0, 0]
    # onnxruntime is imported only when the ONNX runtime is asked for.
    assert report["onnx"] is report["onnxruntime_imported"] is (runtime == "onnx")
    cards = dict(zip(run_cfg.data.schema_.categorical, feature_layout(prepared).cardinalities, strict=True))
    assert report["catalog"][0] == cards["item_id"]
    items = cards["item_id"]
    assert report["popularity"] == {"device": [cards["device"], items], "hour": [cards["hour"], items],
                                    "overall": [items]}
    with torch.no_grad():
        eager = load_trained_model(work / "dnn")(rows.categorical, rows.numeric)
    scripted = torch.load(tmp_path / "logits.pt")
    assert scripted.shape == eager.shape == (len(test),)
    torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("victim", ["vocab/item_id.json", "model.pt", "model.onnx", "item_features.npy",
                                    "popularity/overall.npy", "popularity/hour.npy"])
def test_a_tampered_file_is_refused_naming_it(work: Path, tmp_path: Path, victim: str) -> None:
    root = _copy(work, "dnn", tmp_path)
    expected = json.loads((root / "manifest.json").read_text())["files"][victim]
    raw = bytearray((root / victim).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (root / victim).write_bytes(bytes(raw))
    for runtime in ("torchscript", "onnx"):
        with pytest.raises(bundle.BundleError) as err:
            bundle.load_bundle(root, runtime=runtime)
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
    with pytest.raises(bundle.BundleError, match=r"schema_version 99.*schema_version 1, 2"):
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

    prepared = load_run_config(work / "dnn").resolved_prepared_dir
    inputs = (torch.ones(4, 2, dtype=torch.long), torch.zeros(4, 1), None, None)
    with pytest.raises(bundle.BundleError, match="parity"):
        bundle.write_bundle(Diverging(), tmp_path / "b", model_name="x", features={}, vocab_dir=prepared / "vocab",
                            config={}, metrics={}, data_fingerprint={}, parity_inputs=inputs)
    assert list(tmp_path.iterdir()) == []


def test_two_tower_bundle_searches_like_the_eager_model(work: Path) -> None:
    loaded = bundle.load_bundle(work / "bundles" / "tt")
    assert loaded.kind == "retrieval" and loaded.index is not None and loaded.item_features is not None
    eager = load_trained_model(work / "tt")
    prepared = load_run_config(work / "tt").resolved_prepared_dir
    test = SplitData.load(prepared, "test")
    rows = test.batch(torch.arange(64))
    with torch.no_grad():
        users = loaded.module.user_vector(rows.categorical, rows.numeric, None, None).numpy()
        expected_users = eager.user_vector(rows.categorical, rows.numeric).numpy()
        items = eager.item_vector(torch.from_numpy(loaded.item_features)).numpy()[1:]
    np.testing.assert_allclose(users, expected_users, atol=1e-5)
    # The user tower is what serving runs per request: as ONNX too, with its history input.
    onnx = bundle.load_bundle(work / "bundles" / "tt", runtime="onnx")
    assert onnx.manifest["onnx"]["files"] == {"model.onnx": "forward", "user_tower.onnx": "user_vector"}
    with torch.no_grad():
        expected_with_history = eager.user_vector(rows.categorical, rows.numeric, rows.history_values,
                                                  rows.history_offsets).numpy()
    np.testing.assert_allclose(onnx.user_vector(rows.categorical, rows.numeric).numpy(), expected_users, atol=1e-5)
    np.testing.assert_allclose(onnx.user_vector(rows.categorical, rows.numeric, rows.history_values,
                                                rows.history_offsets).numpy(), expected_with_history, atol=1e-5)
    _, ids = loaded.index.search(users, 10)
    exact = np.argsort(-(expected_users @ items.T), axis=1, kind="stable")[:, :10]
    assert (ids >= 0).all()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert overlap > 0.99


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_schema_1_bundle_still_loads_and_scores() -> None:
    """The committed bundle was written by the schema-1 writer: old bundles keep serving."""
    loaded = bundle.load_bundle(FIXTURES / "bundle_schema1")
    assert loaded.manifest["schema_version"] == 1 and loaded.kind == "ranker"
    assert loaded.item_features is None and loaded.popularity == {}
    expected = torch.load(FIXTURES / "bundle_schema1_expected.pt")
    torch.testing.assert_close(loaded.score(expected["categorical"], expected["numeric"]), expected["logits"],
                               atol=1e-6, rtol=0)
    assert loaded.vocab["item_id"].lookup(["i4", "no-such-item"]) == [4, 0]
    with pytest.raises(bundle.BundleError, match=r"no model\.onnx"):
        bundle.load_bundle(FIXTURES / "bundle_schema1", runtime="onnx")


def test_a_schema_1_retrieval_bundle_still_loads_its_catalog(work: Path, tmp_path: Path) -> None:
    """Schema 1 kept the catalog only in retrieval bundles, without naming it in the manifest."""
    root = _copy(work, "tt", tmp_path)
    for extra in ("popularity", "model.onnx", "user_tower.onnx"):
        shutil.rmtree(root / extra) if (root / extra).is_dir() else (root / extra).unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    old = {k: manifest[k] for k in ("kind", "model_name", "created_unix", "parity_max_abs_diff")}
    old.update(schema_version=1, files=bundle._manifest_files(root))
    (root / "manifest.json").write_text(json.dumps(old))
    loaded = bundle.load_bundle(root)
    assert loaded.manifest["schema_version"] == 1 and loaded.popularity == {}
    np.testing.assert_array_equal(loaded.item_features, np.load(work / "bundles" / "tt" / "item_features.npy"))


@pytest.mark.slow
def test_export_to_s3_uploads_a_verified_bundle_and_never_overwrites(work: Path, tmp_path: Path,
                                                                     s3_prefix: str) -> None:
    """--out s3://...: the bundle is built and checked locally, then put as one committed directory."""
    from recforge import storage

    uri = f"{s3_prefix}/bundles/dnn"
    summary = json.loads(_ok(_recforge("export", "--run", str(work / "dnn"), "--out", uri, "--format", "onnx",
                                       cwd=work)).stdout)
    assert summary["bundle"] == uri and summary["schema_version"] == 2 and summary["formats"] == ["torchscript", "onnx"]
    local = storage.get_dir(uri, tmp_path / "copy")
    loaded = bundle.load_bundle(local, runtime="onnx")
    reference = bundle.load_bundle(work / "bundles" / "dnn")
    assert set(loaded.manifest["files"]) == set(reference.manifest["files"])
    rows = SplitData.load(load_run_config(work / "dnn").resolved_prepared_dir, "test").batch(torch.arange(64))
    torch.testing.assert_close(loaded.score(rows.categorical, rows.numeric),
                               reference.score(rows.categorical, rows.numeric), atol=1e-5, rtol=0)
    again = _recforge("export", "--run", str(work / "dnn"), "--out", uri, cwd=work)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_an_unlisted_vocabulary_is_never_read(work: Path, tmp_path: Path) -> None:
    root = _copy(work, "dnn", tmp_path)
    original = bundle.load_bundle(root).vocab["item_id"].keys
    fake = {**json.loads((root / "vocab" / "item_id.json").read_text()), "keys": ["planted"]}
    (root / "vocab" / "zz_item_id.json").write_text(json.dumps(fake))
    assert bundle.load_bundle(root).vocab["item_id"].keys == original
    with pytest.raises(bundle.BundleError, match="does not list: vocab/zz_item_id.json"):
        bundle.verify_bundle(root, bundle.read_manifest(root), exact=True)


def test_two_listed_vocabularies_for_one_field_are_refused(work: Path, tmp_path: Path) -> None:
    root = _copy(work, "dnn", tmp_path)
    shutil.copyfile(root / "vocab" / "item_id.json", root / "vocab" / "zz_item_id.json")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = bundle._manifest_files(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle.BundleError, match="second vocabulary for field 'item_id'"):
        bundle.load_bundle(root)


@pytest.mark.parametrize("dropped", ["model.pt", "features.json", "item_features.npy", "popularity/overall.npy",
                                     "model.onnx", "vocab/*"])
def test_a_manifest_missing_a_required_file_is_refused(work: Path, tmp_path: Path, dropped: str) -> None:
    root = _copy(work, "dnn", tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items()
                         if not (k == dropped or (dropped == "vocab/*" and k.startswith("vocab/")))}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "model.pt").write_bytes(b"corrupt")  # unlisted, so nothing would have checked it
    with pytest.raises(bundle.BundleError, match=rf"does not list {dropped.replace('*', '[*]')}"):
        bundle.load_bundle(root)


@pytest.mark.parametrize("name", ["../outside.json", "{tmp}/absolute.json", "vocab/../../outside.json"])
def test_manifest_paths_outside_the_bundle_are_refused(work: Path, tmp_path: Path, name: str) -> None:
    root = _copy(work, "dnn", tmp_path)
    name = name.format(tmp=tmp_path)
    outside = root / name  # an absolute name replaces root
    outside.write_text("{}")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name] = bundle.sha256_file(outside)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle.BundleError, match="does not stay inside"):
        bundle.load_bundle(root)


@pytest.mark.parametrize(("cut", "why"), [(200, "Unterminated string"), (0, "empty")])
def test_a_truncated_manifest_is_named(tmp_path: Path, cut: int, why: str) -> None:
    root = tmp_path / "old"
    shutil.copytree(FIXTURES / "bundle_schema1", root)
    (root / "manifest.json").write_bytes((root / "manifest.json").read_bytes()[:cut])
    with pytest.raises(ValueError, match=f"{root / 'manifest.json'}: .*{why}"):
        bundle.load_bundle(root)
