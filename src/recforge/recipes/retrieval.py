"""Retrieval as commands: full-catalog evaluation of a two-tower run, two-stage recommendations,
and the item index a retrieval run ships.

Composition only: it loads runs, vocabularies and the prepared data, and hands plain tensors to
recforge.recommend, the same functions the server calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from recforge.config import Config
from recforge.data.batches import SplitData
from recforge.data.shards import split_column
from recforge.data.vocab import load_vocabs
from recforge.evaluate import full_catalog_metrics, retrieval_task
from recforge.features import FeatureLayout
from recforge.index import ItemIndex
from recforge.models import model_entry
from recforge.recipes.runs import empty_split_message, feature_layout, item_catalog, load_run_config, load_trained_model
from recforge.recommend import Requests, recommend
from recforge.storage import write_json


def build_item_index(
    model: torch.nn.Module, prepared: Path, features: FeatureLayout, out_dir: Path, kind: str = "auto"
) -> ItemIndex:
    """Item-tower vectors of every known item (index 0, the unknown item, left out) in a FAISS index."""
    with torch.no_grad():
        vectors = model.item_vector(item_catalog(prepared, features)).numpy()
    index = ItemIndex.build(vectors[1:], kind=kind, metric="ip")
    index.save(out_dir)
    return index


def is_retrieval(run_cfg: Config) -> bool:
    """Whether a run's model is a retrieval model, by its MODELS entry."""
    return model_entry(run_cfg.model.name).kind == "retrieval"


def evaluate_retrieval(cfg: Config, split: str = "test", ks: tuple[int, ...] = (10, 20),
                       users_from: str | None = None) -> dict[str, dict[str, float]]:
    """Two-tower vs popularity vs item co-occurrence, ranking the FULL catalog for each user.

    Users: those with at least one positive in `split` (`users_from` "warm": only those with one in
    training too; None: the run's train.retrieval_users); their query is their first row of the
    split (its context, and its history: clicks before it). Truth: their positives in `split`.
    Excluded from every list: items the user clicked in training.
    """
    run_dir = cfg.resolved_run_dir
    run_cfg = load_run_config(run_dir)
    prepared = run_cfg.resolved_prepared_dir
    if not is_retrieval(run_cfg):  # the config says it: no need to load the weights to refuse
        raise ValueError(f"{run_dir} holds a {run_cfg.model.name} model; retrieval evaluation needs a retrieval "
                         "model (two_tower, sasrec)")
    model = load_trained_model(run_dir)
    features = feature_layout(prepared)
    item_column = features.item_column
    num_items = features.cardinalities[item_column]
    train = SplitData.load(prepared, "train")
    data = SplitData.load(prepared, split)
    if len(data) == 0:
        raise ValueError(empty_split_message(prepared, split))
    times = split_column(prepared, split, "timestamp")
    users_from = users_from or run_cfg.train.retrieval_users
    task = retrieval_task(train, data, times, item_column, users_from)
    users, queries, truth, exclude = task.users, task.queries, task.truth, task.exclude
    train_pos = (train.label > 0).numpy()
    train_users = train.user_key[train_pos]
    train_items = train.categorical[train_pos.nonzero()[0], item_column].numpy()

    with torch.no_grad():
        hv = queries.history_values if queries.history_values is not None else torch.zeros(0, dtype=torch.long)
        ho = queries.history_offsets if queries.history_offsets is not None else torch.zeros(0, dtype=torch.long)
        user_vectors = model.user_vector(queries.categorical, queries.numeric, hv, ho).numpy()
        item_vectors = model.item_vector(item_catalog(prepared, features)).numpy()

    popularity = np.bincount(train_items, minlength=num_items).astype(np.float64)
    cooc = _cooccurrence_scorer(train_users, train_items, users, num_items, popularity)
    scorers = {
        run_cfg.model.name: lambda a, b: user_vectors[a:b] @ item_vectors.T,
        "popularity": lambda a, b: np.broadcast_to(popularity, (b - a, num_items)).copy(),
        "cooccurrence": cooc,
    }
    results = {name: full_catalog_metrics(fn, len(users), truth, exclude, num_items, ks)
               for name, fn in scorers.items()}
    suffix = "" if users_from == "all" else f"_{users_from}"
    write_json(run_dir / f"evaluation_retrieval_{split}{suffix}.json",
               {"split": split, "users_from": users_from, "users": int(len(users)), **results})
    return results


def _cooccurrence_scorer(
    train_users: np.ndarray, train_items: np.ndarray, eval_users: np.ndarray, num_items: int,
    popularity: np.ndarray,
) -> Callable[[int, int], np.ndarray]:
    """Item-to-item co-occurrence (cosine of item columns of the training user x item matrix):
    score(u, i) = sum over the user's training items j of cos(j, i)."""
    all_users, user_row = np.unique(train_users, return_inverse=True)
    # R: training users x items, binary; Rn: the same with item columns scaled to unit norm.
    pairs = np.unique(user_row.astype(np.int64) * num_items + train_items)
    rows, cols = pairs // num_items, pairs % num_items
    index = torch.from_numpy(np.stack([rows, cols]))
    shape = (len(all_users), num_items)
    ones = torch.ones(len(rows), dtype=torch.float64)
    r_t = torch.sparse_coo_tensor(index, ones, shape, check_invariants=True).t().coalesce()
    norm = torch.from_numpy(1.0 / np.sqrt(np.maximum(popularity[cols], 1.0)))
    rn = torch.sparse_coo_tensor(index, norm, shape, check_invariants=True).coalesce()
    rn_t = rn.t().coalesce()
    eval_row = np.searchsorted(all_users, eval_users)
    has_train = (eval_row < len(all_users)) & (all_users[np.minimum(eval_row, len(all_users) - 1)] == eval_users)

    def score(start: int, stop: int) -> np.ndarray:
        chunk = torch.zeros((stop - start, len(all_users)), dtype=torch.float64)
        local = np.flatnonzero(has_train[start:stop])
        chunk[local, eval_row[start:stop][local]] = 1.0
        # The users' training rows of R, times Rn^T Rn (item-item cosine), as sparse products.
        user_items = torch.sparse.mm(r_t, chunk.t()).t()  # [chunk, items]
        return torch.sparse.mm(rn_t, torch.sparse.mm(rn, user_items.t())).t().numpy()

    return score


@dataclass(frozen=True)
class Recommendation:
    user: str
    known_user: bool
    items: list[dict[str, Any]]


def recommend_users(
    cfg: Config,
    users: list[str],
    *,
    retrieval_run: Path,
    ranking_run: Path,
    k: int = 10,
    num_candidates: int = 200,
    context: dict[str, str] | None = None,
    exclude_seen: bool = True,
) -> list[Recommendation]:
    """Two-stage recommendations for raw user ids: two-tower + index -> ranker -> top k."""
    retrieval_cfg = load_run_config(retrieval_run)
    ranking_cfg = load_run_config(ranking_run)
    prepared = retrieval_cfg.resolved_prepared_dir
    if ranking_cfg.resolved_prepared_dir.resolve() != prepared.resolve():
        raise ValueError(f"the retrieval run ({retrieval_run}) and the ranking run ({ranking_run}) were trained "
                         "on different prepared datasets; their item ids do not match")
    if not is_retrieval(retrieval_cfg):
        raise ValueError(f"{retrieval_run} holds a {retrieval_cfg.model.name} model, not a retrieval model "
                         "(two_tower, sasrec)")
    tower = load_trained_model(retrieval_run)
    ranker = load_trained_model(ranking_run)
    features = feature_layout(prepared)
    index_dir = retrieval_run / "index"
    index = ItemIndex.load(index_dir) if (index_dir / "index.json").is_file() else build_item_index(
        tower, prepared, features, index_dir)
    vocabs = load_vocabs(prepared / "vocab")
    users_in = user_requests(prepared, features, vocabs, retrieval_cfg.data.schema_, users, context, exclude_seen)

    def user_encoder(cat, num, hv, ho):  # noqa: ANN001, ANN202
        return tower.user_vector(cat, num, hv, ho)

    item_columns = features.item_columns
    catalog = item_catalog(prepared, features)
    result = recommend(users_in.requests, user_encoder, index, ranker, item_columns, catalog[1:], k=k,
                       num_candidates=min(num_candidates, index.count), exclude=users_in.exclude)
    item_vocab = vocabs[retrieval_cfg.data.schema_.item]
    out = []
    for row, user in enumerate(users):
        ids = result.items[row]
        keep = ids >= 0
        item_index = (ids[keep] + 1).numpy()
        names = item_vocab.decode(item_index)
        out.append(Recommendation(user=user, known_user=bool(users_in.known[row]), items=[
            {"item": name, "ranking_score": float(rs), "retrieval_score": float(ret)}
            for name, rs, ret in zip(names, result.ranking_scores[row][keep].tolist(),
                                     result.retrieval_scores[row][keep].tolist(), strict=True)
        ]))
    return out


@dataclass(frozen=True)
class UserRequests:
    """Raw user ids as model requests: ranking-layout rows, and each user's seen items (index - 1)."""

    requests: Requests
    known: np.ndarray  # bool per user: in the training vocabulary
    exclude: tuple[np.ndarray, np.ndarray] | None  # CSR (indptr, item positions), or None


def user_requests(prepared: Path, features: FeatureLayout, vocabs: dict[str, Any], schema: Any, users: list[str],
                  context: dict[str, str] | None, exclude_seen: bool) -> UserRequests:
    """Each user's row (their id, the given context, numeric features at their training mean, their latest
    clicks as history) and, with `exclude_seen`, the items they clicked anywhere in the prepared data."""
    user_col, item_column = features.column("user"), features.item_column
    context = dict(context or {})
    unknown = sorted(set(context) - set(schema.context))
    if unknown:
        raise ValueError(f"unknown context field(s) {unknown}; this model's context fields: {schema.context}")
    encoded_users = vocabs[schema.user].encode(pa.array(users, pa.string()))
    categorical = torch.zeros((len(users), len(features.categorical)), dtype=torch.long)
    categorical[:, user_col] = torch.from_numpy(encoded_users)
    for field, value in context.items():
        column = features.categorical.index(field)
        categorical[:, column] = int(vocabs[field].encode(pa.array([value], pa.string()))[0])
    numeric = torch.zeros((len(users), len(features.numeric)))  # standardized features at their mean
    clicked = _clicks_by_user(prepared, user_col, item_column, encoded_users)
    history_length = features.history_length
    values, offsets = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if history_length:
        histories = [items[-history_length:] for items in clicked]
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        offsets = torch.zeros(len(users) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        values = torch.from_numpy(np.concatenate(histories).astype(np.int64))
    exclude = None
    if exclude_seen:
        seen = [np.unique(c) - 1 for c in clicked]  # index positions are item id - 1 (row 0 is left out)
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seen], out=indptr[1:])
        exclude = (indptr, np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, np.int64))
    return UserRequests(Requests(categorical, numeric, values, offsets), encoded_users > 0, exclude)


def _clicks_by_user(prepared: Path, user_col: int, item_column: int, encoded_users: np.ndarray) -> list[np.ndarray]:
    """Each requested (known) user's clicked item indices over all splits, oldest first."""
    cats, times = [], []
    for split in ("train", "valid", "test"):
        categorical = split_column(prepared, split, "categorical")
        label = split_column(prepared, split, "label")
        mask = (label > 0) & np.isin(categorical[:, user_col], encoded_users[encoded_users > 0])
        cats.append(np.asarray(categorical[mask][:, [user_col, item_column]]))
        times.append(np.asarray(split_column(prepared, split, "timestamp")[mask]))
    pairs, when = np.concatenate(cats), np.concatenate(times)
    order = np.lexsort((when, pairs[:, 0]))
    pairs = pairs[order]
    out = []
    for user in encoded_users:
        if user == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        lo, hi = np.searchsorted(pairs[:, 0], [user, user + 1])
        out.append(pairs[lo:hi, 1].astype(np.int64))
    return out
