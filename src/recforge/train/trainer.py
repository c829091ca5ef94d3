"""The training loop: train() holds the step loop, everything a step does visible in it.

Adam (or sparse embedding gradients + SparseAdam), epochs of index-sliced batches, AMP
(bf16 autocast on CPU/CUDA, fp16 + GradScaler on CUDA), early stopping on a validation metric,
atomic checkpoints every N steps and at each epoch end (mirrored to storage when train.mirror_to is
set), exact resume, metrics as JSONL.
Validation is passed in as a function so the loop does not depend on how a model is evaluated.
Setup, resume, and the end of an epoch (validation, early stopping, best weights, checkpoint) are
named helpers below train() that share one `_Run` value, so the loop itself reads in one screen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from recforge.config import TrainConfig
from recforge.data.batches import Batch, SplitData, iterate_batches, steps_per_epoch
from recforge.data.stream import ShardStream
from recforge.runtime import DistContext, choose_device, tune_allocator
from recforge.train.checkpoint import RunState, load_checkpoint, mirror_run, save_checkpoint, save_weights
from recforge.train.objectives import Pointwise
from recforge.train.optim import RowWiseAdam
from recforge.train.sparse_sync import SparseGradientSync, sparse_parameters

Validator = Callable[[torch.nn.Module], dict[str, float]]
# What train() reads its rows from: a split in memory, or its shards streamed (train.data_loading).
TrainData = SplitData | ShardStream
# Metrics where smaller is better; the rest (auc, gauc) are maximized.
_MINIMIZED = {"logloss"}


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    state: RunState
    device: str
    device_reason: str
    interrupted: bool
    samples_per_s: float


def config_digest(train_cfg: TrainConfig, extra: dict[str, Any]) -> str:
    """Identity of a run for resume: keys that may change between an interruption and a resume are left out."""
    excluded = {"epochs", "stop_after_steps", "log_every", "progress", "checkpoint_every", "eval_batch_size",
                "threads", "mirror_to"}
    if train_cfg.data_loading == "memory":
        # The memory path's identity is what it was before streams existed (its checkpoints still
        # resume); a stream's order depends on its buffer, so there both keys count.
        excluded |= {"data_loading", "shuffle_buffer"}
    resumable = train_cfg.model_dump(exclude=excluded)
    blob = json.dumps({"train": resumable, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """adam: one Adam over all parameters. rowwise_adam / sparse_adam: a lazy Adam over parameters
    whose gradients are sparse (the embedding table, built with sparse=True), Adam over the rest.
    train.weight_decay reaches every parameter: the dense ones through Adam, the embedding rows a
    batch touches through RowWiseAdam (sparse_adam has no decay, so asking for both is an error)."""
    if cfg.optimizer == "adam":
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    sparse = list(sparse_parameters(model).values())
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    if not sparse:
        raise ValueError(f"train.optimizer={cfg.optimizer} needs a model built with sparse embeddings")
    if cfg.optimizer == "sparse_adam" and cfg.weight_decay > 0:
        raise ValueError("train.weight_decay is not applied by train.optimizer=sparse_adam (torch.optim.SparseAdam "
                         "has none): use train.optimizer=rowwise_adam, which decays the rows a batch touches")
    lazy = RowWiseAdam(sparse, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "rowwise_adam" \
        else torch.optim.SparseAdam(sparse, lr=cfg.lr)
    return [
        lazy,
        torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay),
    ]


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or off")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def optimizer_step(
    loss: torch.Tensor,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None,
    skipped: torch.Tensor,
    sync: Callable[[], None] | None = None,
) -> None:
    """Backward and update; with a GradScaler (fp16), count skipped steps into `skipped`.

    GradScaler skips the update when gradients hold inf/nan and then lowers the scale, so a step
    was skipped exactly when the scale went down. The scale is compared on the device, as
    `scaler.scale(1)` before and after update(): get_scale() would wait for the optimizer kernels
    every step, and GradScaler's own scale tensor is private. `skipped` stays a device tensor, read
    only at logging points. (A disabled scaler returns its input, so nothing counts as skipped.)
    `sync` averages what DDP leaves to the trainer (the sparse embedding gradients) across ranks.
    """
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if sync is not None:
            sync()
        for opt in optimizers:
            opt.step()
        return
    scaler.scale(loss).backward()
    if sync is not None:
        sync()
    for opt in optimizers:
        scaler.step(opt)
    unit = torch.ones((), device=loss.device)
    scale_before = scaler.scale(unit)
    scaler.update()
    skipped += scaler.scale(unit) < scale_before


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in _MINIMIZED else value > best


class _StopRequest:
    """Turns SIGINT/SIGTERM into 'finish this step, checkpoint, exit' instead of a lost run."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_reduce_mean(value: torch.Tensor, dist_ctx: DistContext) -> torch.Tensor:
    if not dist_ctx.distributed:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / dist_ctx.world_size


def _broadcast_floats(values: list[float], dist_ctx: DistContext, device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank, so all ranks take the same early-stopping decision."""
    if not dist_ctx.distributed:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _any_rank(flag: bool, dist_ctx: DistContext, device: torch.device) -> bool:
    if not dist_ctx.distributed:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


@dataclass(frozen=True)
class TrainOptions:
    """How one run is carried out, as opposed to what it learns (TrainConfig).

    These are decided per invocation by the caller (a recipe, a test), not by the config file: where the
    run writes, its seed, whether it continues a checkpoint, its place in a DDP job, its loss and where
    its log lines go. One value keeps train()'s signature short and lets callers build it once.
    """

    run_dir: Path
    seed: int
    resume: bool = False
    # Part of the run's identity for the resume check (model config, features, data rows...): a
    # checkpoint written under other values is refused rather than silently continued.
    digest_extra: Mapping[str, Any] = field(default_factory=dict)
    # From runtime.init_distributed; the default is a single process.
    dist_ctx: DistContext = field(default_factory=DistContext)
    # Wraps the model and returns a batch's loss (train/objectives.py); None: pointwise BCE on the label.
    objective: torch.nn.Module | None = None
    log: Callable[[str], None] = print
    # Called on rank 0 with each epoch's record (train loss, valid metrics) once the epoch is
    # checkpointed: a hyper-parameter search reads the curve here and prunes a trial by raising.
    on_epoch: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))  # a str from a caller works too


def train(
    model: torch.nn.Module,
    train_data: TrainData,
    validate: Validator | None,
    cfg: TrainConfig,
    options: TrainOptions,
) -> TrainResult:
    """Train `model` in place; with `options.dist_ctx` from runtime.init_distributed, as one rank of DDP.

    Under DDP each rank trains on its own shard of every epoch's permutation (or, streamed, on its
    own dealt shards: data.stream) with the per-rank
    `cfg.batch_size`; rank 0 alone validates, logs and writes checkpoints, and broadcasts the
    early-stopping decision so all ranks stop together. The step loop is kept here, in one piece, so
    the order of what happens each step (and so what a checkpoint captures) reads top to bottom.
    """
    run = _start_run(model, cfg, options)
    if options.resume and not _resume(run, streamed=isinstance(train_data, ShardStream)):
        return TrainResult(options.run_dir, run.state, str(run.device), run.device_reason, False, 0.0)
    state, device, dist_ctx = run.state, run.device, options.dist_ctx
    step_model = _step_model(run)
    global_batch = cfg.batch_size * dist_ctx.world_size
    pin = device.type == "cuda"
    check_every = cfg.log_every if dist_ctx.distributed else 1  # how often ranks agree on a stop signal
    interrupted = False
    trained_samples, train_seconds = 0, 0.0

    progress = _progress_bar(enabled=cfg.progress and dist_ctx.is_main)
    run.metrics = _MetricsLog(options.run_dir, dist_ctx.is_main)
    with progress, _StopRequest() as stop, run.metrics:
        while state.epoch < cfg.epochs and not interrupted:
            epoch = state.epoch
            total_steps, batches = _remaining_batches(run, train_data)
            task = progress.add_task("train", total=total_steps, epoch=epoch, loss="-")
            step_model.train()
            tally = _EpochTally.on(device)
            for batch in batches:
                batch = batch.to(device, non_blocking=pin)
                with autocast_context(cfg.amp, device):
                    loss = step_model(batch.categorical, batch.numeric, batch.label, batch.history_values,
                                      batch.history_offsets)
                # backward() (under DDP it all-reduces the gradients; no accumulation, so no no_sync()), then
                # the update, through the GradScaler's scale/step/update under fp16.
                optimizer_step(loss, run.optimizers, run.scaler, tally.skipped, run.sparse_sync)
                tally.add(loss, len(batch))
                state.samples_in_epoch = min(len(train_data), state.samples_in_epoch + global_batch)
                state.steps_in_epoch += 1
                state.global_step += 1

                if state.global_step % cfg.log_every == 0:
                    mean_loss = _finite_mean_loss(tally, run)  # a collective: every rank computes it
                    run.metrics.write({"step": state.global_step, "epoch": epoch, "train_loss": mean_loss,
                                       "skipped_steps": int(tally.skipped.item()), "time": time.time()})
                    progress.update(task, loss=f"{mean_loss:.4f}")
                progress.update(task, advance=1)
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    _checkpoint(run)
                # Under DDP a signal may reach the ranks at different steps: they agree at check points.
                signalled = state.global_step % check_every == 0 and _any_rank(stop.requested, dist_ctx, device)
                capped = bool(cfg.stop_after_steps) and state.global_step >= (cfg.stop_after_steps or 0)
                if signalled or capped:
                    interrupted = True
                    break
            elapsed = time.perf_counter() - tally.start
            trained_samples += tally.samples
            train_seconds += elapsed
            progress.remove_task(task)
            if interrupted:
                _checkpoint(run)
                run.log(_stopped_line(run, stop.requested))
                break
            _end_epoch(run, validate, tally, elapsed)

    samples_per_s = trained_samples * dist_ctx.world_size / train_seconds if train_seconds > 0 else 0.0
    return TrainResult(options.run_dir, state, str(device), run.device_reason, interrupted, samples_per_s)


class _MetricsLog:
    """metrics.jsonl, appended to by rank 0 only; flushed per record so a crash keeps what was logged."""

    def __init__(self, run_dir: Path, main: bool) -> None:
        self._file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main else None

    def __enter__(self) -> _MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


@dataclass
class _Run:
    """What the loop's helpers share: the run's fixed parts (built once by _start_run) and its RunState.

    Passing this one value, rather than closures over train()'s locals, lets each helper be read and
    tested on its own.
    """

    cfg: TrainConfig
    options: TrainOptions
    model: torch.nn.Module
    objective: torch.nn.Module
    device: torch.device
    device_reason: str
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None
    digest: str
    state: RunState
    log: Callable[[str], None]
    # Writes nothing until train() opens the run's metrics.jsonl (after a resume found work to do).
    metrics: _MetricsLog = field(default_factory=lambda: _MetricsLog(Path(), main=False))
    # Under DDP: averages the sparse embedding gradients DDP is told to leave alone (train/sparse_sync.py).
    sparse_sync: SparseGradientSync | None = None

    @property
    def main(self) -> bool:
        return self.options.dist_ctx.is_main

    @property
    def checkpoint_path(self) -> Path:
        return self.options.run_dir / "checkpoints" / "last.pt"


def _start_run(model: torch.nn.Module, cfg: TrainConfig, options: TrainOptions) -> _Run:
    """Device, loss, optimizers and AMP scaler for a fresh run; settings that cannot work fail here,
    before any step is taken."""
    dist_ctx = options.dist_ctx
    log = options.log if dist_ctx.is_main else _silent
    (options.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    digest = config_digest(cfg, dict(options.digest_extra))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_allocator:
        tune_allocator()
    choice = choose_device(cfg.device, dist_ctx.local_rank)
    device = choice.device
    log(f"device: {device} ({choice.reason})" + (
        f"; {dist_ctx.world_size} processes ({dist_ctx.backend})" if dist_ctx.distributed else ""))
    objective = (options.objective if options.objective is not None else Pointwise(model)).to(device)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    autocast_context(cfg.amp, device)  # fail early on an impossible AMP setting
    return _Run(cfg, options, model, objective, device, choice.reason, optimizers, scaler, digest,
                RunState(world_size=dist_ctx.world_size), log)


def _resume(run: _Run, streamed: bool = False) -> bool:
    """Restore model, optimizers, scaler, RNG and position from last.pt; False when that run had finished.

    The position is kept in rows of the epoch's global order (RunState.samples_in_epoch), so the run may
    continue with another number of processes; `world_size` is updated to the one continuing it. A
    streamed epoch is dealt by the number of processes, so mid-epoch it resumes only under the same one.
    """
    state = load_checkpoint(run.checkpoint_path, run.model, run.optimizers, run.scaler, run.digest)
    run.state = state
    world_size = run.options.dist_ctx.world_size
    if streamed and state.steps_in_epoch and state.world_size != world_size:
        raise ValueError(
            f"{run.checkpoint_path} stopped {state.steps_in_epoch} steps into a streamed epoch "
            f"(train.data_loading=stream) with {state.world_size} process(es); its shards were dealt to that "
            f"many, so it cannot continue exactly with {world_size}: resume with --nproc-per-node "
            f"{state.world_size}, or from a checkpoint written at an epoch's end")
    run.log(f"resumed from {run.checkpoint_path}: epoch {state.epoch}, {state.samples_in_epoch:,} rows into it, "
            f"global step {state.global_step} (written with {state.world_size} process(es), "
            f"now {run.options.dist_ctx.world_size})")
    if state.finished and state.epoch >= run.cfg.epochs:
        run.log("that run had already finished; nothing to do")
        return False
    state.finished = False
    state.world_size = run.options.dist_ctx.world_size
    return True


def _step_model(run: _Run) -> torch.nn.Module:
    """The module each step calls: the objective, wrapped for DDP and compiled when asked.

    Per-rank seeds (for dropout) are drawn from the step reached, after a resume restored the RNG state;
    the data order stays the shared (seed, epoch) permutation.
    """
    dist_ctx = run.options.dist_ctx
    if dist_ctx.distributed:
        torch.manual_seed(run.options.seed + 7919 * dist_ctx.rank + run.state.global_step)
    step_model, run.sparse_sync = _wrap_ddp(run.objective, dist_ctx, run.device)
    if run.cfg.compile:
        step_model = torch.compile(step_model)
    return step_model


def _remaining_batches(run: _Run, train_data: TrainData) -> tuple[int, Iterator[Batch]]:
    """The current epoch's steps still to take, and their batches for this rank.

    A resumed run starts at the row (a stream: the step) it had reached, so it neither repeats nor skips
    a batch of the epoch's order; the step count feeds the progress bar.
    """
    cfg, state, dist_ctx = run.cfg, run.state, run.options.dist_ctx
    if isinstance(train_data, ShardStream):
        epoch = train_data.epoch(seed=run.options.seed, epoch=state.epoch, rank=dist_ctx.rank,
                                 world_size=dist_ctx.world_size, batch_size=cfg.batch_size)
        return epoch.steps - state.steps_in_epoch, epoch.batches(state.steps_in_epoch,
                                                                pin_memory=run.device.type == "cuda")
    total_steps = steps_per_epoch(len(train_data) - state.samples_in_epoch, cfg.batch_size, dist_ctx.world_size)
    batches = iterate_batches(train_data, cfg.batch_size, shuffle=True, seed=run.options.seed, epoch=state.epoch,
                              start_sample=state.samples_in_epoch, rank=dist_ctx.rank,
                              world_size=dist_ctx.world_size, pin_memory=run.device.type == "cuda")
    return total_steps, batches


@dataclass
class _EpochTally:
    """One epoch's running sums. Loss and skipped steps stay on the device, so a step costs no host
    sync; they are read only at logging points and at the epoch's end."""

    loss_sum: torch.Tensor
    skipped: torch.Tensor  # steps GradScaler skipped (inf/nan gradients)
    steps: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, device: torch.device) -> _EpochTally:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, rows: int) -> None:
        self.loss_sum += loss.detach()
        self.steps += 1
        self.samples += rows

    def mean_loss(self, dist_ctx: DistContext) -> float:
        """The mean over the epoch so far and over all ranks (a collective: every rank must call it)."""
        return _all_reduce_mean(self.loss_sum / max(self.steps, 1), dist_ctx).item()


def _finite_mean_loss(tally: _EpochTally, run: _Run) -> float:
    """The mean loss at a logging point; a non-finite one ends the run naming the step, instead of
    training on until validation shows garbage."""
    mean_loss = tally.mean_loss(run.options.dist_ctx)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss became {mean_loss} at step {run.state.global_step}; lower train.lr or turn off train.amp"
        )
    return mean_loss


def _checkpoint(run: _Run) -> None:
    """Rank 0 writes last.pt (atomically) and mirrors the run when train.mirror_to is set."""
    if not run.main:
        return
    save_checkpoint(run.checkpoint_path, run.model, run.optimizers, run.scaler, run.state, run.digest)
    if not run.cfg.mirror_to:
        return
    # A failed upload (retries spent) costs the remote copy of this checkpoint, not the run:
    # the next checkpoint tries again, and the local one is intact.
    try:
        mirror_run(run.options.run_dir, run.cfg.mirror_to, run.state)
    except OSError as exc:
        run.log(f"warning: mirroring checkpoint to {run.cfg.mirror_to} failed, training goes on: {exc}")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not enabled,
    )


def _stopped_line(run: _Run, signalled: bool) -> str:
    why = "signal received" if signalled else f"train.stop_after_steps={run.cfg.stop_after_steps}"
    return (f"stopped in epoch {run.state.epoch} after {run.state.samples_in_epoch:,} rows ({why}); "
            f"checkpoint {run.checkpoint_path}; continue with --resume")


def _end_epoch(run: _Run, validate: Validator | None, tally: _EpochTally, elapsed: float) -> None:
    """Close a completed epoch: record it, validate and keep the best weights, decide on early stopping,
    and checkpoint, so that a resume starts cleanly at the next epoch."""
    state, cfg, dist_ctx = run.state, run.cfg, run.options.dist_ctx
    record: dict[str, Any] = {
        "epoch": state.epoch, "step": state.global_step,
        "train_loss": tally.mean_loss(dist_ctx),
        "skipped_steps": int(tally.skipped.item()),
        "samples_per_s": tally.samples * dist_ctx.world_size / elapsed if elapsed > 0 else None,
    }
    _validate_and_keep_best(run, validate, record)
    state.history.append(record)
    run.metrics.write(record)
    run.log(_epoch_line(record))
    state.epoch += 1
    state.samples_in_epoch = state.steps_in_epoch = 0
    if cfg.early_stopping and state.bad_epochs >= cfg.patience:
        run.log(f"early stopping: valid {cfg.early_stopping_metric} has not improved for "
                f"{state.bad_epochs} epoch(s); best epoch {state.best_epoch}")
        state.epoch = cfg.epochs
    if state.epoch >= cfg.epochs:
        state.finished = True
    _checkpoint(run)
    if run.main and run.options.on_epoch is not None:
        run.options.on_epoch(record)


def _validate_and_keep_best(run: _Run, validate: Validator | None, record: dict[str, Any]) -> None:
    """Validate on rank 0 (its metrics go into `record`), update the early-stopping state and write
    model.pt when this epoch is the best so far; without a validator, or with train.early_stopping off,
    the latest epoch is the one kept (validated still, for the record, where a validator is given).

    Rank 0's value is broadcast so that every rank takes the same early-stopping decision.
    """
    state, cfg, epoch = run.state, run.cfg, run.state.epoch
    if validate is None or not cfg.early_stopping:  # the latest epoch is the one kept
        if validate is not None and run.main:
            run.model.eval()
            record.update({f"valid_{k}": v for k, v in validate(run.model).items()})
        state.best_epoch = epoch
        if run.main:
            save_weights(run.options.run_dir / "model.pt", run.model)
        return
    value = float("nan")
    if run.main:
        run.model.eval()
        valid_metrics = validate(run.model)
        record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
        value = valid_metrics[cfg.early_stopping_metric]
    (value,) = _broadcast_floats([value], run.options.dist_ctx, run.device)
    if _improved(cfg.early_stopping_metric, value, state.best_metric):
        state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
        if run.main:
            save_weights(run.options.run_dir / "model.pt", run.model)
    else:
        state.bad_epochs += 1


def _silent(message: str) -> None:
    """Log sink of ranks other than 0."""


def _wrap_ddp(model: torch.nn.Module, dist_ctx: DistContext, device: torch.device
              ) -> tuple[torch.nn.Module, SparseGradientSync | None]:
    """DDP over the dense parameters; the sparse embedding tables are averaged by a SparseGradientSync."""
    if not dist_ctx.distributed:
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    sparse = sparse_parameters(model)
    if device.type == "cuda" and sparse:
        raise ValueError("sparse embedding gradients are not synchronized across GPUs yet: use train.optimizer=adam "
                         "for multi-GPU runs")
    sync = None
    if sparse:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(sparse))
        sync = SparseGradientSync(list(sparse.values()), dist_ctx.world_size)
        sync.broadcast_from_main()
    # Every buffer of the models and objectives is a constant built the same on each rank (field offsets,
    # column lists, logQ, the item catalog), so DDP need not re-broadcast them before every forward.
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    return wrapped, sync


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train_loss {record['train_loss']:.4f}"]
    for key, value in record.items():
        if key.startswith("valid_") and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    if record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} step(s) skipped (inf/nan gradients)")
    return " | ".join(parts)
