"""`recforge predict`: a trained run's scores for every row of a file, and its top-K lists for users,
as Parquet, to compare with other systems or to feed a job of one's own.

Scores keep the input's order and identity: every output row is the input row of the same `_file`
and `_row` (the reader's 1-based row number), with the columns asked for by `--keep`, the model's
`logit` and `score` (its sigmoid), and `_reason`: null where the row was scored, otherwise why it
could not be (the validator's reason: missing_user, bad_numeric, ...), with a null score. Top-K
lists rank the whole catalog for each user (no index, no candidate cut: exact), excluding what the
user clicked in the prepared data unless asked not to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recforge.config import Config
from recforge.data.attributes import load_attributes
from recforge.data.batches import SplitData
from recforge.data.schema import DataError
from recforge.data.score_input import histories_before, read_score_input
from recforge.data.vocab import load_vocabs
from recforge.evaluate import predict_logits
from recforge.recipes.retrieval import is_retrieval, user_requests
from recforge.recipes.runs import feature_layout, item_catalog, load_run_config, load_trained_model
from recforge.recommend import Requests
from recforge.storage import atomic_open, read_json

PREDICTION_COLUMNS = ("logit", "score", "_reason")
# Rows of (user, item) pairs a ranker scores at once when ranking the catalog for a batch of users.
_PAIRS_PER_BATCH = 1 << 20
# [users, items] scores held at once (4 bytes each): users are ranked in chunks of this many scores.
_SCORES_PER_CHUNK = 1 << 24


@dataclass(frozen=True)
class ScoreReport:
    out: Path
    rows: int
    scored: int
    not_scored: dict[str, int]


def score_file(cfg: Config, source: str | Path, out: Path, *, fmt: str = "auto", keep: list[str] | None = None,
               batch_size: int = 65536) -> ScoreReport:
    """Score every row of `source` with the run in cfg's run_dir; write `out` (Parquet) atomically."""
    run_dir = cfg.resolved_run_dir
    run_cfg = load_run_config(run_dir)
    prepared = run_cfg.resolved_prepared_dir
    schema = run_cfg.data.schema_
    features = feature_layout(prepared)
    meta = read_json(prepared / "meta.json")
    keep = list(keep or [])
    rows = read_score_input(source, fmt, schema, keep, load_vocabs(prepared / "vocab"), meta["numeric"],
                            load_attributes(run_cfg.data))
    clash = [c for c in rows.table.column_names if c in PREDICTION_COLUMNS]
    if clash:
        raise DataError(f"{source}: column(s) {clash} would be overwritten by the predictions; rename them")
    missing = [c for c in keep if c not in rows.table.column_names]
    if missing:
        raise DataError(f"{source}: --keep column(s) {missing} are not in the file")
    history_values = history_offsets = None
    if features.history_length:
        # Datasets prepared before history_from was recorded built their histories from every click.
        values, offsets = histories_before(prepared, rows, features.column("user"), features.item_column,
                                           features.history_length, meta.get("history_from", "all"))
        history_values, history_offsets = torch.from_numpy(values), torch.from_numpy(offsets)
    n = len(rows.reason)
    data = SplitData(name="input", categorical=torch.from_numpy(rows.categorical),
                     numeric=torch.from_numpy(rows.numeric), label=torch.zeros(n), user_key=np.zeros(n, np.int64),
                     history_values=history_values, history_offsets=history_offsets)
    logits = predict_logits(load_trained_model(run_dir), data, batch_size)
    scorable = rows.scorable
    identity = [schema.user, schema.item, *[c for c in keep if c not in (schema.user, schema.item)]]
    table = pa.table({
        "_file": rows.table.column("_file"), "_row": rows.table.column("_row"),
        **{c: rows.table.column(c) for c in identity},
        "logit": pa.array(logits, mask=~scorable),
        "score": pa.array(1.0 / (1.0 + np.exp(-logits)), mask=~scorable),
        "_reason": pa.array(rows.reason, pa.string()),
    })
    _write_parquet(table, out)
    reasons: dict[str, int] = {}
    for reason in rows.reason:
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    return ScoreReport(out, n, int(scorable.sum()), reasons)


def top_k(cfg: Config, users: list[str], out: Path, *, k: int = 10, context: dict[str, str] | None = None,
          exclude_seen: bool = True) -> dict[str, Any]:
    """The run's k best items of the whole catalog for each user, as rows (user, known_user, rank, item, score)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not users:
        raise ValueError("no users to rank items for")
    run_dir = cfg.resolved_run_dir
    run_cfg = load_run_config(run_dir)
    prepared = run_cfg.resolved_prepared_dir
    features = feature_layout(prepared)
    vocabs = load_vocabs(prepared / "vocab")
    schema = run_cfg.data.schema_
    model = load_trained_model(run_dir).eval()
    request = user_requests(prepared, features, vocabs, schema, users, context, exclude_seen)
    catalog = item_catalog(prepared, features)[1:]  # row 0 (unknown item) is never recommended
    chunk = max(1, _SCORES_PER_CHUNK // len(catalog))  # users whose [users, items] scores are held at once
    values, indices = [], []
    for lo in range(0, len(users), chunk):
        hi = min(lo + chunk, len(users))
        with torch.no_grad():
            scores = _catalog_scores(model, run_cfg, _slice(request.requests, lo, hi), features.item_columns,
                                     catalog)
        if request.exclude is not None:
            indptr, positions = request.exclude
            rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo:hi + 1]))
            scores[torch.from_numpy(rows), torch.from_numpy(positions[indptr[lo]:indptr[hi]])] = float("-inf")
        best = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        values.append(best.values)
        indices.append(best.indices)
    best_values, best_indices = torch.cat(values), torch.cat(indices)
    item_names = vocabs[schema.item].decode((best_indices + 1).reshape(-1).numpy())
    kept = torch.isfinite(best_values).reshape(-1).numpy()
    count = best_values.shape[1]
    table = pa.table({
        "user": pa.array(np.repeat(np.array(users, dtype=object), count)[kept].tolist(), pa.string()),
        "known_user": pa.array(np.repeat(request.known, count)[kept]),
        "rank": pa.array(np.tile(np.arange(1, count + 1), len(users))[kept].astype(np.int32)),
        "item": pa.array([name for name, keep in zip(item_names, kept, strict=True) if keep], pa.string()),
        "score": pa.array(best_values.reshape(-1).numpy().astype(np.float64)[kept]),
    })
    _write_parquet(table, out)
    return {"out": str(out), "users": len(users), "known_users": int(request.known.sum()), "rows": table.num_rows,
            "k": k, "model": run_cfg.model.name, "exclude_seen": exclude_seen}


def _catalog_scores(model: torch.nn.Module, run_cfg: Config, requests: Requests, item_columns: list[int],
                    catalog: torch.Tensor) -> torch.Tensor:
    """[users, items] scores: a retrieval model's dot products, or a ranker's logit of every pair."""
    if is_retrieval(run_cfg):
        user = model.user_vector(requests.categorical, requests.numeric, requests.history_values,
                                 requests.history_offsets)
        return user @ model.item_vector(catalog).T
    items = len(catalog)
    per_batch = max(1, _PAIRS_PER_BATCH // items)
    out = []
    for lo in range(0, len(requests.categorical), per_batch):
        hi = min(lo + per_batch, len(requests.categorical))
        pairs = requests.categorical[lo:hi].repeat_interleave(items, dim=0)
        pairs[:, item_columns] = catalog.repeat(hi - lo, 1)
        numeric = requests.numeric[lo:hi].repeat_interleave(items, dim=0)
        values, offsets = _repeat_histories(requests.history_values, requests.history_offsets, lo, hi, items)
        out.append(model(pairs, numeric, values, offsets).reshape(hi - lo, items))
    return torch.cat(out)


def _slice(requests: Requests, lo: int, hi: int) -> Requests:
    """Users lo..hi of a batch of requests (their histories re-based)."""
    values, offsets = requests.history_values, requests.history_offsets
    if offsets.numel():
        values = values[offsets[lo]:offsets[hi]]
        offsets = offsets[lo:hi + 1] - offsets[lo]
    return Requests(requests.categorical[lo:hi], requests.numeric[lo:hi], values, offsets)


def _repeat_histories(values: torch.Tensor, offsets: torch.Tensor, lo: int, hi: int, times: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Users lo..hi's histories, each repeated `times` times (one per catalog item), as (values, offsets)."""
    if offsets.numel() == 0:
        return values, offsets
    pieces = [values[offsets[u]:offsets[u + 1]] for u in range(lo, hi)]
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long).repeat_interleave(times)
    repeated = torch.cat([p.repeat(times) for p in pieces]) if pieces else values[:0]
    new_offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    return repeated, new_offsets


def _write_parquet(table: pa.Table, out: Path) -> None:
    """Written to a temporary sibling and renamed: a reader never sees half a file."""
    with atomic_open(out, "wb") as handle:
        pq.write_table(table, handle)
