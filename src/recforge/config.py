"""Typed, strict, frozen configuration.

Config enters recforge at one boundary (the CLI or the pipeline); library functions take the
sections they need as explicit arguments. Every model here forbids unknown keys, and `load`
reports every problem at once, each named by its dotted path, so a typo like `train.lr_rate=...`
fails immediately instead of silently training with the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message lists every offending key."""


class Strict(BaseModel):
    """The base of every recforge config and settings model: an unknown key is an error naming it, and a
    loaded config cannot change under the code that read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelConfig(Strict):
    """How the label column turns into a 0/1 click target.

    click: values must be 0 or 1. rating: values in [min, max]; label = rating >= threshold.
    implicit: every logged event is a positive; negatives are sampled (see NegativesConfig).
    """

    kind: Literal["click", "rating", "implicit"] = "click"
    column: str | None = "label"
    threshold: float = 4.0
    min: float = 0.0
    max: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.kind != "implicit" and not self.column:
            raise ValueError(f"label.column is required for label kind '{self.kind}'")
        if self.min > self.max:
            raise ValueError(f"label.min ({self.min}) is greater than label.max ({self.max})")
        return self


class SchemaConfig(Strict):
    """Column roles of an event log. Names are the columns as they appear after reading."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    label: LabelConfig = LabelConfig()
    # Defaults describe the synthetic world's log (the embedded default data set).
    # Categorical columns describing the event (hour, device, ...).
    context: list[str] = Field(default_factory=lambda: ["hour", "device"])
    # Categorical columns describing the item (category, ...): looked up per item for sampled negatives.
    item_features: list[str] = Field(default_factory=lambda: ["category"])
    numeric: list[str] = Field(default_factory=lambda: ["position"])
    # Unit of numeric timestamps (ISO text and typed timestamp/date columns carry their own).
    # auto: each value by its magnitude, in bands that cannot overlap for dates 1973..2262:
    # s 0..9,223,372,036 (1970..2262), ms 1e11..9.2e12, us 1e14..9.2e15, ns 1e17..9.2e18.
    # s/ms/us/ns: every value in that unit. Either way a time before 1970 or after 2262-04-11
    # (the int64-nanosecond limit), or between the auto bands, is quarantined (timestamp_out_of_range).
    time_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"
    # A column assigning each event to train / valid / test (read only with data.split.method=column).
    split: str | None = None

    @model_validator(mode="after")
    def _no_repeats(self) -> SchemaConfig:
        names = [self.user, self.item, self.time, *self.context, *self.item_features, *self.numeric]
        if self.split:
            names.append(self.split)
        if self.label.column:
            names.append(self.label.column)
        seen: set[str] = set()
        repeated = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
        if repeated:
            raise ValueError(f"schema gives more than one role to column(s) {repeated}")
        return self

    @property
    def categorical(self) -> list[str]:
        """Every categorical field in model order: user, item, context, item features."""
        return [self.user, self.item, *self.context, *self.item_features]


class SplitConfig(Strict):
    """Which events are train, valid and test.

    time: global cut points at timestamp quantiles (no event of the future in train).
    leave_last_out: each user's last event is test, the one before valid (users with < 3 events
    stay wholly in train); a fraction of 0 switches that split off.
    per_user_fraction: each user's own events in time order, the last floor(n * test_fraction)
    test and the floor(n * valid_fraction) before them valid (the usual top-K protocol: every user
    is evaluated on their own latest behaviour; a user with too few events stays in train).
    column: the log's schema.split column says it, row by row (train / valid / test; any other
    value is quarantined as bad_split): the user's own split, or three files made one log.
    A test fraction of 0 leaves no test split (train on everything that is not validation).
    """

    method: Literal["time", "leave_last_out", "per_user_fraction", "column"] = "time"
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("split.valid_fraction + split.test_fraction must be below 1")
        return self


class VocabConfig(Strict):
    min_count: int = Field(1, ge=1)
    # field -> number of hash buckets; hashed fields need no vocabulary (huge id spaces).
    hash_buckets: dict[str, int] = Field(default_factory=dict)


class NegativesConfig(Strict):
    """Negative sampling for implicit logs (ignored for click/rating labels)."""

    per_positive: int = Field(4, ge=1)
    strategy: Literal["uniform", "popularity"] = "popularity"
    # Popularity weights are count ** alpha (0.75 as in word2vec).
    alpha: float = Field(0.75, ge=0.0)


class GenerateConfig(Strict):
    """The synthetic world behind `recforge data generate` and the quickstart.

    feed: impressions of a feed with clicks by static tastes (the embedded default, and what
    `recforge simulate` plays). sequential: an implicit log of sessions with an intent and
    item-to-item transitions (synthetic/sequences.py), for sequential models.
    """

    world: Literal["feed", "sequential"] = "feed"
    users: int = Field(20_000, ge=10)
    items: int = Field(5_000, ge=10)
    events: int = Field(1_000_000, ge=100)
    days: int = Field(14, ge=1)
    categories: int = Field(40, ge=2)
    latent_dim: int = Field(8, ge=1)
    seed: int = 7
    start_date: str = "2026-01-01"


class SparkConfig(Strict):
    # The Spark master: local[N] on one machine, spark://host:7077, yarn, k8s://https://host:443. Under
    # spark-submit the master it was given wins (leave this unset there).
    master: str | None = "local[2]"
    # Any Spark setting (spark.executor.memory, spark.sql.shuffle.partitions, spark.kubernetes.*, ...).
    conf: dict[str, str] = Field(default_factory=dict)
    # Where the job stages its intermediate tables (validated rows, encoded rows) before the shards are
    # written; None: a hidden folder beside the prepared directory. On a cluster: a path every executor
    # can write (hdfs://, s3a://, a shared mount).
    staging_dir: str | None = None


class AttributeSource(Strict):
    """A side table of item or user attributes, one row per id (data/attributes.py)."""

    path: str  # a Parquet or CSV file, local or s3://
    format: Literal["auto", "parquet", "csv"] = "auto"
    # The table's id column, when it is not named like the log's (schema.item / schema.user).
    key: str | None = None


class DataConfig(Strict):
    # A file or a directory of files; None means the generated synthetic log under workdir.
    source: str | None = None
    format: Literal["auto", "parquet", "csv", "movielens"] = "auto"
    # Attribute tables joined onto each event by item / user id as the log is read; the schema names
    # the columns it uses from them (item_features for items; context or numeric for users).
    items: AttributeSource | None = None
    users: AttributeSource | None = None
    schema_: SchemaConfig = Field(SchemaConfig(), alias="schema")
    split: SplitConfig = SplitConfig()
    vocab: VocabConfig = VocabConfig()
    negatives: NegativesConfig = NegativesConfig()
    generate: GenerateConfig = GenerateConfig()
    # Keep each event's last N clicked items before it (for sequence models such as DIN); 0 = none.
    history_length: int = Field(0, ge=0)
    # Which clicks a history may hold. train: only training-split clicks, so a valid/test row never
    # carries an earlier valid/test label and a model is judged on what it knew when training ended
    # (the honest protocol for rankers under a time split). all: every earlier click, as the server's
    # online state has them (the leave-one-out protocol of sequential recommenders, where the test
    # item follows the valid one).
    history_from: Literal["train", "all"] = "train"
    # Who prepares the log: local = this process (pyarrow + numpy, the embedded default), spark = Spark
    # jobs (data.spark), for logs beyond one machine's memory. Both write the same sharded dataset.
    engine: Literal["local", "spark"] = "local"
    spark: SparkConfig = SparkConfig()
    # Rows per shard of each prepared split (data/shards.py): the unit a streaming trainer's rank reads.
    shard_rows: int = Field(1_000_000, ge=1)
    # Rows per user bucket (data/buckets.py): negatives and histories are built one bucket of users at a
    # time, each with its own seeded generator, so both engines draw the same negatives and one Spark task
    # holds one bucket. Changing it changes which negatives are drawn, not their distribution.
    user_bucket_rows: int = Field(1_000_000, ge=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _split_column(self) -> DataConfig:
        by_column = self.split.method == "column"
        if by_column and not self.schema_.split:
            raise ValueError("data.split.method=column needs data.schema.split: the column holding "
                             "train / valid / test for each event")
        if self.schema_.split and not by_column:
            raise ValueError(f"data.schema.split names column '{self.schema_.split}' but data.split.method is "
                             f"{self.split.method}: set data.split.method=column to use it, or drop it")
        return self


class ModelConfig(Strict):
    name: str = "dnn"
    embedding_dim: int = Field(16, ge=1)
    # Embedding rows start as N(0, embedding_init_std^2): nn.Embedding's N(0, 1) measurably hurts CTR
    # models, small rows train better (0.01 is DeepCTR's and FuxiCTR's default too).
    embedding_init_std: float = Field(0.01, gt=0.0)
    # Dropout on the looked-up embedding vectors while training (each element zeroed with this
    # probability, the rest scaled by 1/(1-p)); off at evaluation and in bundles.
    embedding_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Two-tower retrieval: dot product of L2-normalized vectors divided by the temperature.
    temperature: float = Field(0.05, gt=0.0)
    normalize: bool = True
    # softmax: in-batch sampled softmax with logQ correction; bpr: against another row's item;
    # full_softmax: every catalog item a negative each step ([batch, items] logits; catalogs to ~1e5).
    retrieval_loss: Literal["softmax", "bpr", "full_softmax"] = "softmax"
    # dcnv2 only: cross layers, the rank of each layer's W = U V^T (None: full in_dim x in_dim),
    # and whether the deep MLP runs beside the cross network ("parallel") or on its output ("stacked").
    cross_layers: int = Field(3, ge=1)
    cross_low_rank: int | None = Field(None, ge=1)
    structure: Literal["parallel", "stacked"] = "parallel"
    # sasrec only: causal self-attention blocks over the item sequence, and heads per block (they
    # split embedding_dim, which must be a multiple of them).
    attention_blocks: int = Field(2, ge=1)
    attention_heads: int = Field(1, ge=1)


class TrainConfig(Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    # L2 as torch.optim.Adam applies it (grad += weight_decay * parameter). With rowwise_adam it
    # reaches the embedding rows a batch touches (untouched rows are not decayed, see train/optim.py);
    # with adam, every row every step; sparse_adam cannot apply it (an error when set).
    weight_decay: float = Field(0.0, ge=0.0)
    # Rankers: each training row's user id and item id are replaced by the unknown index (0) with this
    # probability, independently, so the unknown rows learn what an id unseen in training should get
    # (otherwise every new user or item at serving time meets a row no example ever updated).
    id_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # adam: one dense Adam over everything (updates every embedding row every step).
    # rowwise_adam: sparse embedding gradients + lazy Adam on the rows a batch touches (the fast
    # path; see BENCHMARKS.md for its cost in AUC), Adam for the dense rest.
    # sparse_adam: the same with torch.optim.SparseAdam for the table.
    optimizer: Literal["adam", "rowwise_adam", "sparse_adam"] = "rowwise_adam"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["off", "bf16", "fp16"] = "off"
    # Stop when the validation metric has not improved for `patience` epochs and keep the best epoch's
    # weights. Needs a validation split (an error without one); false: train every epoch, keep the last.
    early_stopping: bool = True
    patience: int = Field(2, ge=1)
    # auc, gauc, logloss: on the validation rows (any model). recall@K, ndcg@K (K from 1 to 9999):
    # full-catalog retrieval metrics on the validation split's users (retrieval models).
    early_stopping_metric: str = Field("auc", pattern=r"^(auc|gauc|logloss|(recall|ndcg)@[1-9][0-9]{0,3})$")
    # Whose lists retrieval validation and `recforge evaluate` rank: all users with a positive in the
    # split, or only warm ones (with a positive in training; a cold user's tower sees no id it learnt).
    retrieval_users: Literal["all", "warm"] = "all"
    checkpoint_every: int = Field(200, ge=0)  # steps; 0 = only at epoch end
    log_every: int = Field(50, ge=1)
    eval_batch_size: int = Field(65536, ge=1)
    progress: bool = True
    # End the run after this many steps in all, leaving a checkpoint to `--resume` from
    # (time-boxed runs; also how interruption is rehearsed). None: run every epoch.
    stop_after_steps: int | None = Field(None, ge=1)
    # Threads for CPU math; None keeps torch's default (one per core).
    threads: int | None = Field(None, ge=1)
    # Keep glibc malloc from unmapping per-step temporaries (see runtime.tune_allocator).
    tune_allocator: bool = True
    # torch.compile the model (measured: no gain for these models on CPU; may help on GPU).
    compile: bool = False
    # Seconds a collective may wait for a peer before a multi-process run fails (a dead rank).
    ddp_timeout_s: float = Field(300.0, gt=0)
    # Storage URI (s3://bucket/runs/NAME, or a directory) each checkpoint is uploaded to, with what a
    # resume needs; `recforge train --resume-from URI` restores the newest one after losing the run dir.
    mirror_to: str | None = None
    # memory: the whole train split is loaded as tensors (fastest while it fits in RAM). stream: each
    # process memory-maps only its own shards, one at a time, and shuffles through a buffer of
    # `shuffle_buffer` rows (data/stream.py), so a split larger than RAM trains in bounded memory.
    data_loading: Literal["memory", "stream"] = "memory"
    # Rows held per process for shuffling a stream: memory (about 8 bytes per column and history
    # item per row) against how far apart in the data two rows of one batch can come from.
    shuffle_buffer: int = Field(1_000_000, ge=1)

    @property
    def sparse_embeddings(self) -> bool:
        """Whether the model's embedding table must produce sparse gradients for the optimizer."""
        return self.optimizer in ("rowwise_adam", "sparse_adam")


class Config(Strict):
    seed: int = 42
    # Where generated data, prepared datasets and runs go unless a path below says otherwise.
    workdir: str = "runs/quickstart"
    prepared_dir: str | None = None
    run_dir: str | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @property
    def resolved_source(self) -> Path | str:
        """The log: a local path, or an object-store URI (s3://, s3a://) kept as text."""
        if self.data.source and "://" in self.data.source and not self.data.source.startswith("file://"):
            return self.data.source
        return Path(self.data.source.removeprefix("file://")) if self.data.source \
            else Path(self.workdir) / "raw" / "events"

    @property
    def resolved_prepared_dir(self) -> Path:
        return Path(self.prepared_dir) if self.prepared_dir else Path(self.workdir) / "prepared"

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.workdir) / "run"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def split_assignment(text: str, what: str, form: str) -> tuple[str, str]:
    """`NAME=VALUE` -> (NAME stripped, VALUE as given): the one parser behind every `key=value` input.

    Config overrides, `--context`, `--field`, `--set` and `--weights` all read this shape; one parser
    means one rule (the first `=` splits, the name must not be empty) and one way to fail: a
    ValueError `{what} {text!r} is not {form}` that names the flag and the form it expects.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{what} {text!r} is not {form}")
    return name.strip(), value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings -> nested dict; values are parsed as YAML (so 3, 1e-3, [1,2], true work)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        try:
            key, raw = split_assignment(item, "override", "of the form key=value")
        except ValueError:  # the message quotes the override as written, whatever quotes it contains
            raise ConfigError(f"override '{item}' is not of the form key=value") from None
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{where}'")
        else:
            lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


_M = TypeVar("_M", bound=BaseModel)


def read_tree(path: str | Path | None, overrides: list[str] | None = None, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping (empty for None) with `key=value` overrides merged in; `what` names the file in errors.

    Every YAML config recforge reads (training, pipeline, simulate) comes through here, so they all
    fail the same way on a missing file, broken YAML or a non-mapping.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{what} not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{what} {p} must hold a mapping at the top level")
        tree = loaded
    return _merge(tree, parse_overrides(overrides or []))


def validate_as(model: type[_M], tree: dict[str, Any], where: str) -> _M:
    """`tree` validated as `model`; every error at once, prefixed with `where` (the file or section)."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_format_errors(exc)}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply `key=value` overrides, validate strictly."""
    return from_dict(read_tree(path, overrides))
