"""What `recforge tune` buys on a real data set: the shipped config against the tuned one.

Runs the search (recipes.tune.tune) on the validation split of an already prepared data set, then
trains the config as given and the best trial's config from scratch and evaluates each ONCE on the
test split (the search never reads it). Prints a JSON summary: the validation metric of both (from
the search), their test metrics, the trials' states, and the seconds spent.

    .venv/bin/recforge data prepare --config configs/movielens/dnn.yaml
    .venv/bin/python bench/tune_quality.py --config configs/movielens/dnn.yaml \\
        --space configs/tune/ranker.yaml --n-trials 30 --out .bench/tune-dnn
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from _machine import cpu

from recforge import config
from recforge.recipes.evaluate import evaluate_run
from recforge.recipes.train import train_model
from recforge.recipes.tune import load_space, tune, with_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--space", required=True)
    parser.add_argument("--n-trials", type=int, default=30)
    parser.add_argument("--out", default=".bench/tune")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = config.load(args.config, [*args.overrides, "train.progress=false"])
    space = load_space(args.space, cfg)
    started = time.time()
    study = tune(cfg, space, out / "study", n_trials=args.n_trials, timeout=None, log=lambda line: None)
    searched = time.time() - started
    if study.best is None or study.baseline is None:
        raise SystemExit("the search left no complete best or baseline trial")
    rows = {}
    for name, values in (("as_given", study.baseline.params), ("tuned", study.best.params)):
        run_cfg = with_values(cfg, values, run_dir=out / name)
        train_model(run_cfg, log=lambda line: None)
        test = evaluate_run(run_cfg, "test", log=lambda line: None)
        rows[name] = {"valid_" + study.metric: (study.baseline if name == "as_given" else study.best).value,
                      "test": test["model"], "params": values}
    print(json.dumps({"cpu": cpu(), "config": args.config, "space": args.space, "trials": len(study.trials),
                      "states": dict(Counter(t.state for t in study.trials)), "search_seconds": round(searched, 1),
                      "best_trial": study.best.number, **rows}, indent=2))


if __name__ == "__main__":
    main()
