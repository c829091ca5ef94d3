"""The training loop: one function, everything visible.

Adam (or sparse embedding gradients + SparseAdam), epochs of index-sliced batches, AMP
(bf16 autocast on CPU/CUDA, fp16 + GradScaler on CUDA), early stopping on a validation metric,
atomic checkpoints every N steps and at each epoch end (mirrored to storage when train.mirror_to is
set), exact resume, metrics as JSONL.
Validation is passed in as a function so the loop does not depend on how a model is evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from recforge.config import TrainConfig
from recforge.data.batches import SplitData, iterate_batches, steps_per_epoch
from recforge.runtime import DistContext, choose_device, tune_allocator
from recforge.train.checkpoint import RunState, load_checkpoint, mirror_run, save_checkpoint, save_weights
from recforge.train.objectives import Pointwise
from recforge.train.optim import RowWiseAdam

Validator = Callable[[torch.nn.Module], dict[str, float]]
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
    resumable = train_cfg.model_dump(
        exclude={"epochs", "stop_after_steps", "log_every", "progress", "checkpoint_every", "eval_batch_size",
                 "threads", "mirror_to"}
    )
    blob = json.dumps({"train": resumable, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """adam: one Adam over all parameters. rowwise_adam / sparse_adam: a lazy Adam over parameters
    whose gradients are sparse (the embedding table, built with sparse=True), Adam over the rest."""
    if cfg.optimizer == "adam":
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    sparse, dense = [], []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.sparse:
            sparse.extend(module.parameters(recurse=False))
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    if not sparse:
        raise ValueError(f"train.optimizer={cfg.optimizer} needs a model built with sparse embeddings")
    lazy = RowWiseAdam(sparse, lr=cfg.lr) if cfg.optimizer == "rowwise_adam" else torch.optim.SparseAdam(
        sparse, lr=cfg.lr)
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
) -> None:
    """Backward and update; with a GradScaler (fp16), count skipped steps into `skipped`.

    GradScaler skips the update when gradients hold inf/nan and then lowers the scale; comparing
    the scale tensors keeps the count on the device, free of a host sync per step.
    """
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        for opt in optimizers:
            opt.step()
        return
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scale_before = scaler._scale.clone()
    scaler.update()
    skipped += (scaler._scale < scale_before).float()


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


def train(
    model: torch.nn.Module,
    train_data: SplitData,
    validate: Validator | None,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    seed: int,
    digest_extra: dict[str, Any] | None = None,
    resume: bool = False,
    dist_ctx: DistContext | None = None,
    objective: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` in place; with `dist_ctx` from runtime.init_distributed, as one rank of DDP.

    Under DDP each rank trains on its own shard of every epoch's permutation with the per-rank
    `cfg.batch_size`; rank 0 alone validates, logs and writes checkpoints, and broadcasts the
    early-stopping decision so all ranks stop together.

    `objective` wraps `model` and returns the loss of a batch (train/objectives.py); the default
    is pointwise BCE on the click label.
    """
    dist_ctx = dist_ctx or DistContext()
    main = dist_ctx.is_main
    if not main:
        log = _silent
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    digest = config_digest(cfg, digest_extra or {})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_allocator:
        tune_allocator()

    choice = choose_device(cfg.device, dist_ctx.local_rank)
    device = choice.device
    log(f"device: {device} ({choice.reason})" + (
        f"; {dist_ctx.world_size} processes ({dist_ctx.backend})" if dist_ctx.distributed else ""))
    objective = (objective if objective is not None else Pointwise(model)).to(device)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    autocast_context(cfg.amp, device)  # fail early on an impossible AMP setting

    state = RunState(world_size=dist_ctx.world_size)
    if resume:
        state = load_checkpoint(ckpt_dir / "last.pt", model, optimizers, scaler, digest)
        log(f"resumed from {ckpt_dir / 'last.pt'}: epoch {state.epoch}, {state.samples_in_epoch:,} rows into it, "
            f"global step {state.global_step} (written with {state.world_size} process(es), now {dist_ctx.world_size})")
        if state.finished and state.epoch >= cfg.epochs:
            log("that run had already finished; nothing to do")
            return TrainResult(run_dir, state, str(device), choice.reason, False, 0.0)
        state.finished = False
        state.world_size = dist_ctx.world_size
    if dist_ctx.distributed:
        # Per-rank seeds for dropout; the data order stays the shared (seed, epoch) permutation.
        torch.manual_seed(seed + 7919 * dist_ctx.rank + state.global_step)
    step_model = _wrap_ddp(objective, dist_ctx, device)
    if cfg.compile:
        step_model = torch.compile(step_model)

    global_batch = cfg.batch_size * dist_ctx.world_size
    metrics_file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main else None
    pin = device.type == "cuda"
    interrupted = False
    trained_samples, train_seconds = 0, 0.0
    check_every = cfg.log_every if dist_ctx.distributed else 1

    def checkpoint() -> None:
        if not main:
            return
        save_checkpoint(ckpt_dir / "last.pt", model, optimizers, scaler, state, digest)
        if cfg.mirror_to:
            # A failed upload (retries spent) costs the remote copy of this checkpoint, not the run:
            # the next checkpoint tries again, and the local one is intact.
            try:
                mirror_run(run_dir, cfg.mirror_to, state)
            except OSError as exc:
                log(f"warning: mirroring checkpoint to {cfg.mirror_to} failed, training goes on: {exc}")

    def write_metrics(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not (cfg.progress and main),
    )
    with progress, _StopRequest() as stop, contextlib.ExitStack() as files:
        if metrics_file is not None:
            files.enter_context(metrics_file)
        while state.epoch < cfg.epochs and not interrupted:
            epoch = state.epoch
            total_steps = steps_per_epoch(len(train_data) - state.samples_in_epoch, cfg.batch_size,
                                          dist_ctx.world_size)
            task = progress.add_task("train", total=total_steps, epoch=epoch, loss="-")
            step_model.train()
            # Running sums stay on the device: no host sync per step, only at logging points.
            loss_sum = torch.zeros((), device=device)
            loss_count = 0
            skipped = torch.zeros((), device=device)  # steps GradScaler skipped, counted on the device
            epoch_start = time.perf_counter()
            epoch_samples = 0
            batches = iterate_batches(train_data, cfg.batch_size, shuffle=True, seed=seed, epoch=epoch,
                                      start_sample=state.samples_in_epoch, rank=dist_ctx.rank,
                                      world_size=dist_ctx.world_size, pin_memory=pin)
            for batch in batches:
                batch = batch.to(device, non_blocking=pin)
                with autocast_context(cfg.amp, device):
                    loss = step_model(batch.categorical, batch.numeric, batch.label, batch.history_values,
                                      batch.history_offsets)
                optimizer_step(loss, optimizers, scaler, skipped)
                loss_sum += loss.detach()
                loss_count += 1
                epoch_samples += len(batch)
                state.samples_in_epoch = min(len(train_data), state.samples_in_epoch + global_batch)
                state.global_step += 1

                if state.global_step % cfg.log_every == 0:
                    mean_loss = _all_reduce_mean(loss_sum / loss_count, dist_ctx).item()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"training loss became {mean_loss} at step {state.global_step}; "
                            "lower train.lr or turn off train.amp"
                        )
                    write_metrics({"step": state.global_step, "epoch": epoch, "train_loss": mean_loss,
                                   "skipped_steps": int(skipped.item()), "time": time.time()})
                    progress.update(task, loss=f"{mean_loss:.4f}")
                progress.update(task, advance=1)
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    checkpoint()
                # Under DDP a signal may reach the ranks at different steps: they agree at check points.
                signalled = state.global_step % check_every == 0 and _any_rank(stop.requested, dist_ctx, device)
                capped = bool(cfg.stop_after_steps) and state.global_step >= (cfg.stop_after_steps or 0)
                if signalled or capped:
                    interrupted = True
                    break
            elapsed = time.perf_counter() - epoch_start
            trained_samples += epoch_samples
            train_seconds += elapsed
            progress.remove_task(task)
            if interrupted:
                checkpoint()
                why = "signal received" if stop.requested else f"train.stop_after_steps={cfg.stop_after_steps}"
                log(f"stopped in epoch {epoch} after {state.samples_in_epoch:,} rows ({why}); "
                    f"checkpoint {ckpt_dir / 'last.pt'}; continue with --resume")
                break

            record: dict[str, Any] = {
                "epoch": epoch, "step": state.global_step,
                "train_loss": _all_reduce_mean(loss_sum / max(loss_count, 1), dist_ctx).item(),
                "skipped_steps": int(skipped.item()),
                "samples_per_s": epoch_samples * dist_ctx.world_size / elapsed if elapsed > 0 else None,
            }
            if validate is not None:
                value = float("nan")
                if main:
                    model.eval()
                    valid_metrics = validate(model)
                    record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
                    value = valid_metrics[cfg.early_stopping_metric]
                (value,) = _broadcast_floats([value], dist_ctx, device)
                if _improved(cfg.early_stopping_metric, value, state.best_metric):
                    state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
                    if main:
                        save_weights(run_dir / "model.pt", model)
                else:
                    state.bad_epochs += 1
            else:
                state.best_epoch = epoch
                if main:
                    save_weights(run_dir / "model.pt", model)
            state.history.append(record)
            write_metrics(record)
            log(_epoch_line(record))
            state.epoch += 1
            state.samples_in_epoch = 0
            if state.bad_epochs >= cfg.patience:
                log(f"early stopping: valid {cfg.early_stopping_metric} has not improved for "
                    f"{state.bad_epochs} epoch(s); best epoch {state.best_epoch}")
                state.epoch = cfg.epochs
            if state.epoch >= cfg.epochs:
                state.finished = True
            checkpoint()

    return TrainResult(run_dir, state, str(device), choice.reason, interrupted,
                       trained_samples * dist_ctx.world_size / train_seconds if train_seconds > 0 else 0.0)


def _silent(message: str) -> None:
    """Log sink of ranks other than 0."""


def _wrap_ddp(model: torch.nn.Module, dist_ctx: DistContext, device: torch.device) -> torch.nn.Module:
    if not dist_ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda" and any(
        isinstance(m, torch.nn.Embedding) and m.sparse for m in model.modules()
    ):
        raise ValueError("NCCL cannot all-reduce sparse gradients: use train.optimizer=adam for multi-GPU runs")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train_loss {record['train_loss']:.4f}"]
    for key in ("valid_auc", "valid_gauc", "valid_logloss", "valid_recall@20", "valid_ndcg@20"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} step(s) skipped (inf/nan gradients)")
    return " | ".join(parts)
