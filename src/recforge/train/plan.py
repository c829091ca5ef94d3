"""Memory planning: will this model train on this device, and if not, what to change.

Embedding tables dominate recommender memory, and the optimizer multiplies them: Adam keeps two
moments per parameter, and dense Adam also materializes a full-size gradient every step. The
plan is arithmetic on the vocabulary sizes, so it can be run before anything is allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from recforge.config import ModelConfig, TrainConfig

_BYTES = 4  # fp32 master weights and optimizer state, also under AMP
_GIB = 1024**3
# Headroom for the allocator, CUDA context, temporaries and fragmentation.
_USABLE_FRACTION = 0.85


@dataclass(frozen=True)
class TablePlan:
    field: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    tables: list[TablePlan]
    embedding_bytes: int
    dense_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    device_bytes: int | None
    device_name: str
    world_size: int
    advice: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Per device: under DDP every rank holds a full replica of the model and its optimizer."""
        return (self.embedding_bytes + self.dense_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes)

    @property
    def fits(self) -> bool | None:
        if self.device_bytes is None:
            return None
        return self.total_bytes <= self.device_bytes * _USABLE_FRACTION


def _dense_parameter_count(input_width: int, hidden: list[int]) -> int:
    count, width = 0, input_width
    for size in [*hidden, 1]:
        count += width * size + size
        width = size
    return count


def plan_memory(
    cardinalities: dict[str, int],
    num_numeric: int,
    model: ModelConfig,
    train: TrainConfig,
    *,
    world_size: int = 1,
    device_bytes: int | None = None,
    device_name: str = "unknown",
) -> MemoryPlan:
    dim = model.embedding_dim
    tables = sorted((TablePlan(name, rows, rows * dim * _BYTES) for name, rows in cardinalities.items()),
                    key=lambda t: -t.bytes)
    embedding = sum(t.bytes for t in tables)
    dense_params = _dense_parameter_count(len(cardinalities) * dim + num_numeric, list(model.hidden))
    dense = dense_params * _BYTES
    lazy = train.optimizer != "adam"
    rows_per_step = train.batch_size * len(cardinalities)
    # Dense Adam: a full-size table gradient each step. Lazy: only the rows a batch touches.
    gradient = (min(rows_per_step * dim * _BYTES, embedding) if lazy else embedding) + dense
    optimizer = 2 * (embedding + dense)
    # Forward activations kept for backward (inputs, hidden layers, ReLU masks), x2 for their gradients.
    widths = len(cardinalities) * dim + num_numeric + 2 * sum(model.hidden)
    activation = 2 * train.batch_size * widths * _BYTES
    result = MemoryPlan(tables, embedding, dense, gradient, optimizer, activation, device_bytes, device_name,
                        world_size)
    result.advice.extend(_advice(result, model, train))
    return result


def _advice(plan: MemoryPlan, model: ModelConfig, train: TrainConfig) -> list[str]:
    if plan.fits is not False or plan.device_bytes is None:
        return []
    budget = plan.device_bytes * _USABLE_FRACTION
    biggest = plan.tables[0]
    # Table rows cost weights + two Adam moments, plus a full gradient under dense Adam; with a
    # lazy optimizer (which the advice recommends first) the gradient term disappears.
    per_row = model.embedding_dim * _BYTES * 3
    table_rows = sum(t.rows for t in plan.tables)
    touched_rows = train.batch_size * len(plan.tables) * model.embedding_dim * _BYTES
    non_table = 4 * plan.dense_bytes + plan.activation_bytes + touched_rows
    allowed_rows = int(max(0.0, budget - non_table) // per_row)
    advice = [f"needs {plan.total_bytes / _GIB:.1f} GiB per device but {plan.device_name} has "
              f"{plan.device_bytes / _GIB:.1f} GiB ({_USABLE_FRACTION:.0%} usable)"]
    if train.optimizer == "adam":
        advice.append("use train.optimizer=rowwise_adam: no full-size embedding gradient each step")
    others = table_rows - biggest.rows
    if allowed_rows > others + 1:
        buckets = allowed_rows - others - 1  # a hashed field also keeps its unknown row
        advice.append(f"hash the largest field: data.vocab.hash_buckets={{{biggest.field}: {buckets}}} "
                      f"(it has {biggest.rows:,} rows)")
    elif allowed_rows > 0:
        share = allowed_rows / table_rows
        advice.append(f"hash the large fields to about {share:.1%} of their rows each "
                      f"(data.vocab.hash_buckets), {allowed_rows:,} rows in all")
    fitting_dim = int(model.embedding_dim * budget / max(plan.total_bytes, 1))
    if fitting_dim >= 4:
        advice.append(f"or a smaller embedding: model.embedding_dim={fitting_dim}")
    advice.append("beyond one device: shard the tables row-wise across GPUs (TorchRec "
                  "DistributedModelParallel) instead of replicating them with DDP")
    return advice


def detect_device_memory(device: str) -> tuple[int | None, str]:
    """(bytes, name) of the device a run would use: GPU 0's memory, or this machine's RAM."""
    if device in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), props.name
        if device == "cuda":
            return None, "cuda (not available here)"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu (host memory)"
    except (ValueError, OSError):
        return None, "cpu"
