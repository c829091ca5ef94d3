"""Scoring the champion bundle on the challenger's holdout.

The two models were trained on different data and so have different vocabularies: index 17 of
the challenger's item vocabulary is not the champion's item 17. The holdout is stored encoded
with the challenger's vocabularies, so each field is mapped back to raw keys (through the
prepared vocab files) and forward through the champion bundle's own vocabulary (unknown -> 0).
The map is built once per vocabulary entry, then applied to all rows with one gather: no
per-row Python.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recforge.bundle import Bundle
from recforge.data.batches import SplitData
from recforge.data.vocab import Vocab, load_vocabs
from recforge.features import FeatureLayout, vocab_remap
from recforge.storage import read_json


def vocab_map(source: Vocab, bundle: Bundle, field: str) -> np.ndarray:
    """For each index of `source`, the bundle's index of the same raw key (0 when unknown)."""
    target = bundle.vocab.get(field)
    if target is None:
        raise ValueError(f"the champion bundle has no vocabulary for field {field!r}")
    if source.is_hashed:
        if target.hash_buckets == source.hash_buckets:
            return np.arange(source.size, dtype=np.int64)  # the same hash function and buckets
        raise ValueError(f"field {field!r} is hashed in the new data ({source.hash_buckets} buckets) but the champion "
                         f"uses {target.hash_buckets}: their rows cannot be matched; keep vocab.hash_buckets fixed")
    return vocab_remap(source.decode(np.arange(source.size)), target.lookup)


def _numeric_stats(meta: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {n["name"]: (float(n["mean"]), float(n["std"])) for n in meta.get("numeric", [])}


def champion_numeric_stats(bundle: Bundle) -> tuple[dict[str, tuple[float, float]] | None, str]:
    """The champion's numeric standardization (mean, std) and where it was found.

    A bundle that records the stats itself wins; otherwise the prepared dataset its config names,
    if still on disk. None when neither is available.
    """
    stats = bundle.features.get("numeric_stats")
    if isinstance(stats, list):
        return _numeric_stats({"numeric": stats}), "bundle"
    prepared = bundle.config.get("prepared_dir")
    if prepared and (Path(prepared) / "meta.json").is_file():
        return _numeric_stats(read_json(Path(prepared) / "meta.json")), str(Path(prepared) / "meta.json")
    return None, "unknown"


def encode_for_bundle(data: SplitData, prepared_dir: Path, bundle: Bundle) -> tuple[SplitData, dict[str, Any]]:
    """`data` (encoded with the prepared dir's vocabularies) re-encoded for `bundle`; plus notes."""
    meta = read_json(Path(prepared_dir) / "meta.json")
    layout, champion = FeatureLayout.load(prepared_dir), bundle.layout
    fields = list(layout.categorical)
    vocabs = load_vocabs(Path(prepared_dir) / "vocab")
    wanted = list(champion.categorical)
    missing = [f for f in wanted if f not in fields]
    if missing:
        raise ValueError(f"the champion needs field(s) {missing} that the new data does not have")
    maps = {f: vocab_map(vocabs[f], bundle, f) for f in wanted}
    source = data.categorical.numpy()
    categorical = np.stack([maps[f][source[:, fields.index(f)]] for f in wanted], axis=1)

    notes: dict[str, Any] = {}
    numeric_names = list(layout.numeric)
    wanted_numeric = list(champion.numeric)
    absent = [n for n in wanted_numeric if n not in numeric_names]
    if absent:
        raise ValueError(f"the champion needs numeric column(s) {absent} that the new data does not have")
    ours = _numeric_stats(meta)
    theirs, where = champion_numeric_stats(bundle)
    notes["numeric_stats"] = where
    x = data.numeric.numpy().astype(np.float64)
    columns = []
    for name in wanted_numeric:
        raw = x[:, numeric_names.index(name)] * ours[name][1] + ours[name][0]
        mean, std = (theirs or ours)[name]
        columns.append((raw - mean) / std)
    numeric = np.stack(columns, axis=1) if columns else np.zeros((len(data), 0))

    values = data.history_values
    if values is not None:
        values = torch.from_numpy(maps[layout.field_name("item")][values.numpy()])
    encoded = dataclasses.replace(data, categorical=torch.from_numpy(categorical),
                                  numeric=torch.from_numpy(numeric.astype(np.float32)), history_values=values)
    notes["item_field"] = champion.field_name("item") if "item" in champion.roles else None
    return encoded, notes


def item_known(data: SplitData, item_column: int) -> np.ndarray:
    """Rows whose item has an embedding row of its own (index != 0, the unknown row)."""
    return data.categorical[:, item_column].numpy() != 0
