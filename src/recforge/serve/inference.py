"""Loaded model versions and the batched computations the server runs on them.

A `LoadedModel` is one registry version of a bundle plus the lookups derived from it once at load
time (column positions, decoded item ids, item catalog), so a request only does array work: one
user-tower call, one FAISS search and one ranker call per batch of requests (recforge.recommend).

The retrieval model and the ranker may come from different training runs (an A/B variant, a
canary), so their item vocabularies need not agree; items are carried between them by raw id, and
the ranker-side item columns for every index position are built once per (retrieval, ranker) pair.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recforge import registry
from recforge.bundle import Bundle, VocabTable, load_bundle
from recforge.features import row_keys, vocab_remap
from recforge.recommend import Requests, rank, retrieve
from recforge.runtime import environment_drift
from recforge.storage import read_json

log = logging.getLogger("recforge.serve")

RawId = int | str
# Numeric features (e.g. position) are not known when a request is scored: they are fed as 0, which
# after the training-time standardization is the training mean (e.g. the average feed position).
NUMERIC_DEFAULT = 0.0


class ModelError(RuntimeError):
    """A loaded model failed at inference (a bug or a broken bundle), as opposed to a bad request."""


def _reason(exc: BaseException) -> str:
    """The informative line of an exception (TorchScript puts the raised message last, after its trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def typed_id(key: str) -> RawId:
    """A vocabulary key back as the JSON value clients use: canonical integers as int, the rest as str."""
    if key.lstrip("-").isdigit():
        value = int(key)
        if str(value) == key and -(2**63) <= value < 2**63:
            return value
    return key


def _typed_keys(table: VocabTable) -> np.ndarray:
    keys = np.empty(table.size, dtype=object)
    keys[0] = None
    if table.keys is not None:
        keys[1:] = [typed_id(k) for k in table.keys]
    return keys


@dataclass
class LoadedModel:
    """One registry version, ready to serve. `catalog` rows follow this bundle's item vocabulary."""

    name: str
    version: int
    bundle: Bundle
    categorical: list[str]
    user_col: int | None
    context_cols: dict[str, int]
    item_columns: list[int]
    item_fields: list[str]
    num_numeric: int
    history_length: int
    item_vocab: VocabTable
    item_keys: np.ndarray  # raw ids per item row (object), row 0 None
    catalog: np.ndarray | None  # [item rows, len(item_columns)] int64, or None when the bundle has no item catalog
    popularity: dict[str, np.ndarray] = field(default_factory=dict)
    drift: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.bundle.kind

    def feature_values(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Raw item-side feature values (as clients would write them) for item rows of this vocabulary."""
        if self.catalog is None:
            return {}
        decoded = self.__dict__.get("_feature_keys")
        if decoded is None:  # decoded once per loaded version (a benign race: both threads compute the same)
            decoded = {name: _typed_keys(self.bundle.vocab[name]) for name in self.item_fields[1:]}
            self.__dict__["_feature_keys"] = decoded
        return {name: decoded[name][self.catalog[rows, j]] for j, name in enumerate(self.item_fields[1:], start=1)}


def load_model(registry_root: str | Path, name: str, version: int) -> LoadedModel:
    """Resolve, verify and load one version; everything per-item is computed here, not per request."""
    path = registry.resolve(registry_root, name, version)
    bundle = load_bundle(path)
    if bundle.index is not None:
        import faiss  # loaded with the first retrieval bundle only (a ranking-only server never needs it)

        faiss.omp_set_num_threads(1)  # one thread per model call, like torch (serve/lifecycle.py)
    layout = bundle.layout
    categorical, roles = list(layout.categorical), list(layout.field_roles)
    item_columns = layout.item_columns
    item_name = layout.field_name("item")
    catalog = getattr(bundle, "item_features", None)
    popularity = dict(getattr(bundle, "popularity", None) or {})
    env_file = path / "env.json"
    drift = environment_drift(read_json(env_file)) if env_file.is_file() else []
    # Bundles exported before the layout recorded it carry it in their training config only.
    history_length = layout.history_length or int(((bundle.config.get("data") or {}).get("history_length")) or 0)
    return LoadedModel(
        name=name, version=int(version), bundle=bundle, categorical=categorical,
        user_col=roles.index("user") if "user" in roles else None,
        context_cols={categorical[i]: i for i, role in enumerate(roles) if role == "context"},
        item_columns=item_columns, item_fields=[categorical[i] for i in item_columns],
        num_numeric=len(layout.numeric), history_length=history_length,
        item_vocab=bundle.vocab[item_name], item_keys=_typed_keys(bundle.vocab[item_name]),
        catalog=None if catalog is None else np.asarray(catalog, dtype=np.int64), popularity=popularity, drift=drift)


def encode_items(target: LoadedModel, keys: Sequence[str | None], source: LoadedModel | None) -> np.ndarray:
    """[len(keys), len(target.item_columns)]: `target`'s item columns for raw item ids.

    From the target's own catalog when it has one; otherwise item features are carried over from
    `source`'s catalog by raw value (the item id column is always the target's own row).
    """
    rows = np.asarray(target.item_vocab.lookup(list(keys)), dtype=np.int64)
    if target.catalog is not None:
        return target.catalog[rows]
    out = np.zeros((len(keys), len(target.item_columns)), dtype=np.int64)
    out[:, 0] = rows
    if source is None or source.catalog is None:
        return out
    source_rows = np.asarray(source.item_vocab.lookup(list(keys)), dtype=np.int64)
    for j, name in enumerate(target.item_fields[1:], start=1):
        if name not in source.item_fields or name not in source.bundle.vocab:
            continue
        column = source.catalog[source_rows, source.item_fields.index(name)]
        table = source.bundle.vocab[name]
        out[:, j] = vocab_remap(row_keys(table.keys, table.size), target.bundle.vocab[name].lookup)[column]
    return out


def item_key_strings(model: LoadedModel) -> list[str | None]:
    table = model.item_vocab
    return [None, *(table.keys or ())]


@dataclass(frozen=True)
class Query:
    """One request as the model threads see it (already routed to versions)."""

    user_id: RawId
    context: Mapping[str, Any]
    k: int
    exclude_seen: bool
    seen: tuple[str, ...]  # raw item ids (as strings) the server has seen this user interact with
    clicked: tuple[str, ...]  # raw item ids clicked, oldest first (the history features)


@dataclass(frozen=True)
class Ranked:
    items: list[RawId]
    scores: list[float]
    retrieval_scores: list[float | None]
    cold_start: bool


def encode_requests(model: LoadedModel, queries: Sequence[Query]) -> Requests:
    """The batch in `model`'s categorical layout: user and context columns filled, item columns 0."""
    batch = len(queries)
    categorical = torch.zeros((batch, len(model.categorical)), dtype=torch.long)
    if model.user_col is not None:
        table = model.bundle.vocab[model.categorical[model.user_col]]
        categorical[:, model.user_col] = torch.tensor(table.lookup([str(q.user_id) for q in queries]))
    for name, col in model.context_cols.items():
        values = [q.context.get(name) for q in queries]
        if any(v is not None for v in values):
            categorical[:, col] = torch.tensor(model.bundle.vocab[name].lookup(
                [None if v is None else str(v) for v in values]))
    numeric = torch.full((batch, model.num_numeric), NUMERIC_DEFAULT)
    values = torch.zeros(0, dtype=torch.long)
    offsets = torch.zeros(0, dtype=torch.long)
    if model.history_length:
        # Encoded as prepare encoded training histories: an item the vocabulary does not know is its OOV row (0,
        # or its hash bucket), kept in place, so the pooled history is the one the model was trained on.
        histories = [list(model.item_vocab.lookup(list(q.clicked[-model.history_length:]))) for q in queries]
        offsets = torch.zeros(batch + 1, dtype=torch.long)
        torch.cumsum(torch.tensor([len(h) for h in histories], dtype=torch.long), 0, out=offsets[1:])
        values = torch.tensor([r for h in histories for r in h], dtype=torch.long)
    return Requests(categorical, numeric, values, offsets)


def is_cold(model: LoadedModel, query: Query) -> bool:
    """No personal signal: a user id the model never saw, and no clicks the model could use as history."""
    if model.user_col is not None:
        table = model.bundle.vocab[model.categorical[model.user_col]]
        if table.lookup([str(query.user_id)])[0] > 0:
            return False
    return not (model.history_length and query.clicked)


def popular(model: LoadedModel, query: Query) -> Ranked:
    """Most popular items in the request's context (per-field popularity summed), seen items left out.

    Without popularity in the bundle, the item vocabulary order is used: it is sorted by training count.
    """
    n = model.item_vocab.size
    overall = model.popularity.get("overall")
    scores = np.asarray(overall, dtype=np.float64).copy() if overall is not None else (
        np.arange(n, 0, -1, dtype=np.float64) / n)
    used = False
    contextual = np.zeros(n, dtype=np.float64)
    for name, value in query.context.items():
        table = model.popularity.get(name)
        vocab = model.bundle.vocab.get(name)
        if table is None or vocab is None:
            continue
        row = vocab.lookup([str(value)])[0]
        if 0 < row < len(table):
            contextual += table[row]
            used = True
    if used and contextual.sum() > 0:
        scores = contextual
    scores[0] = -np.inf
    if query.exclude_seen and query.seen:
        scores[[r for r in model.item_vocab.lookup(list(query.seen)) if r > 0]] = -np.inf
    k = min(query.k, n - 1)
    top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.zeros(0, dtype=np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    top = top[np.isfinite(scores[top])]
    total = float(np.sum(scores[np.isfinite(scores)])) or 1.0
    return Ranked(items=[model.item_keys[r] for r in top], scores=[float(scores[r]) / total for r in top],
                  retrieval_scores=[None] * len(top), cold_start=True)


def recommend_batch(retrieval: LoadedModel, ranker: LoadedModel, pair_catalog: torch.Tensor,
                    queries: Sequence[Query], num_candidates: int) -> list[Ranked]:
    """Two-stage recommendations for a batch routed to the same (retrieval, ranker) pair.

    Cold users get popularity; the rest share ONE user-tower call, ONE index search and ONE ranker call.
    """
    out: list[Ranked | None] = [None] * len(queries)
    warm = []
    for i, query in enumerate(queries):
        if is_cold(retrieval, query):
            out[i] = popular(retrieval, query)
        else:
            warm.append(i)
    if warm:
        batch = [queries[i] for i in warm]
        index = retrieval.bundle.index
        assert index is not None, "a retrieval LoadedModel always has an index"
        candidates_n = min(num_candidates, index.count)
        exclude = _exclusions(retrieval, batch)
        try:
            with torch.no_grad():
                candidates, retrieval_scores = retrieve(encode_requests(retrieval, batch),
                                                        retrieval.bundle.module.user_vector, index, candidates_n,
                                                        exclude)
                logits = rank(encode_requests(ranker, batch), candidates, ranker.bundle.module, ranker.item_columns,
                              pair_catalog)
        except Exception as exc:  # a broken model can raise anything; the caller decides (canary fallback)
            raise ModelError(f"{retrieval.name} v{retrieval.version} / {ranker.name} v{ranker.version} failed: "
                             f"{_reason(exc)}") from exc
        k_max = min(max(q.k for q in batch), logits.shape[1])
        top = torch.topk(logits, k_max, dim=1)
        items = candidates.gather(1, top.indices).numpy()
        probs = torch.sigmoid(top.values).numpy()
        finite = torch.isfinite(top.values).numpy()
        ret = retrieval_scores.gather(1, top.indices).numpy()
        for row, i in enumerate(warm):
            keep = finite[row] & (items[row] >= 0)
            keep[queries[i].k:] = False
            positions = items[row][keep]
            out[i] = Ranked(items=[retrieval.item_keys[p + 1] for p in positions],
                            scores=probs[row][keep].astype(float).tolist(),
                            retrieval_scores=ret[row][keep].astype(float).tolist(), cold_start=False)
    return [r for r in out if r is not None]


def _exclusions(retrieval: LoadedModel, batch: Sequence[Query]) -> tuple[np.ndarray, np.ndarray] | None:
    """Seen items as index positions (item row - 1) in CSR form, or None when nobody excludes anything."""
    lists = [sorted({r - 1 for r in retrieval.item_vocab.lookup(list(q.seen)) if r > 0}) if q.exclude_seen else []
             for q in batch]
    if not any(lists):
        return None
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=indptr[1:])
    return indptr, np.asarray([p for x in lists for p in x], dtype=np.int64)


def score_items(ranker: LoadedModel, scoring_catalog: np.ndarray, query: Query, item_ids: Sequence[RawId]
                ) -> tuple[list[RawId], list[float], list[RawId]]:
    """Ranker probabilities for the known items in one call: (known ids, scores, unknown ids)."""
    rows = np.asarray(ranker.item_vocab.lookup([str(i) for i in item_ids]), dtype=np.int64)
    known = rows > 0
    unknown = [item for item, ok in zip(item_ids, known, strict=True) if not ok]
    ids = [item for item, ok in zip(item_ids, known, strict=True) if ok]
    if not ids:
        return [], [], unknown
    requests = encode_requests(ranker, [query])
    count = len(ids)
    categorical = requests.categorical.expand(count, -1).clone()
    categorical[:, ranker.item_columns] = torch.from_numpy(scoring_catalog[rows[known]])
    numeric = requests.numeric.expand(count, -1).contiguous()
    values, offsets = requests.history_values, requests.history_offsets
    if offsets.numel() == 2:
        length = int(offsets[1])
        values = values.repeat(count)
        offsets = torch.arange(count + 1, dtype=torch.long) * length
    try:
        with torch.no_grad():
            logits = ranker.bundle.module(categorical, numeric, values, offsets).float().reshape(-1)
    except Exception as exc:  # see recommend_batch
        raise ModelError(f"{ranker.name} v{ranker.version} failed: {_reason(exc)}") from exc
    return ids, torch.sigmoid(logits).tolist(), unknown


def warm_up(retrieval: LoadedModel | None, ranker: LoadedModel | None, pair_catalog: torch.Tensor | None) -> None:
    """One small request through every path, so the first real request does not pay TorchScript's warm-up."""
    query = Query(user_id="__warmup__", context={}, k=2, exclude_seen=False, seen=(), clicked=())
    if retrieval is not None:
        popular(retrieval, query)
        index = retrieval.bundle.index
        if index is not None and ranker is not None and pair_catalog is not None:
            requests = encode_requests(retrieval, [query])
            with torch.no_grad():
                candidates, _ = retrieve(requests, retrieval.bundle.module.user_vector, index, min(4, index.count))
                rank(encode_requests(ranker, [query]), candidates, ranker.bundle.module, ranker.item_columns,
                     pair_catalog)
