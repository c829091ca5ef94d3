"""Every model of the zoo on the synthetic world and on MovieLens ml-latest-small, through the CLI.

For each dataset the data is generated/prepared once per config workdir, then each model is
trained (timed) and evaluated on the held-out test split: ranking AUC/GAUC/logloss beside the
popularity baseline, and for two_tower full-catalog Recall/NDCG@10/20 and coverage beside the
popularity and item co-occurrence baselines. DIN is also scored with its histories emptied.

    .venv/bin/python bench/model_zoo.py [--datasets synthetic,movielens,movielens-genres] [--models dnn,deepfm,...]
        [--movielens PATH/ratings.csv] [--out .bench/model_zoo.json]

Prints a markdown table (for BENCHMARKS.md) and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dnn", "deepfm", "dcnv2", "din", "two_tower")
DEFAULT_MOVIELENS = REPO.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"
# A data set run with another's configs plus overrides: MovieLens with each movie's genres (the
# pipe-joined genre list of movies.csv as one categorical item feature, joined by data.items).
VARIANTS = {"movielens-genres": ("movielens", [
    f"data.items.path={DEFAULT_MOVIELENS.parent / 'movies.csv'}", "data.items.key=movieId",
    "data.schema.item_features=[genres]"])}


def recforge(*args: str) -> str:
    cmd = [sys.executable, "-m", "recforge.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_dataset(dataset: str, models: list[str], extra: list[str], workroot: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    prepared: set[str] = set()
    configs, variant_extra = VARIANTS.get(dataset, (dataset, []))
    extra = [*extra, *variant_extra]
    for model in models:
        config = f"configs/{configs}/{model}.yaml"
        workdir = workroot / dataset / ("implicit" if configs == "movielens" and model == "two_tower" else "data")
        common = ["--config", config, *extra, f"workdir={workdir}", f"run_dir={workroot / dataset / model}",
                  "train.progress=false"]
        if str(workdir) not in prepared:
            if configs == "synthetic":
                recforge("data", "generate", *common)
            recforge("data", "prepare", *common)
            prepared.add(str(workdir))
        shutil.rmtree(workroot / dataset / model, ignore_errors=True)  # a fresh run each time
        started = time.perf_counter()
        recforge("train", *common)
        seconds = time.perf_counter() - started
        evaluation = json.loads(recforge("evaluate", "--json", *common))
        entry = {"train_seconds": round(seconds, 1), **evaluation}
        if model == "din":
            entry["without_history"] = json.loads(recforge("evaluate", "--json", "--without-history", *common))
        results[model] = entry
        print(f"{dataset} {model}: {seconds:.0f}s", file=sys.stderr, flush=True)
    return results


def table(dataset: str, results: dict[str, dict]) -> str:
    lines = [f"**{dataset}**", "",
             "| scorer | AUC | GAUC | logloss | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 | coverage@20 | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    popularity_rank = None
    for model, entry in results.items():
        if model == "two_tower":
            continue
        m = entry["model"]
        popularity_rank = entry["popularity"]
        lines.append(f"| {model} | {fmt(m['auc'])} | {fmt(m['gauc'])} | {fmt(m['logloss'])} | | | | | | "
                     f"{entry['train_seconds']:.0f} |")
        if "without_history" in entry:
            w = entry["without_history"]["model"]
            lines.append(f"| {model}, histories emptied | {fmt(w['auc'])} | {fmt(w['gauc'])} | {fmt(w['logloss'])} "
                         "| | | | | | |")
    if popularity_rank is not None:
        p = popularity_rank
        lines.append(f"| popularity (ranking) | {fmt(p['auc'])} | {fmt(p['gauc'])} | {fmt(p['logloss'])} | | | | | | |")
    if "two_tower" in results:
        entry = results["two_tower"]
        for scorer in ("two_tower", "popularity", "cooccurrence"):
            r = entry[scorer]
            label = scorer if scorer == "two_tower" else f"{scorer} (retrieval)"
            secs = f"{entry['train_seconds']:.0f}" if scorer == "two_tower" else ""
            lines.append(f"| {label} | | | | {fmt(r['recall@10'])} | {fmt(r['recall@20'])} | {fmt(r['ndcg@10'])} | "
                         f"{fmt(r['ndcg@20'])} | {fmt(r['coverage@20'])} | {secs} |")
        lines.append("")
        lines.append(f"(retrieval: {int(entry['two_tower']['users'])} test users with at least one positive)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="synthetic,movielens")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--movielens", type=Path, default=DEFAULT_MOVIELENS)
    parser.add_argument("--workroot", type=Path, default=REPO / ".bench" / "zoo")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "model_zoo.json")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    out: dict[str, dict] = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        extra = [f"data.source={args.movielens}"] if dataset.startswith("movielens") else []
        if dataset.startswith("movielens") and not args.movielens.is_file():
            raise SystemExit(f"MovieLens ratings not found at {args.movielens}; pass --movielens PATH")
        out[dataset] = run_dataset(dataset, models, extra, args.workroot)
        print(table(dataset, out[dataset]))
        print()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
