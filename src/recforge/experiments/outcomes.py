"""From the server's impression log (parquet, one row per impression) to per-user totals per variant.

The log can hold millions of rows but only a handful of distinct `assignments` JSON strings (one
per combination of running experiments and arms), so each distinct string is parsed once and the
variant of every row is an array lookup. Users are encoded in one hash pass (`dictionary_encode`) and
totalled with `np.bincount`; there is no per-row Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from numpy.typing import NDArray

REQUIRED_COLUMNS = ("user_id", "label", "assignments")
TIME_COLUMN = "timestamp"
PRE_COLUMNS = ("user_id", "label")


@dataclass(frozen=True)
class VariantUsers:
    """One variant's users (in a fixed order) with their clicks and impressions."""

    user_ids: pa.Array
    clicks: NDArray[np.float64]
    impressions: NDArray[np.float64]
    # Pre-period (clicks, impressions) per user, shape (users, 2); zeros for users without history.
    pre: NDArray[np.float64] | None = None

    @property
    def users(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class ExperimentData:
    experiment: str
    variants: dict[str, VariantUsers]
    rows: int  # impressions of users kept in the analysis
    users_in_several_variants: int  # excluded: their exposure is mixed
    experiments_found: list[str] = field(default_factory=list)
    pre_users: int = 0  # analysed users with any pre-period impression


def _filesystem(uri: str):  # noqa: ANN202 - an fsspec filesystem; typed loosely to keep fsspec optional here
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _parquet_files(uri: str, what: str) -> tuple[object, list[str]]:
    """Every parquet file under `uri` (or `uri` itself), skipping hidden and temporary files."""
    fs, path = _filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} path {uri} does not exist; pass the directory of daily parquet files")
    if fs.isdir(path):
        found = fs.find(path)
        files = sorted(f for f in found if f.endswith((".parquet", ".parq"))
                       and not any(part.startswith((".", "_")) for part in f[len(path):].split("/") if part))
        if not files:
            raise FileNotFoundError(f"{what} directory {uri} holds no .parquet files")
        return fs, files
    return fs, [path]


def _read(uri: str, columns: tuple[str, ...], what: str) -> pa.Table:
    fs, files = _parquet_files(uri, what)
    dataset = ds.dataset(files, format="parquet", filesystem=fs)
    for fragment in dataset.get_fragments():
        missing = [c for c in columns if c not in fragment.physical_schema.names]
        if missing:
            raise ValueError(f"{fragment.path} lacks required column(s) {', '.join(missing)}; an impression "
                             f"log needs {', '.join(columns)}")
    try:
        table = dataset.to_table(columns=list(columns))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{what} files under {uri} do not share one schema: {exc}") from exc
    # Writers that kept pandas categoricals store dictionary columns; each file may carry its own
    # dictionary, so decode to plain values and encode once over the whole log below.
    for i, col in enumerate(table.columns):
        if pa.types.is_dictionary(col.type):
            table = table.set_column(i, table.field(i).name, col.cast(col.type.value_type))
    return table


def _variant_per_row(assignments: pa.ChunkedArray, experiment: str) -> tuple[NDArray[np.int64], list[str], list[str]]:
    """Variant code per row (-1 when the row is not in the experiment), the variant names, and
    every experiment name seen (for the error message when `experiment` is unknown)."""
    encoded = pc.dictionary_encode(assignments.combine_chunks())
    variants: list[str] = []
    codes = []
    experiments: set[str] = set()
    for text in encoded.dictionary.to_pylist():
        try:
            parsed = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"assignments value {text!r} is not a JSON object: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"assignments value {text!r} is not a JSON object of experiment -> variant")
        experiments.update(parsed)
        variant = parsed.get(experiment)
        if variant is None:
            codes.append(-1)
            continue
        variant = str(variant)
        if variant not in variants:
            variants.append(variant)
        codes.append(variants.index(variant))
    lookup = np.asarray(codes + [-1], dtype=np.int64)  # the extra slot takes null assignments
    indices = encoded.indices.fill_null(len(codes)).to_numpy(zero_copy_only=False)
    return lookup[indices], variants, sorted(experiments)


def _same_type(a: pa.ChunkedArray, b: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """user_id may be int64 in one log and string in the other; compare them as strings then."""
    if a.type == b.type:
        return a, b
    return a.cast(pa.string()), b.cast(pa.string())


def load_experiment(events_uri: str, experiment: str, pre_period_end: int | None = None,
                    pre_events_uri: str | None = None) -> ExperimentData:
    """Per-user totals per variant of `experiment`, plus pre-period covariates when asked.

    With `pre_period_end`, rows before it (in any or no experiment) are the pre-period and rows at
    or after it are analysed; with `pre_events_uri`, that log is the pre-period. Users seen in more
    than one variant are dropped and counted: their exposure is mixed.
    """
    columns = REQUIRED_COLUMNS + ((TIME_COLUMN,) if pre_period_end is not None else ())
    table = _read(events_uri, columns, "events")
    pre_table = None
    if pre_period_end is not None:
        before = pc.less(table[TIME_COLUMN], pa.scalar(int(pre_period_end), table.schema.field(TIME_COLUMN).type))
        before = before.fill_null(False)
        pre_table = table.filter(before).select(list(PRE_COLUMNS))
        table = table.filter(pc.invert(before))
    elif pre_events_uri is not None:
        pre_table = _read(pre_events_uri, PRE_COLUMNS, "pre-period events")

    variant, names, experiments = _variant_per_row(table["assignments"], experiment)
    if not names:
        found = ", ".join(experiments) if experiments else "none"
        window = f" at or after timestamp {pre_period_end}" if pre_period_end is not None else ""
        raise ValueError(f"experiment {experiment!r} not found in the assignments of {events_uri}{window}; "
                         f"experiments found: {found}")
    keep = variant >= 0
    table = table.filter(pa.array(keep))
    variant = variant[keep]
    user_col = table["user_id"]
    if user_col.null_count:
        raise ValueError(f"{user_col.null_count} rows of {events_uri} have a null user_id; fix the log")
    encoded_users = pc.dictionary_encode(user_col.combine_chunks())  # one hash pass: distinct ids + codes
    uniques = encoded_users.dictionary
    user = encoded_users.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_users = len(uniques)

    clicks = np.bincount(user, weights=_clicked(table["label"]), minlength=n_users)
    imps = np.bincount(user, minlength=n_users).astype(np.float64)
    lowest = np.full(n_users, len(names), dtype=np.int64)
    highest = np.full(n_users, -1, dtype=np.int64)
    np.minimum.at(lowest, user, variant)
    np.maximum.at(highest, user, variant)
    mixed = lowest != highest

    pre = None
    pre_users = 0
    if pre_table is not None:
        pre_users_col, analysed = _same_type(pre_table["user_id"], uniques)
        pre_user = pc.index_in(pre_users_col, value_set=analysed)
        known = pc.is_valid(pre_user).to_numpy(zero_copy_only=False)
        pre_user = pre_user.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
        pre_clicked = _clicked(pre_table["label"])[known]
        pre = np.stack([np.bincount(pre_user, weights=pre_clicked, minlength=n_users),
                        np.bincount(pre_user, minlength=n_users).astype(np.float64)], axis=1)
        pre_users = int(np.count_nonzero(pre[~mixed, 1]))

    variants = {}
    for code, name in enumerate(names):
        members = np.flatnonzero((lowest == code) & ~mixed)
        variants[name] = VariantUsers(user_ids=uniques.take(pa.array(members)), clicks=clicks[members],
                                      impressions=imps[members], pre=None if pre is None else pre[members])
    return ExperimentData(experiment=experiment, variants=variants, rows=int(imps[~mixed].sum()),
                          users_in_several_variants=int(mixed.sum()), experiments_found=experiments,
                          pre_users=pre_users)


def _clicked(label: pa.ChunkedArray) -> NDArray[np.float64]:
    """1.0 per clicked impression; a null label counts as no click."""
    if not (pa.types.is_integer(label.type) or pa.types.is_floating(label.type) or pa.types.is_boolean(label.type)):
        raise ValueError(f"column label has type {label.type}; it must be numeric (1 = clicked, 0 = not)")
    return pc.greater(label.cast(pa.float64()), 0).fill_null(False).to_numpy(zero_copy_only=False).astype(np.float64)
