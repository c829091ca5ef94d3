"""`recforge tune`: a hyper-parameter search with Optuna over a declared space, on the validation metric.

A trial is an ordinary training run (recipes.train) of the config with the trial's values applied,
in its own run directory under the study directory; it reports its validation metric after every
epoch, and a trial whose curve is below the median of earlier trials at the same epoch is pruned
there. Trials are ranked by the validation metric only: the test split is never read, so the tuned
config's test result, computed once afterwards (`recforge train best.yaml && recforge evaluate`), is
an honest estimate. The study lives in a journal file in the study directory, so an interrupted
search resumes where it stopped (a trial cut off mid-run is retried with the same values).

The space file (YAML):

    params:                                   # dotted config keys under model. or train.
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.embedding_dim: {type: int, low: 8, high: 64, step: 8}
      model.name: {type: categorical, choices: [dnn, deepfm]}
    pruner: {kind: median, startup_trials: 3, warmup_epochs: 0}

The first trial is the config as given (when its values lie in the space), so the table shows what
the search gained over it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from recforge.config import Config, ConfigError, Strict, from_dict, read_tree, validate_as
from recforge.recipes.runs import Log
from recforge.recipes.train import train_model
from recforge.storage import read_json, write_text

STUDY_NAME = "recforge"
JOURNAL_FILE = "journal.log"
BEST_CONFIG_FILE = "best.yaml"
TUNABLE_SECTIONS = ("model.", "train.")
# Keys that change how a run is carried out, not what it learns: searching them is meaningless.
UNTUNABLE = {"train.epochs", "train.progress", "train.log_every", "train.checkpoint_every", "train.device",
             "train.stop_after_steps", "train.mirror_to", "train.early_stopping_metric", "train.threads",
             "train.eval_batch_size"}


class ParamSpace(Strict):
    """One searched key: a float or int range (log-uniform with log: true, or in steps), or choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpace:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high (got low={self.low}, high={self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int parameter needs whole low and high")
        return self

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.choices or [])
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return bool(self.low <= value <= self.high)  # type: ignore[operator]


class PrunerSpace(Strict):
    """median: stop a trial whose validation metric at an epoch is worse than the median of the earlier
    trials at that epoch (after `startup_trials` complete trials and `warmup_epochs` epochs); none: never."""

    kind: Literal["median", "none"] = "median"
    startup_trials: int = Field(3, ge=0)
    warmup_epochs: int = Field(0, ge=0)


class SearchSpace(Strict):
    params: dict[str, ParamSpace] = Field(min_length=1)
    pruner: PrunerSpace = PrunerSpace()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def load_space(path: str | Path, cfg: Config) -> SearchSpace:
    """The space file, validated, with every key checked against the config (a typo fails here, named)."""
    space = validate_as(SearchSpace, read_tree(path, what="search space file"), f"search space {path}")
    for key, param in space.params.items():
        if not key.startswith(TUNABLE_SECTIONS) or key in UNTUNABLE:
            raise ConfigError(f"search space {path}: '{key}' cannot be tuned: search model.* and train.* keys "
                              "that change what a run learns (data.* changes the prepared dataset; prepare and "
                              f"tune each); not {', '.join(sorted(UNTUNABLE))}")
        # Both ends of a range and every choice must make a valid config: a space the config would
        # refuse fails here, not in trial 7.
        samples = list(param.choices or []) if param.type == "categorical" else [
            int(v) if param.type == "int" else v for v in (param.low, param.high)]  # type: ignore[arg-type]
        for sample in samples:
            try:
                with_values(cfg, {key: sample})
            except ConfigError as exc:
                raise ConfigError(f"search space {path}: parameter '{key}' = {sample!r}: {exc}") from None
    return space


def with_values(cfg: Config, values: dict[str, Any], run_dir: Path | None = None) -> Config:
    """`cfg` with dotted keys set to `values` (and the run directory moved), validated like any config."""
    tree = cfg.to_dict()
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{key}'")
            node = node[part]
        node[leaf] = value
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    return from_dict(tree)


def current_values(cfg: Config, space: SearchSpace) -> dict[str, Any] | None:
    """The config's own value of every searched key, or None when one lies outside the space."""
    tree = cfg.to_dict()
    values = {}
    for key, param in space.params.items():
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        if not param.contains(node):
            return None
        values[key] = node
    return values


class TuneInterrupted(RuntimeError):
    """The search was stopped mid-trial; its journal holds everything, and that trial is queued again."""


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str
    value: float | None
    epochs: int
    params: dict[str, Any]
    run_dir: str


@dataclass(frozen=True)
class StudyResult:
    metric: str
    direction: str
    trials: list[TrialRow]
    best: TrialRow | None
    baseline: TrialRow | None  # the config as given, when it was a trial
    best_config: Path | None


def tune(cfg: Config, space: SearchSpace, study_dir: Path, *, n_trials: int | None, timeout: float | None,
         log: Log = print) -> StudyResult:
    """Run trials until the study holds `n_trials` finished ones (complete or pruned) or `timeout` seconds
    have passed; then write the best trial's config to study_dir/best.yaml."""
    import optuna

    if n_trials is None and timeout is None:
        raise ValueError("give --n-trials or --timeout (or both): a search needs a budget")
    meta_file = cfg.resolved_prepared_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no prepared dataset at {cfg.resolved_prepared_dir}; run `recforge data prepare` "
                                "first (every trial trains on it)")
    if not read_json(meta_file)["split"]["valid"]["rows"]:
        raise ValueError(f"{cfg.resolved_prepared_dir} has no validation split: trials are ranked by the "
                         "validation metric (the test split stays unread); prepare with data.split.valid_fraction > 0")
    metric = cfg.train.early_stopping_metric
    direction = "minimize" if metric == "logloss" else "maximize"
    study = _open_study(cfg, space, study_dir, metric, direction, log)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = None if n_trials is None else max(0, n_trials - len(study.get_trials(states=finished)))
    if remaining != 0:
        callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=finished)] if n_trials is not None else []
        study.optimize(_objective(cfg, space, study_dir, metric, log), n_trials=remaining, timeout=timeout,
                       callbacks=callbacks, catch=())
    return _result(cfg, study, study_dir, metric, direction, log)


def _open_study(cfg: Config, space: SearchSpace, study_dir: Path, metric: str, direction: str, log: Log) -> Any:
    """The study in study_dir (created, or resumed when its space and metric are the same)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(study_dir / JOURNAL_FILE)))
    existing = [s.study_name for s in storage.get_all_studies()]
    # The sampler's generator is seeded by the config's seed and the trials already run, so the same
    # command gives the same trials, and a resumed study does not repeat the first trials' draws.
    trials_so_far = len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME))) \
        if STUDY_NAME in existing else 0
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + trials_so_far)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.pruner.startup_trials,
                                         n_warmup_steps=space.pruner.warmup_epochs) \
        if space.pruner.kind == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if STUDY_NAME not in existing:
        study.set_user_attr("space", space.digest())
        study.set_user_attr("metric", metric)
        baseline = current_values(cfg, space)
        if baseline is not None:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
        else:
            log("the config's own values are not all inside the space: no baseline trial")
        return study
    if study.user_attrs.get("space") != space.digest() or study.user_attrs.get("metric") != metric:
        raise ValueError(f"{study_dir} holds a study of another search space or metric "
                         f"({study.user_attrs.get('metric')}); choose another --study-dir")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Cut off by an interruption: failed, and its values queued again so the search loses nothing.
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs))
        log(f"trial {trial.number} was interrupted: its values run again")
    return study


def _objective(cfg: Config, space: SearchSpace, study_dir: Path, metric: str, log: Log) -> Any:
    import optuna

    def objective(trial: Any) -> float:
        values = {key: _suggest(trial, key, param) for key, param in space.params.items()}
        run_dir = study_dir / "trials" / f"{trial.number:04d}"
        shutil.rmtree(run_dir, ignore_errors=True)  # numbers are never reused: only a crashed write is here
        trial_cfg = with_values(cfg, {**values, "train.progress": False}, run_dir=run_dir)
        trial.set_user_attr("run_dir", str(run_dir))

        def on_epoch(record: dict[str, Any]) -> None:
            value = record.get(f"valid_{metric}")
            trial.set_user_attr("epochs", record["epoch"] + 1)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid {metric} {value:.4f} at epoch {record['epoch']}")

        log(f"trial {trial.number}: {_text(values)}")
        try:
            result = train_model(trial_cfg, log=lambda line: None, on_epoch=on_epoch)
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned")
            raise
        if result.interrupted:  # Ctrl-C / SIGTERM: the trainer checkpointed and returned early
            trial.study.enqueue_trial(values, user_attrs={k: v for k, v in trial.user_attrs.items() if k == "baseline"})
            raise TuneInterrupted(f"interrupted during trial {trial.number}; run the same command again to resume "
                                  "(the trial's values run again)")
        kept = next((r for r in result.state.history if r["epoch"] == result.state.best_epoch), None)
        value = None if kept is None else kept.get(f"valid_{metric}")
        if value is None or not math.isfinite(value):
            raise ValueError(f"trial {trial.number} gave no finite valid {metric}: is there a validation split?")
        log(f"trial {trial.number}: valid {metric} {value:.4f}")
        return float(value)

    return objective


def _suggest(trial: Any, key: str, param: ParamSpace) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    if param.type == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1),  # type: ignore[arg-type]
                                 log=param.log)
    return trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)  # type: ignore[arg-type]


def _text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _result(cfg: Config, study: Any, study_dir: Path, metric: str, direction: str, log: Log) -> StudyResult:
    rows = [TrialRow(number=t.number, state=t.state.name.lower(), value=t.value,
                     epochs=int(t.user_attrs.get("epochs", 0)), params=dict(t.params),
                     run_dir=str(t.user_attrs.get("run_dir", "")))
            for t in study.get_trials(deepcopy=False)]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best_trial = study.best_trial if complete else None
    best = next((r for r in rows if best_trial is not None and r.number == best_trial.number), None)
    baseline_number = next((t.number for t in complete if t.user_attrs.get("baseline")), None)
    baseline = next((r for r in rows if r.number == baseline_number), None)
    best_config = None
    if best_trial is not None:
        tuned = with_values(cfg, dict(best_trial.params), run_dir=study_dir / "best-run")
        best_config = study_dir / BEST_CONFIG_FILE
        header = (f"# recforge tune: trial {best_trial.number} of {study_dir}, valid {metric} {best_trial.value:.6f}\n"
                  "# train it with `recforge train -c best.yaml`, then `recforge evaluate -c best.yaml` (the test\n"
                  "# split, read for the first time)\n")
        write_text(best_config, header + yaml.safe_dump(tuned.to_dict(), sort_keys=False))
    return StudyResult(metric, direction, rows, best, baseline, best_config)
