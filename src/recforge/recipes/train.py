"""`recforge train`, `recforge train --restore-from` and `recforge plan`: a model on the prepared data.

What differs between a ranking and a retrieval model (objective, validation, item index) comes
from the model's kind through recforge.recipes.kinds; this module only composes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.data.stream import ShardStream
from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.models import build_model, model_entry
from recforge.recipes.kinds import Validator, kind_recipe, validator_for
from recforge.recipes.retrieval import build_item_index
from recforge.recipes.runs import Log, feature_layout
from recforge.runtime import choose_device, cleanup_distributed, env_fingerprint, init_distributed, seed_everything
from recforge.storage import read_json, write_json, write_text
from recforge.train.checkpoint import lock_run_dir
from recforge.train.checkpoint import restore_run as restore_checkpoint_snapshot
from recforge.train.plan import MemoryPlan, detect_device_memory, plan_memory
from recforge.train.trainer import TrainData, TrainOptions, TrainResult, train

InitWeights = Callable[[torch.nn.Module, FeatureLayout], dict[str, Any]]
EpochHook = Callable[[dict[str, Any]], None]


def restore_run(cfg: Config, uri: str, log: Log = print) -> Config:
    """Restore the newest checkpoint snapshot mirrored under `uri` into the run directory.

    Returns the config to resume with: unless it names another mirror, the run goes on mirroring
    to `uri`, so a second disaster loses no more than the first.
    """
    snapshot = restore_checkpoint_snapshot(uri, cfg.resolved_run_dir)
    log(f"restored {snapshot} into {cfg.resolved_run_dir}")
    if cfg.train.mirror_to:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"mirror_to": uri})})


def train_model(cfg: Config, *, resume: bool = False, resume_from: str | None = None,
                init_weights: InitWeights | None = None, log: Log = print, on_epoch: EpochHook | None = None
                ) -> TrainResult:
    """Train into the run directory, holding its lock (rank 0 of a torchrun job, or a single process).

    `on_epoch` sees each finished epoch's record (see TrainOptions.on_epoch); `recforge tune` prunes there.
    """
    # The other ranks of a torchrun job share rank 0's run directory (and its lock).
    lock = lock_run_dir(cfg.resolved_run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        return _train_model(cfg, resume=resume, resume_from=resume_from, init_weights=init_weights, log=log,
                            on_epoch=on_epoch)


def _train_model(cfg: Config, *, resume: bool = False, resume_from: str | None = None,
                 init_weights: InitWeights | None = None, log: Log = print, on_epoch: EpochHook | None = None
                 ) -> TrainResult:
    """Build the configured model on the prepared data and train it into the run directory.

    Run under torchrun (WORLD_SIZE > 1 in the environment) it trains as one rank of a DDP job.
    `resume_from` (a train.mirror_to URI) first restores the newest mirrored checkpoint into an
    empty run directory, then resumes from it exactly as --resume does. `init_weights` (e.g. a warm
    start from the production model) fills the freshly built model before a new run; a resumed run
    takes its weights from the checkpoint instead.
    """
    prepared = cfg.resolved_prepared_dir
    run_dir = cfg.resolved_run_dir
    if not (prepared / "meta.json").is_file():
        raise FileNotFoundError(f"no prepared dataset at {prepared}; run `recforge data prepare` first")
    if resume_from:
        cfg = restore_run(cfg, resume_from, log)
        resume = True
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise FileExistsError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, "
            "or choose another run_dir=..."
        )
    device = choose_device(cfg.train.device)
    dist_ctx = init_distributed(device.device.type, cfg.train.ddp_timeout_s)
    try:
        seed_everything(cfg.seed)
        features = feature_layout(prepared)
        prepared_meta = read_json(prepared / "meta.json")
        if model_entry(cfg.model.name).needs_history and not features.history_length:
            raise ValueError(f"model {cfg.model.name} needs user histories: set data.history_length (e.g. 20) "
                             "and run `recforge data prepare` again")
        model = build_model(features, cfg.model, sparse=cfg.train.sparse_embeddings)
        if init_weights is not None and not resume:
            log(f"initial weights: {init_weights(model, features)}")
        recipe = kind_recipe(cfg.model.name)
        validate_fn = _validator(prepared, features, cfg, prepared_meta)
        if dist_ctx.is_main:
            _write_run_files(cfg, run_dir, features)
        digest_extra = {"model": cfg.model.model_dump(), "seed": cfg.seed, "features": features.identity(),
                        "rows": prepared_meta["rows"], "split": prepared_meta["split"]}
        train_data, objective = recipe.objective(model, _train_split(cfg, prepared), features, cfg)
        log(f"training {cfg.model.name} on {len(train_data):,} rows{_streamed(train_data)} -> {run_dir}")
        result = train(model, train_data, validate_fn, cfg.train, TrainOptions(
            run_dir, seed=cfg.seed, digest_extra=digest_extra, resume=resume, dist_ctx=dist_ctx, objective=objective,
            log=log, on_epoch=on_epoch))
        if dist_ctx.is_main and recipe.item_index and (run_dir / "model.pt").is_file():
            _index_best_weights(model, prepared, features, run_dir, log)
        if dist_ctx.is_main:
            _write_summary(cfg, run_dir, result, dist_ctx.world_size)
        return result
    finally:
        cleanup_distributed()


def _train_split(cfg: Config, prepared: Path) -> TrainData:
    """The train split as train.data_loading asks: all in memory, or its shards to stream."""
    if cfg.train.data_loading == "stream":
        return ShardStream.open(prepared, "train", cfg.train.shuffle_buffer)
    return SplitData.load(prepared, "train")


def _streamed(data: TrainData) -> str:
    if not isinstance(data, ShardStream):
        return ""
    return f", streamed from {len(data.shards)} shard(s) through a {data.shuffle_buffer:,}-row buffer per process"


def _validator(prepared: Path, features: FeatureLayout, cfg: Config, prepared_meta: dict[str, Any]
               ) -> Validator | None:
    """The valid split's validator; none without a valid split, which early stopping cannot do without."""
    if prepared_meta["split"]["valid"]["rows"]:
        return validator_for(prepared, features, cfg)
    if cfg.train.early_stopping:
        raise ValueError(f"{prepared} has no validation split (data.split: {_split_text(prepared_meta)}), and "
                         "train.early_stopping needs one: prepare with data.split.valid_fraction > 0 (or valid "
                         "rows in the split column), or set train.early_stopping=false to train every epoch "
                         "and keep the last")
    return None


def _split_text(prepared_meta: dict[str, Any]) -> str:
    split = prepared_meta["split"]
    return f"method={split['method']}, valid_fraction={split['valid_fraction']}"


def _write_run_files(cfg: Config, run_dir: Path, features: FeatureLayout) -> None:
    """What a run directory says about itself before training: config, environment, feature layout."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json(run_dir / "env.json", env_fingerprint())
    features.save(run_dir / FEATURES_FILE)


def _index_best_weights(model: torch.nn.Module, prepared: Path, features: FeatureLayout, run_dir: Path,
                        log: Log) -> None:
    """The index is part of a retrieval model: built from the best weights, saved beside them."""
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    index = build_item_index(model.cpu().eval(), prepared, features, run_dir / "index")
    log(f"item index: {index.kind}, {index.count:,} items"
        + (f", recall@10 vs exact {index.build_recall:.3f}" if index.build_recall is not None else ""))


def _write_summary(cfg: Config, run_dir: Path, result: TrainResult, world_size: int) -> None:
    write_json(run_dir / "train_summary.json", {
        "finished": result.state.finished, "interrupted": result.interrupted,
        "epochs_run": len(result.state.history), "best_epoch": result.state.best_epoch,
        "best_valid": result.state.best_metric, "metric": cfg.train.early_stopping_metric,
        "global_step": result.state.global_step, "device": result.device,
        "device_reason": result.device_reason, "samples_per_s": result.samples_per_s,
        "world_size": world_size,
    })


def plan(
    cfg: Config,
    *,
    fields: dict[str, int] | None = None,
    world_size: int = 1,
    device_memory_gib: float | None = None,
) -> MemoryPlan:
    """Memory per device for the configured model on the prepared vocabularies (or given field sizes)."""
    if fields:
        cardinalities, num_numeric = dict(fields), len(cfg.data.schema_.numeric)
    else:
        meta_path = cfg.resolved_prepared_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no prepared dataset at {cfg.resolved_prepared_dir} to read vocabulary sizes from; "
                "run `recforge data prepare` or give sizes with --field NAME=ROWS"
            )
        meta = read_json(meta_path)
        cardinalities = {f["name"]: int(f["cardinality"]) for f in meta["fields"]}
        num_numeric = len(meta["numeric"])
    if device_memory_gib is not None:
        device_bytes, name = int(device_memory_gib * 1024**3), f"{device_memory_gib:g} GiB device"
    else:
        device_bytes, name = detect_device_memory(cfg.train.device)
    return plan_memory(cardinalities, num_numeric, cfg.model, cfg.train, world_size=world_size,
                       device_bytes=device_bytes, device_name=name)
