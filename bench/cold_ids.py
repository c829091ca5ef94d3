"""What train.id_dropout buys the rows whose user or item training never saw.

Prepares a data set once, trains one ranker per id_dropout rate (early stopping on validation AUC),
and scores the test split once: overall, on the rows of users unseen in training (user index 0), and on
the rows of unseen items (item index 0). AUC and logloss per group, with the group's row count.

    .venv/bin/python bench/cold_ids.py --config configs/movielens/dnn.yaml --rates 0,0.05,0.1,0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _machine import cpu

from recforge import config
from recforge.data.batches import SplitData
from recforge.evaluate import predict_logits
from recforge.features import FeatureLayout
from recforge.metrics import auc, logloss
from recforge.recipes.prepare import prepare_data
from recforge.recipes.runs import load_trained_model
from recforge.recipes.train import train_model


def _scores(labels: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> dict:
    y, z = labels[rows], logits[rows]
    both = 0 < y.sum() < len(y)
    return {"rows": int(rows.sum()), "auc": round(auc(y, z), 4) if both else None,
            "logloss": round(logloss(y, 1 / (1 + np.exp(-z))), 4) if len(y) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rates", default="0,0.05,0.1,0.2")
    parser.add_argument("--out", default=".bench/cold")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    base = [*args.overrides, f"workdir={out}", "train.progress=false"]
    cfg = config.load(args.config, base)
    prepare_data(cfg)
    prepared = cfg.resolved_prepared_dir
    features = FeatureLayout.from_prepared_meta(json.loads((prepared / "meta.json").read_text()))
    test = SplitData.load(prepared, "test")
    labels = test.label.numpy().astype(np.float64)
    user = test.categorical[:, features.column("user")].numpy()
    item = test.categorical[:, features.item_column].numpy()
    groups = {"all": np.ones(len(labels), bool), "unseen users": user == 0, "unseen items": item == 0}
    results: dict = {"cpu": cpu(), "config": args.config}
    for rate in args.rates.split(","):
        run_cfg = config.load(args.config, [*base, f"train.id_dropout={rate}", f"run_dir={out / f'rate-{rate}'}"])
        trained = train_model(run_cfg, log=lambda line: None)
        logits = predict_logits(load_trained_model(run_cfg.resolved_run_dir), test).astype(np.float64)
        results[rate] = {"best_valid_auc": round(trained.state.best_metric, 4),
                         **{name: _scores(labels, logits, rows) for name, rows in groups.items()}}
        print(json.dumps({rate: results[rate]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
