"""Each command's work as one function of a Config: generate, validate, prepare, train, evaluate.

This is the composition layer: it is where the config is taken apart into the explicit arguments
the library takes. The CLI calls exactly one of these per verb, and the pipeline reuses them,
so a command and a pipeline step can never drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import yaml

from recforge import config as config_module
from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.data.prepare import PreparedInfo, prepare
from recforge.data.sources import read_events
from recforge.data.validate import ValidationResult, validate, write_outputs
from recforge.evaluate import RetrievalTask, evaluate, full_catalog_metrics, retrieval_task
from recforge.index import ItemIndex
from recforge.models import FeatureSpec, build_model
from recforge.models.popularity import fit_popularity
from recforge.models.two_tower import TwoTower
from recforge.runtime import (
    choose_device,
    cleanup_distributed,
    env_fingerprint,
    environment_drift,
    init_distributed,
    seed_everything,
)
from recforge.simulate.logs import generate as generate_world
from recforge.storage import read_json, write_json, write_text
from recforge.train.checkpoint import lock_run_dir
from recforge.train.checkpoint import restore_run as restore_checkpoint_snapshot
from recforge.train.objectives import InBatchRetrieval
from recforge.train.plan import MemoryPlan, detect_device_memory, plan_memory
from recforge.train.trainer import TrainResult, train

Log = Callable[[str], None]


def generate(cfg: Config) -> dict[str, Any]:
    """Write the synthetic world's behaviour log (and its ground truth) under workdir/raw."""
    return generate_world(cfg.data.generate, Path(cfg.workdir) / "raw")


def validation_dir(cfg: Config) -> Path:
    """Where the quarantine file and validation report of the configured source go."""
    return cfg.resolved_prepared_dir.parent / "validation"


@dataclass(frozen=True)
class ValidationOutcome:
    result: ValidationResult
    files: dict[str, Path]


def validate_source(cfg: Config, out_dir: Path | None = None) -> ValidationOutcome:
    """Read the configured log and split it into clean rows and quarantined rows with reasons."""
    schema = cfg.data.schema_
    table = read_events(cfg.resolved_source, cfg.data.format, schema)
    result = validate(table, schema)
    files = write_outputs(result, out_dir or validation_dir(cfg))
    return ValidationOutcome(result, files)


def prepare_data(cfg: Config) -> tuple[PreparedInfo, ValidationResult]:
    """Validate, then split/encode into the prepared directory (quarantine and report go with it)."""
    outcome = validate_source(cfg)
    result, files = outcome.result, outcome.files
    schema = cfg.data.schema_
    source = cfg.resolved_source
    files_read = sorted({name for part in (result.clean, result.quarantine) if "_file" in part.column_names
                         for name in pc.unique(part.column("_file")).to_pylist()})
    info = prepare(
        result.clean,
        schema,
        cfg.data.split,
        cfg.data.vocab,
        cfg.data.negatives,
        cfg.resolved_prepared_dir,
        history_length=cfg.data.history_length,
        seed=cfg.seed,
        source={"path": str(source), "format": cfg.data.format, "files": files_read,
                "validation": result.report()},
        extra_files={Path(p).name: Path(p) for p in files.values()},
    )
    return info, result


def feature_spec(prepared_dir: Path) -> FeatureSpec:
    meta = read_json(prepared_dir / "meta.json")
    return FeatureSpec(
        categorical=tuple(f["name"] for f in meta["fields"]),
        cardinalities=tuple(int(f["cardinality"]) for f in meta["fields"]),
        numeric=tuple(n["name"] for n in meta["numeric"]),
        roles=tuple(f["role"] for f in meta["fields"]),
    )


def _validator(prepared: Path, batch_size: int) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Validation on the prepared valid split, loaded on first use: under DDP only rank 0 calls it."""
    loaded: list[SplitData] = []

    def run(model: torch.nn.Module) -> dict[str, float]:
        if not loaded:
            loaded.append(SplitData.load(prepared, "valid"))
        metrics = evaluate(model, loaded[0], batch_size)
        return {k: metrics[k] for k in ("auc", "gauc", "logloss")}

    return run


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
                init_weights: Callable[[torch.nn.Module, FeatureSpec], dict[str, Any]] | None = None,
                log: Log = print) -> TrainResult:
    """Train into the run directory, holding its lock (rank 0 of a torchrun job, or a single process)."""
    # The other ranks of a torchrun job share rank 0's run directory (and its lock).
    lock = lock_run_dir(cfg.resolved_run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        return _train_model(cfg, resume=resume, resume_from=resume_from, init_weights=init_weights, log=log)


def _train_model(cfg: Config, *, resume: bool = False, resume_from: str | None = None,
                 init_weights: Callable[[torch.nn.Module, FeatureSpec], dict[str, Any]] | None = None,
                 log: Log = print) -> TrainResult:
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
        features = feature_spec(prepared)
        prepared_meta = read_json(prepared / "meta.json")
        if cfg.model.name == "din" and not prepared_meta.get("history_length"):
            raise ValueError("model din needs user histories: set data.history_length (e.g. 20) and run "
                             "`recforge data prepare` again")
        model = build_model(features, cfg.model, sparse=cfg.train.sparse_embeddings)
        if init_weights is not None and not resume:
            log(f"initial weights: {init_weights(model, features)}")
        train_data = SplitData.load(prepared, "train")
        validate_fn = None
        if prepared_meta["split"]["valid"]["rows"]:
            validate_fn = (_retrieval_validator(prepared, features) if cfg.train.early_stopping_metric == "recall@20"
                           else _validator(prepared, cfg.train.eval_batch_size))
        if dist_ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_json(run_dir / "env.json", env_fingerprint())
            write_json(run_dir / "features.json", {"categorical": list(features.categorical),
                                                   "cardinalities": list(features.cardinalities),
                                                   "numeric": list(features.numeric),
                                                   "roles": list(features.roles)})
        digest_extra = {"model": cfg.model.model_dump(), "seed": cfg.seed, "features": features.__dict__,
                        "rows": prepared_meta["rows"], "split": prepared_meta["split"]}
        objective = None
        if isinstance(model, TwoTower):
            train_data, objective = _retrieval_setup(model, train_data, features, cfg)
        log(f"training {cfg.model.name} on {len(train_data):,} rows -> {run_dir}")
        result = train(model, train_data, validate_fn, cfg.train, run_dir, seed=cfg.seed,
                       digest_extra=digest_extra, resume=resume, dist_ctx=dist_ctx, objective=objective, log=log)
        if dist_ctx.is_main and isinstance(model, TwoTower) and (run_dir / "model.pt").is_file():
            # The index is part of a retrieval model: built from the best weights, saved beside them.
            model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
            index = build_item_index(model.cpu().eval(), prepared, features, run_dir / "index")
            log(f"item index: {index.kind}, {index.count:,} items"
                + (f", recall@10 vs exact {index.build_recall:.3f}" if index.build_recall is not None else ""))
        if dist_ctx.is_main:
            write_json(run_dir / "train_summary.json", {
                "finished": result.state.finished, "interrupted": result.interrupted,
                "epochs_run": len(result.state.history), "best_epoch": result.state.best_epoch,
                "best_valid": result.state.best_metric, "metric": cfg.train.early_stopping_metric,
                "global_step": result.state.global_step, "device": result.device,
                "device_reason": result.device_reason, "samples_per_s": result.samples_per_s,
                "world_size": dist_ctx.world_size,
            })
        return result
    finally:
        cleanup_distributed()


def _retrieval_validator(prepared: Path, features: FeatureSpec) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Full-catalog Recall/NDCG@20 on the valid split (a two-tower model's own goal), loaded on first use."""
    item_col = features.columns("item")[0]
    loaded: list[tuple[RetrievalTask, torch.Tensor]] = []

    def run(model: torch.nn.Module) -> dict[str, float]:
        if not isinstance(model, TwoTower):
            raise ValueError("train.early_stopping_metric=recall@20 needs a retrieval model (two_tower)")
        if not loaded:
            valid = SplitData.load(prepared, "valid")
            times = np.load(prepared / "valid" / "timestamp.npy")
            loaded.append((retrieval_task(SplitData.load(prepared, "train"), valid, times, item_col),
                           item_catalog(prepared, features)))
        task, catalog = loaded[0]
        device = next(model.parameters()).device
        batch = task.queries.batch(torch.arange(len(task.queries))).to(device)
        with torch.no_grad():
            users = model.user_vector(batch.categorical, batch.numeric, batch.history_values,
                                      batch.history_offsets).float().cpu().numpy()
            items = model.item_vector(catalog.to(device)).float().cpu().numpy()
        metrics = full_catalog_metrics(lambda a, b: users[a:b] @ items.T, len(task.users), task.truth,
                                       task.exclude, len(items), ks=(20,))
        return {"recall@20": metrics["recall@20"], "ndcg@20": metrics["ndcg@20"]}

    return run


def _retrieval_setup(
    model: TwoTower, train_data: SplitData, features: FeatureSpec, cfg: Config
) -> tuple[SplitData, InBatchRetrieval]:
    """Two-tower training sees the positive (user, item) rows; logQ comes from their item frequencies."""
    positives = train_data.select(torch.nonzero(train_data.label > 0).squeeze(1))
    if len(positives) == 0:
        raise ValueError("the training split has no positive rows to train a retrieval model on")
    item_field = features.columns("item")[0]
    counts = torch.bincount(positives.categorical[:, item_field], minlength=features.cardinalities[item_field])
    log_q = torch.log((counts.double() + 1.0) / (counts.sum() + len(counts)))
    return positives, InBatchRetrieval(model, log_q, item_field, cfg.model.retrieval_loss)


def item_catalog(prepared: Path, features: FeatureSpec) -> torch.Tensor:
    """[items, 1 + item features]: each item index's item-side columns (item id, then its features)."""
    item_features = np.load(prepared / "items" / "features.npy")
    ids = np.arange(len(item_features), dtype=np.int64)[:, None]
    return torch.from_numpy(np.concatenate([ids, item_features], axis=1))


def build_item_index(
    model: TwoTower, prepared: Path, features: FeatureSpec, out_dir: Path, kind: str = "auto"
) -> ItemIndex:
    """Item-tower vectors of every known item (index 0, the unknown item, left out) in a FAISS index."""
    with torch.no_grad():
        vectors = model.item_vector(item_catalog(prepared, features)).numpy()
    index = ItemIndex.build(vectors[1:], kind=kind, metric="ip")
    index.save(out_dir)
    return index


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no trained run at {run_dir} (missing config.yaml); run `recforge train` first")
    return config_module.load(path)


def load_trained_model(run_dir: Path) -> torch.nn.Module:
    run_cfg = load_run_config(run_dir)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} has no model.pt: the run ended before its first epoch finished")
    features_raw = read_json(run_dir / "features.json")
    features = FeatureSpec(tuple(features_raw["categorical"]), tuple(features_raw["cardinalities"]),
                           tuple(features_raw["numeric"]), tuple(features_raw.get("roles", ())))
    model = build_model(features, run_cfg.model, sparse=run_cfg.train.sparse_embeddings)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    return model


def warn_environment_drift(run_dir: Path, log: Log) -> list[str]:
    """Say so when this environment differs from the run's in a way that can change results."""
    env_file = run_dir / "env.json"
    drift = environment_drift(read_json(env_file)) if env_file.is_file() else []
    for line in drift:
        log(f"warning: {run_dir} was trained in another environment: {line}; results may differ")
    return drift


def evaluate_run(
    cfg: Config, split: str = "test", without_history: bool = False, log: Log = print
) -> dict[str, dict[str, float]]:
    """Model vs popularity on the same held-out split, written to run_dir/evaluation_<split>.json.

    `without_history` scores with every user history emptied: the ablation that shows how much a
    sequence model (DIN) takes from the history.
    """
    run_dir = cfg.resolved_run_dir
    run_cfg = load_run_config(run_dir)
    prepared = run_cfg.resolved_prepared_dir
    model = load_trained_model(run_dir)
    warn_environment_drift(run_dir, log)
    data = SplitData.load(prepared, split)
    if len(data) == 0:
        raise ValueError(f"split '{split}' of {prepared} is empty")
    if without_history and data.history_offsets is not None:
        data = dataclasses.replace(data, history_values=torch.zeros(0, dtype=torch.long),
                                   history_offsets=torch.zeros(len(data) + 1, dtype=torch.long))
    train_data = SplitData.load(prepared, "train")
    features = feature_spec(prepared)
    item_field = features.categorical.index(run_cfg.data.schema_.item)
    popularity = fit_popularity(train_data.categorical.numpy(), train_data.label.numpy().astype(np.float64),
                                item_field, features.cardinalities[item_field])
    results = {
        "model": evaluate(model, data, cfg.train.eval_batch_size),
        "popularity": evaluate(popularity, data, cfg.train.eval_batch_size),
    }
    suffix = "_without_history" if without_history else ""
    write_json(run_dir / f"evaluation_{split}{suffix}.json", {"split": split, **results})
    return results


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


def popularity_tables(prepared: Path, features: FeatureSpec) -> dict[str, np.ndarray]:
    """Cold-start tables from the train split's positives: clicks per item row ("overall", float32
    [item rows]) and per context value x item row (one float32 [field rows, item rows] per context field).

    What a server falls back to for a user it cannot personalize: the most clicked items, or the
    most clicked in the request's context (device, hour, ...). One bincount per table, no row loop.
    """
    train_data = SplitData.load(prepared, "train")
    positive = (train_data.label > 0).numpy()
    categorical = train_data.categorical.numpy()[positive]
    item_col = features.columns("item")[0]
    n_items = features.cardinalities[item_col]
    items = categorical[:, item_col]
    tables = {"overall": np.bincount(items, minlength=n_items).astype(np.float32)}
    for col in features.columns("context"):
        rows = features.cardinalities[col]
        flat = np.bincount(categorical[:, col] * n_items + items, minlength=rows * n_items)
        tables[features.categorical[col]] = flat.reshape(rows, n_items).astype(np.float32)
    return tables


def export_run(run: Path, out: Path | str, *, formats: tuple[str, ...] = ("torchscript",),
               parity_rows: int = 2048) -> Path | str:
    """Export a trained run as a bundle at `out`: a local path, file://, or an object-store URI (s3://).

    Composition lives here, not in the bundle module, so serving never imports the training side.
    A remote bundle is written and verified in a local temporary directory first, then uploaded
    with `recforge.storage.put_dir` (atomic: readers see it only once complete). Returns the
    bundle's local Path, or the URI itself for a remote `out`.
    """
    import shutil
    import tempfile

    from recforge import bundle, storage

    run = Path(run)
    target = str(out)
    if storage.is_remote(target):
        put_dir = getattr(storage, "put_dir", None)
        if put_dir is None:
            raise RuntimeError(f"cannot write a bundle to {target}: this recforge has no recforge.storage.put_dir; "
                               "export to a local --out and copy it")
        if storage.exists(target):
            raise FileExistsError(f"{target} already exists; bundles are never overwritten, choose another --out")
        staging = Path(tempfile.mkdtemp(prefix="recforge-export-"))
        try:
            local = export_run(run, staging / "bundle", formats=formats, parity_rows=parity_rows)
            put_dir(Path(local), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
    if "://" in target and not target.startswith("file://"):
        raise ValueError(f"--out {target}: unsupported URI scheme; use a local path, file://, or s3://")
    out_dir = Path(target.removeprefix("file://"))
    run_cfg = load_run_config(run)
    model = load_trained_model(run)
    prepared = run_cfg.resolved_prepared_dir
    held_out = SplitData.load(prepared, "test")
    if len(held_out) == 0:
        held_out = SplitData.load(prepared, "valid")
    if len(held_out) == 0:
        raise ValueError(f"{prepared} has no test or valid rows to check the exported model on")
    rows = held_out.batch(torch.arange(min(parity_rows, len(held_out))))
    features = feature_spec(prepared)
    catalog = item_catalog(prepared, features).numpy()
    item_rows = features.cardinalities[features.columns("item")[0]]
    if len(catalog) != item_rows:
        raise ValueError(f"{prepared}/items/features.npy has {len(catalog)} rows but the item vocabulary has "
                         f"{item_rows}; run `recforge data prepare` again")
    evaluation = run / "evaluation_test.json"
    return bundle.write_bundle(
        model, out_dir, model_name=run_cfg.model.name, features=read_json(run / "features.json"),
        vocab_dir=prepared / "vocab", config=run_cfg.to_dict(),
        metrics=read_json(evaluation) if evaluation.is_file() else {},
        data_fingerprint=bundle.data_fingerprint(read_json(prepared / "meta.json")),
        parity_inputs=(rows.categorical, rows.numeric, rows.history_values, rows.history_offsets),
        item_index_dir=run / "index" if isinstance(model, TwoTower) else None,
        item_features=catalog, popularity=popularity_tables(prepared, features), formats=formats,
    )
