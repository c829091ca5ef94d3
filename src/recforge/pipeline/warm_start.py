"""Warm-starting a challenger from the production bundle.

A daily challenger trained from scratch relearns what yesterday's model already knew; starting from
the champion's weights converges in fewer epochs. The two models do not share vocabularies, though:
the challenger's vocabularies are refit on the new window, so row r of its embedding table is not
row r of the champion's. Each embedding row is therefore copied by raw key (the champion's row for
the same id), ids the champion never saw keep their fresh initialization, and dense layers are
copied only where their shapes agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recforge.bundle import Bundle
from recforge.data.vocab import load_vocabs
from recforge.features import FeatureLayout
from recforge.nn.embeddings import FusedEmbedding
from recforge.pipeline.holdout import vocab_map


def _fused_tables(model: nn.Module) -> dict[str, FusedEmbedding]:
    """Parameter name of each fused table's weight -> the module (names match the scripted champion's)."""
    return {f"{name}.table.weight" if name else "table.weight": module
            for name, module in model.named_modules() if isinstance(module, FusedEmbedding)}


def warm_start_from_bundle(model: nn.Module, features: FeatureLayout, prepared_dir: Path,
                           champion: Bundle) -> dict[str, Any]:
    """Copy `champion`'s weights into the freshly built `model` in place; returns what was copied.

    Only tables laid out over exactly the challenger's categorical fields are remapped by key (the
    ranking models' one fused table); any other parameter is copied when its name and shape match.
    """
    source = {name: tensor.detach() for name, tensor in champion.module.state_dict().items()}
    champion_cards = list(champion.layout.cardinalities)
    champion_fields = list(champion.layout.categorical)
    fields = list(features.categorical)
    vocabs = load_vocabs(Path(prepared_dir) / "vocab")
    tables = _fused_tables(model)
    copied: list[str] = []
    skipped: list[str] = []
    rows_matched = rows_total = 0
    with torch.no_grad():
        for name, target in model.state_dict().items():
            old = source.get(name)
            if name in tables and old is not None and tables[name].cardinalities == list(features.cardinalities):
                if champion_fields != fields or len(champion_cards) != len(fields):
                    skipped.append(f"{name} (champion fields {champion_fields} differ from {fields})")
                    continue
                new_offsets = np.concatenate([[0], np.cumsum(features.cardinalities)[:-1]])
                old_offsets = np.concatenate([[0], np.cumsum(champion_cards)[:-1]])
                for f, field in enumerate(fields):
                    mapping = vocab_map(vocabs[field], champion, field)
                    # Row 0 (unknown) always maps to the champion's unknown row; other unmatched rows stay fresh.
                    keep = np.flatnonzero((mapping > 0) | (np.arange(len(mapping)) == 0))
                    dst = torch.from_numpy(new_offsets[f] + keep)
                    src = torch.from_numpy(old_offsets[f] + mapping[keep])
                    target.index_copy_(0, dst, old.index_select(0, src).to(target.dtype))
                    rows_matched += len(keep)
                    rows_total += len(mapping)
                copied.append(name)
            elif old is not None and old.shape == target.shape and name not in tables:
                target.copy_(old.to(target.dtype))
                copied.append(name)
            else:
                skipped.append(name)
    if not any(name in tables for name in copied):
        # Without the embedding rows a warm start would copy at most a stray bias: refuse instead.
        raise ValueError("warm start copied nothing from the champion: its embedding layout differs from the "
                         f"challenger's ({'; '.join(skipped) or 'no fused table'}); set training.warm_start: false "
                         "or train the champion's model and fields")
    return {"copied": len(copied), "skipped": skipped,
            "embedding_rows_from_champion": rows_matched, "embedding_rows": rows_total}
