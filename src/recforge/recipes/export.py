"""`recforge export`: a trained run as a bundle, with the tables a server needs without the data.

Composition lives here, not in the bundle module, so serving never imports the training side.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from recforge import bundle, storage
from recforge.data.batches import Batch, SplitData
from recforge.data.shards import split_shards
from recforge.features import FEATURES_FILE, FeatureLayout
from recforge.recipes.kinds import kind_recipe
from recforge.recipes.runs import feature_layout, item_catalog, load_run_config, load_trained_model
from recforge.storage import read_json


def popularity_tables(prepared: Path, features: FeatureLayout) -> dict[str, np.ndarray]:
    """Cold-start tables from the train split's positives: clicks per item row ("overall", float32
    [item rows]) and per context value x item row (one float32 [field rows, item rows] per context field).

    What a server falls back to for a user it cannot personalize: the most clicked items, or the
    most clicked in the request's context (device, hour, ...). One bincount per table and shard, no
    row loop; the split is read a shard at a time (its positives' categorical columns only).
    """
    item_column = features.item_column
    n_items = features.cardinalities[item_column]
    context = features.columns("context")
    overall = np.zeros(n_items, dtype=np.int64)
    by_context = {col: np.zeros(features.cardinalities[col] * n_items, dtype=np.int64) for col in context}
    for shard in split_shards(prepared, "train"):
        columns = shard.load()
        categorical = np.asarray(columns["categorical"][np.asarray(columns["label"]) > 0])
        items = categorical[:, item_column]
        overall += np.bincount(items, minlength=n_items)
        for col in context:
            by_context[col] += np.bincount(categorical[:, col] * n_items + items, minlength=len(by_context[col]))
    tables = {"overall": overall.astype(np.float32)}
    for col in context:
        tables[features.categorical[col]] = by_context[col].reshape(-1, n_items).astype(np.float32)
    return tables


def parity_rows_of(prepared: Path, count: int) -> Batch:
    """Up to `count` held-out rows (test, else valid) to check an export on, from the first shard that has
    any: an export reads one shard, not the split."""
    for split in ("test", "valid"):
        for part in SplitData.each_shard(prepared, split):
            if len(part):
                return part.batch(torch.arange(min(count, len(part))))
    raise ValueError(f"{prepared} has no test or valid rows to check the exported model on")


def export_run(run: Path, out: Path | str, *, formats: tuple[str, ...] = ("torchscript",),
               parity_rows: int = 2048) -> Path | str:
    """Export a trained run as a bundle at `out`: a local path, file://, or an object-store URI (s3://).

    A remote bundle is written and verified in a local temporary directory first, then uploaded
    with `recforge.storage.put_dir` (atomic: readers see it only once complete). Returns the
    bundle's local Path, or the URI itself for a remote `out`.
    """
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
    rows = parity_rows_of(prepared, parity_rows)
    features = feature_layout(prepared)
    catalog = item_catalog(prepared, features).numpy()
    item_rows = features.cardinalities[features.item_column]
    if len(catalog) != item_rows:
        raise ValueError(f"{prepared}/items/features.npy has {len(catalog)} rows but the item vocabulary has "
                         f"{item_rows}; run `recforge data prepare` again")
    evaluation = run / "evaluation_test.json"
    return bundle.write_bundle(
        model, out_dir, model_name=run_cfg.model.name, features=FeatureLayout.load(run / FEATURES_FILE),
        vocab_dir=prepared / "vocab", config=run_cfg.to_dict(),
        metrics=read_json(evaluation) if evaluation.is_file() else {},
        data_fingerprint=bundle.data_fingerprint(read_json(prepared / "meta.json")),
        parity_inputs=(rows.categorical, rows.numeric, rows.history_values, rows.history_offsets),
        item_index_dir=run / "index" if kind_recipe(run_cfg.model.name).item_index else None,
        item_features=catalog, popularity=popularity_tables(prepared, features), formats=formats,
    )
