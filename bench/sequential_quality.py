"""Retrieval quality under the splits top-K work uses: two_tower and SASRec beside popularity and item
co-occurrence, full catalog (no sampled negatives), with standard errors (per-user std / sqrt(users)).

For each data set and each split method it prepares the data once (its own workdir), trains each model
with early stopping on validation NDCG@10, and evaluates on the test split once. Prints one JSON
object: per data set, split and scorer, recall/NDCG@10 and @20 with their standard errors, the number
of test users, and each model's training seconds.

    .venv/bin/python bench/sequential_quality.py --out .bench/sequential
    .venv/bin/python bench/sequential_quality.py --datasets sequential --splits leave_last_out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from recforge import config
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.recipes.retrieval import evaluate_retrieval
from recforge.recipes.train import train_model

DATASETS = {
    # every rating an interaction, 20-item histories (configs/movielens/two_tower.yaml's data)
    "movielens": ("configs/movielens/two_tower.yaml", []),
    "sequential": ("configs/synthetic/sasrec.yaml", []),
}
SPLITS = {
    "per_user_fraction": ["data.split.method=per_user_fraction", "data.split.valid_fraction=0.1",
                          "data.split.test_fraction=0.1"],
    "leave_last_out": ["data.split.method=leave_last_out"],
}
MODELS = {
    "two_tower": ["model.name=two_tower", "model.embedding_dim=64", "model.hidden=[128]", "model.dropout=0.0"],
    "sasrec": ["model.name=sasrec", "model.embedding_dim=64", "model.attention_blocks=2", "model.attention_heads=2",
               "model.dropout=0.2"],
}
# SASRec trained with a softmax over the whole catalog instead of in-batch negatives (--models sasrec_full).
MODELS["sasrec_full"] = [*MODELS["sasrec"], "model.retrieval_loss=full_softmax"]
COMMON = ["train.epochs=30", "train.patience=3", "train.lr=0.001", "train.batch_size=512",
          "train.early_stopping_metric=ndcg@10", "train.progress=false", "data.negatives.per_positive=1",
          "data.history_from=all"]  # each test item follows everything before it, the valid item too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".bench/sequential")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--models", default="two_tower,sasrec")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict = {}
    for dataset in args.datasets.split(","):
        path, extra = DATASETS[dataset]
        for split in args.splits.split(","):
            workdir = out / dataset / split
            base = [f"workdir={workdir}", f"prepared_dir={workdir / 'prepared'}", *extra, *SPLITS[split], *COMMON]
            cfg = config.load(path, base)
            if cfg.data.source is None:
                generate(cfg)
            prepare_data(cfg)
            cell: dict = {}
            for model in args.models.split(","):
                run_cfg = config.load(path, [*base, *MODELS[model], f"run_dir={workdir / model}"])
                name = run_cfg.model.name
                started = time.time()
                trained = train_model(run_cfg, log=lambda line: None)
                seconds = time.time() - started
                scores = evaluate_retrieval(run_cfg, "test", ks=(10, 20))
                for scorer, metrics in scores.items():
                    if scorer == name or scorer not in cell:
                        cell[model if scorer == name else scorer] = {
                            k: round(v, 4) for k, v in metrics.items() if k.startswith(("recall", "ndcg", "users"))}
                cell[model]["train_seconds"] = round(seconds, 1)
                cell[model]["epochs"] = len(trained.state.history)
            results.setdefault(dataset, {})[split] = cell
            print(json.dumps({dataset: {split: cell}}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
