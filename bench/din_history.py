"""Does DIN earn its place over the DNN, and what do the histories it reads hold?

For each data set it prepares the log twice, with data.history_from=train (a valid/test row's history
holds training clicks only: the model is judged on what it knew when training ended) and
data.history_from=all (every earlier click, as the server's online state has them), trains the DNN
(which reads no history) and DIN on each, and scores the test split once: AUC, GAUC, logloss, and DIN
again with its histories emptied. Ranking under a time split; the sequential world's clicks are its
sampled negatives (popularity-weighted, one per click).

    .venv/bin/python bench/din_history.py --out .bench/din
    .venv/bin/python bench/din_history.py --datasets sequential --history-from train
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _machine import cpu

from recforge import config
from recforge.recipes.evaluate import evaluate_run
from recforge.recipes.generate import generate
from recforge.recipes.prepare import prepare_data
from recforge.recipes.train import train_model

DATASETS = {
    # ratings >= 4 are clicks, the rest non-clicks (configs/movielens/*.yaml)
    "movielens": {"dnn": "configs/movielens/dnn.yaml", "din": "configs/movielens/din.yaml", "extra": []},
    # sessions with an intent and item-to-item transitions, as a ranking task under a time split
    "sequential": {"dnn": "configs/synthetic/sasrec.yaml", "din": "configs/synthetic/sasrec.yaml", "extra": [
        "data.split.method=time", "data.split.valid_fraction=0.1", "data.split.test_fraction=0.1",
        "model.embedding_dim=16", "model.hidden=[256,128]", "model.dropout=0.1", "train.epochs=20",
        "train.patience=3", "train.lr=0.001", "train.early_stopping_metric=auc"]},
}




def _metrics(result: dict) -> dict:
    return {k: round(v, 4) for k, v in result.items() if k in ("auc", "gauc", "logloss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".bench/din")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--history-from", default="train,all")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict = {"cpu": cpu()}
    for dataset in args.datasets.split(","):
        spec = DATASETS[dataset]
        for history_from in args.history_from.split(","):
            workdir = out / dataset / history_from
            base = [f"workdir={workdir}", f"prepared_dir={workdir / 'prepared'}", f"data.history_from={history_from}",
                    "train.progress=false", *spec["extra"]]
            cfg = config.load(spec["din"], base)
            if cfg.data.source is None:
                generate(cfg)
            prepare_data(cfg)
            cell: dict = {}
            for model in ("dnn", "din"):
                run_cfg = config.load(spec[model], [*base, f"model.name={model}", f"run_dir={workdir / model}"])
                started = time.time()
                trained = train_model(run_cfg, log=lambda line: None)
                seconds = round(time.time() - started, 1)
                test = evaluate_run(run_cfg, "test", log=lambda line: None)
                cell[model] = {**_metrics(test["model"]), "train_seconds": seconds,
                               "epochs": len(trained.state.history)}
                cell.setdefault("popularity", _metrics(test["popularity"]))
                if model == "din":
                    emptied = evaluate_run(run_cfg, "test", without_history=True, log=lambda line: None)
                    cell["din, histories emptied"] = _metrics(emptied["model"])
            results.setdefault(dataset, {})[history_from] = cell
            print(json.dumps({dataset: {history_from: cell}}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
