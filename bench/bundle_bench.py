"""Bundles of every model of the zoo: size on disk, load time, and CPU scoring latency per runtime.

Each model is trained briefly on a small synthetic world through the CLI (or taken from --workdir
if already there) and exported with `recforge export --format onnx`. Then, in this one process,
with torch.set_num_threads(1) and onnxruntime intra_op_num_threads=1, the same request is scored
by the eager model, the bundle's TorchScript module and its ONNX Runtime session: one user with
`--candidates` candidate items (the ranking step of a request), median and p90 over `--runs`
calls after warmup, the three runtimes interleaved call by call so that machine noise hits all
of them alike. For two_tower the user tower on one row (what retrieval runs per request) is timed
too.

    .venv/bin/python bench/bundle_bench.py [--workdir .bench/bundle_bench] [--models dnn,din,...]
        [--runs 200] [--candidates 500] [--json]

Prints a markdown table (for BENCHMARKS.md), or with --json one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dnn", "deepfm", "dcnv2", "din", "two_tower")
RUNTIMES = ("eager", "torchscript", "onnx")


def recforge(*args: str) -> str:
    cmd = [sys.executable, "-m", "recforge.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def build(model: str, workdir: Path, world: list[str]) -> Path:
    """Train (1 epoch) and export one model unless its bundle is already in `workdir`."""
    bundle_dir = workdir / "bundles" / model
    if (bundle_dir / "manifest.json").is_file():
        return bundle_dir
    common = ["--config", f"configs/synthetic/{model}.yaml", f"workdir={workdir / 'data'}",
              f"run_dir={workdir / model}", "train.epochs=1", "train.progress=false", *world]
    if not (workdir / "data" / "prepared" / "meta.json").is_file():
        recforge("data", "generate", *common)
        recforge("data", "prepare", *common)
    if not (workdir / model / "model.pt").is_file():
        recforge("train", *common)
    recforge("export", "--run", str(workdir / model), "--out", str(bundle_dir), "--format", "onnx")
    return bundle_dir


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_interleaved(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, dict[str, float]]:
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: {"median_ms": statistics.median(s), "p90_ms": percentile(s, 0.9)} for name, s in samples.items()}


Inputs = tuple[torch.Tensor, ...]


def one_request(bundle: Any, workdir: Path, candidates: int) -> tuple[Inputs, Inputs]:
    """One test user's row (context and history) against `candidates` catalog items as one batch
    (what ranking scores per request), and that user's row alone (what the user tower sees)."""
    from recforge.data.batches import SplitData

    test = SplitData.load(workdir / "data" / "prepared", "test")
    row = 0
    if test.history_offsets is not None:  # the longest history, so that DIN's attention has work to do
        row = int(torch.argmax(test.history_offsets[1:] - test.history_offsets[:-1]))
    batch = test.batch(torch.full((candidates,), row, dtype=torch.long))
    categorical = batch.categorical.clone()
    item_columns = [i for i, role in enumerate(bundle.features["roles"]) if role in ("item", "item_feature")]
    catalog = torch.from_numpy(bundle.item_features)
    categorical[:, item_columns] = catalog[1 + torch.arange(candidates) % (len(catalog) - 1)]
    user = test.batch(torch.tensor([row]))
    return ((categorical, batch.numeric, batch.history_values, batch.history_offsets),
            (user.categorical, user.numeric, user.history_values, user.history_offsets))


def measure(model_name: str, bundle_dir: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from recforge import bundle as bundle_module
    from recforge.recipes.runs import load_trained_model

    files = [p for p in bundle_dir.rglob("*") if p.is_file()]
    sizes = {"total_mb": sum(p.stat().st_size for p in files) / 1e6,
             "model_pt_mb": (bundle_dir / "model.pt").stat().st_size / 1e6,
             "model_onnx_mb": (bundle_dir / "model.onnx").stat().st_size / 1e6}
    loads: dict[str, float] = {}
    for runtime in ("torchscript", "onnx"):
        seconds = []
        for _ in range(args.loads):
            started = time.perf_counter()
            bundle_module.load_bundle(bundle_dir, runtime=runtime, onnx_threads=1)
            seconds.append(time.perf_counter() - started)
        loads[f"{runtime}_ms"] = statistics.median(seconds) * 1e3
    eager = load_trained_model(workdir / model_name)
    scripted = bundle_module.load_bundle(bundle_dir)
    onnx = bundle_module.load_bundle(bundle_dir, runtime="onnx", onnx_threads=1)
    inputs, user = one_request(scripted, workdir, args.candidates)

    def eager_score() -> torch.Tensor:
        with torch.inference_mode():
            return eager(*inputs)

    outputs = {"eager": eager_score(), "torchscript": scripted.score(*inputs), "onnx": onnx.score(*inputs)}
    max_diff = {k: float((v - outputs["eager"]).abs().max()) for k, v in outputs.items() if k != "eager"}
    latency = time_interleaved({"eager": eager_score, "torchscript": lambda: scripted.score(*inputs),
                                "onnx": lambda: onnx.score(*inputs)}, args.runs, args.warmup)
    result: dict[str, Any] = {"size": sizes, "load_ms": loads, "score": latency, "max_abs_diff_vs_eager": max_diff}
    if model_name == "two_tower":
        def eager_user() -> torch.Tensor:
            with torch.inference_mode():
                return eager.user_vector(*user)

        result["user_tower"] = time_interleaved(
            {"eager": eager_user, "torchscript": lambda: scripted.user_vector(*user),
             "onnx": lambda: onnx.user_vector(*user)}, args.runs, args.warmup)
    return result


def table(results: dict[str, dict[str, Any]], candidates: int) -> str:
    lines = [f"| model | bundle MB | model.pt MB | model.onnx MB | load TS ms | load ONNX ms | {candidates} cand. "
             "eager ms (p90) | TorchScript ms (p90) | ONNX RT ms (p90) | TS / eager | ONNX / eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(label: str, r: dict[str, Any], score: dict[str, dict[str, float]]) -> str:
        eager = score["eager"]["median_ms"]
        cells = [f"{score[k]['median_ms']:.3f} ({score[k]['p90_ms']:.3f})" for k in RUNTIMES]
        size = r["size"]
        return (f"| {label} | {size['total_mb']:.2f} | {size['model_pt_mb']:.2f} | {size['model_onnx_mb']:.2f} | "
                f"{r['load_ms']['torchscript_ms']:.0f} | {r['load_ms']['onnx_ms']:.0f} | {' | '.join(cells)} | "
                f"{score['torchscript']['median_ms'] / eager:.2f} | {score['onnx']['median_ms'] / eager:.2f} |")

    for model, r in results.items():
        lines.append(row(model, r, r["score"]))
        if "user_tower" in r:
            lines.append(row(f"{model} user tower (1 row)", r, r["user_tower"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "bundle_bench")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--loads", type=int, default=5, help="loads per runtime; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = [f"data.generate.users={args.users}", f"data.generate.items={args.items}",
             f"data.generate.events={args.events}", "data.generate.days=7"]
    results = {}
    for model in args.models.split(","):
        bundle_dir = build(model, args.workdir.resolve(), world)
        results[model] = measure(model, bundle_dir, args.workdir.resolve(), args)
        print(f"{model}: done", file=sys.stderr, flush=True)
    meta = {"torch": torch.__version__, "threads": 1, "candidates": args.candidates, "runs": args.runs,
            "warmup": args.warmup, "world": world}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if args.json:
        print(json.dumps({"meta": meta, "models": results}, indent=1))
    else:
        print(table(results, args.candidates))


if __name__ == "__main__":
    main()
