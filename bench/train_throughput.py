"""Training throughput of recforge's DNN ranker on the shared CTR workload.

The workload (../shared/bench/peers/README.md): 1M training rows and 200k validation rows of five
categorical fields (user 100k ids, item 500k, hour 24, device 5, category 1,000), embedding 32 per
field, MLP [256, 128] ReLU, one logit, BCE, Adam lr 1e-3, batch 4096, one epoch, 2 threads.

Variants, each timed over one epoch (samples/s = training rows / seconds):
  recforge         recforge.train.trainer.train() as configured by default (fused embedding table,
                   sparse gradients, optimizer="rowwise_adam", fp32). samples_per_s is the trainer's
                   epoch loop (data pipeline included); whole_call_samples_per_s adds set-up and the
                   end-of-epoch weights + checkpoint.
  amp              the same with train.amp="bf16" (bf16 autocast on the CPU).
  recforge_dense   the same with optimizer="adam" (dense Adam over the whole table).
  recforge_sparse  the same with optimizer="sparse_adam" (torch.optim.SparseAdam for the table).
  naive            the model as plain PyTorch code would have it (one nn.Embedding per field,
                   dense Adam) fed by DataLoader(TensorDataset(...), batch_size=4096, shuffle=True).
  ceiling          recforge's default step (model, optimizers, loss, allocator set-up) repeated on
                   ONE fixed batch (no data pipeline, no checkpoint): the compute ceiling of `recforge`.
  ceiling_amp      the same under bf16 autocast: the ceiling of `amp`.
  ceiling_dense    the same with dense Adam: the ceiling of `recforge_dense`.
  memory           `recforge` on the training rows as a sharded prepared split (data/shards.py,
                   --shard-rows rows a shard), loaded whole by SplitData.load: train.data_loading=memory.
  stream           the same shards streamed (data/stream.py, train.data_loading=stream) through a
                   --shuffle-buffer-row buffer. Run `--variants memory,stream` to alternate the two
                   paths on the same prepared data; the summary gives stream's share of memory's rate.
Every variant reports validation AUC (recforge.metrics.auc on the raw logits). The ceiling
variants train on a single batch, so their AUC only shows that the step runs, not model quality.

Each (variant, repeat) runs in a fresh interpreter, so no run inherits another's heap, and the
variants are interleaved (the order rotates every repeat) so that drift on a shared machine
spreads over all of them. Data loading and evaluation are outside the timed part.

Data: generated here with the same distributions and RNG sequence as the shared generator
(gen_data.py), cached as .npy under .bench/workload/; `--data DIR` reads the files gen_data.py
writes instead (train_X.npy, train_y.npy, val_X.npy, val_y.npy). Ids are used as they come
(0..n-1, cardinality = vocabulary size); recforge's own prepared data reserves index 0 for
unknown values, which changes nothing here but one extra row per field.

glibc malloc serves large blocks with mmap and returns them on free, so per-step temporaries the
size of the embedding table turn into page faults every step. recforge's trainer tunes glibc
in-process (TrainConfig.tune_allocator) unless MALLOC_* variables are set; the naive loop gets
whatever the environment gives. The allocator settings (MALLOC_* variables, LD_PRELOAD) are
recorded with every result, and so are the timed part's system time and minor page faults.

    .venv/bin/python bench/train_throughput.py                        # all variants, 3 repeats
    .venv/bin/python bench/train_throughput.py --variants recforge,ceiling --repeats 5
    .venv/bin/python bench/train_throughput.py --data /tmp/recforge-peers/data --json
    .venv/bin/python bench/train_throughput.py --variants memory,stream --rows 200000 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench" / "workload"

VOCAB = {"user_id": 100_000, "item_id": 500_000, "hour": 24, "device": 5, "category": 1_000}
FIELDS = tuple(VOCAB)
SEED = 20240601  # the shared generator's default: same seed and sizes give identical rows
EMBEDDING_DIM = 32
HIDDEN = (256, 128)
BATCH = 4096
LR = 1e-3
EVAL_BATCH = 65_536
# variant -> (what runs, optimizer, amp)
SPECS = {
    "recforge": ("trainer", "rowwise_adam", "off"),
    "amp": ("trainer", "rowwise_adam", "bf16"),
    "recforge_dense": ("trainer", "adam", "off"),
    "recforge_sparse": ("trainer", "sparse_adam", "off"),
    "naive": ("naive", "adam", "off"),
    "ceiling": ("ceiling", "rowwise_adam", "off"),
    "ceiling_amp": ("ceiling", "rowwise_adam", "bf16"),
    "ceiling_dense": ("ceiling", "adam", "off"),
    # CUDA only (bench/gpu_check.sh): fp16 autocast with GradScaler.
    "amp_fp16": ("trainer", "rowwise_adam", "fp16"),
    "ceiling_fp16": ("ceiling", "rowwise_adam", "fp16"),
    # The two train.data_loading paths over one sharded prepared split.
    "memory": ("prepared", "rowwise_adam", "off"),
    "stream": ("prepared", "rowwise_adam", "off"),
}
DEVICE = "cpu"  # set from --device in each worker
VARIANTS = tuple(SPECS)
# Run by default; recforge_sparse and ceiling_dense on request (--variants).
DEFAULT_VARIANTS = ("recforge", "amp", "recforge_dense", "naive", "ceiling", "ceiling_amp")
DATA_FILES = ("train_X.npy", "train_y.npy", "val_X.npy", "val_y.npy")


# --------------------------------------------------------------------------------------------
# Workload


def _zipf_ids(rng: np.random.Generator, n_ids: int, a: float, size: int) -> np.ndarray:
    ranks = np.arange(1, n_ids + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** (-a))
    cdf /= cdf[-1]
    r = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_ids - 1)
    return rng.permutation(n_ids)[r]  # popularity rank -> id, so the hot ids are spread out


def generate_workload(n_train: int, n_val: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Zipf users and items, uniform hours, skewed devices, category a function of the item;
    labels drawn from a hidden logistic model with its intercept tuned to ~20% positives.
    The draws happen in the shared generator's order, so its output is reproduced exactly."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    user = _zipf_ids(rng, VOCAB["user_id"], 1.05, n)
    item = _zipf_ids(rng, VOCAB["item_id"], 1.10, n)
    hour = rng.integers(0, 24, n)
    device = rng.choice(5, size=n, p=[0.5, 0.3, 0.1, 0.07, 0.03])
    item_category = rng.integers(0, VOCAB["category"], VOCAB["item_id"])
    category = item_category[item]

    u_bias = rng.normal(0, 0.6, VOCAB["user_id"])
    i_bias = rng.normal(0, 0.6, VOCAB["item_id"])
    c_bias = rng.normal(0, 0.6, VOCAB["category"])
    h_eff = 0.5 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    d_eff = np.array([0.0, 0.3, -0.3, 0.5, -0.5])
    u_vec = rng.normal(0, 1, (VOCAB["user_id"], 4)) / 2
    i_vec = rng.normal(0, 1, (VOCAB["item_id"], 4)) / 2
    logit = (u_bias[user] + i_bias[item] + c_bias[category] + h_eff[hour] + d_eff[device]
             + 0.8 * np.einsum("nd,nd->n", u_vec[user], i_vec[item]))
    lo, hi = -10.0, 10.0
    for _ in range(60):  # bisect the intercept for a 20% positive rate
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logit + mid)))).mean() > 0.20:
            hi = mid
        else:
            lo = mid
    prob = 1 / (1 + np.exp(-(logit + (lo + hi) / 2)))
    y = (rng.random(n) < prob).astype(np.float32)
    X = np.stack([user, item, hour, device, category], axis=1).astype(np.int64)
    return {"train_X": X[:n_train], "train_y": y[:n_train], "val_X": X[n_train:], "val_y": y[n_train:]}


def cached_workload(n_train: int, n_val: int) -> Path:
    """Directory holding the workload as .npy; generated on first use."""
    out = CACHE / f"train{n_train}_val{n_val}_seed{SEED}"
    done = out / "meta.json"
    if done.is_file():
        return out
    _say(f"generating the workload ({n_train:,} + {n_val:,} rows) into {out} ...")
    t0 = time.perf_counter()
    arrays = generate_workload(n_train, n_val)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array)
    meta = {"seed": SEED, "n_train": n_train, "n_val": n_val, "vocab": VOCAB,
            "pos_rate_train": float(arrays["train_y"].mean())}
    done.write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks the cache complete
    _say(f"  done in {time.perf_counter() - t0:.1f}s")
    return out


def load_workload(data_dir: Path, n_train: int | None) -> tuple[np.ndarray, ...]:
    Xtr = np.load(data_dir / "train_X.npy")
    ytr = np.load(data_dir / "train_y.npy")
    Xva = np.load(data_dir / "val_X.npy")
    yva = np.load(data_dir / "val_y.npy")
    if n_train is not None:
        Xtr, ytr = Xtr[:n_train], ytr[:n_train]
    return (np.ascontiguousarray(Xtr, dtype=np.int64), np.ascontiguousarray(ytr, dtype=np.float32),
            np.ascontiguousarray(Xva, dtype=np.int64), np.ascontiguousarray(yva, dtype=np.float32))


def sharded_workload(workload: Path, n_train: int, shard_rows: int) -> Path:
    """The first `n_train` training rows as a sharded prepared split (train/shard-*/, manifest.json);
    written on first use beside the workload, so both data paths read the very same files."""
    from recforge.data.shards import MANIFEST_FILE, shard_bounds, shard_name, write_manifest, write_shard

    out = workload / f"sharded-{n_train}-{shard_rows}"
    if (out / MANIFEST_FILE).is_file():
        return out
    from recforge.storage import save_array

    Xtr, ytr, _, _ = load_workload(workload, n_train)
    entries = []
    for index, (start, stop) in enumerate(shard_bounds(len(ytr), shard_rows)):
        X, directory = Xtr[start:stop], out / "train" / shard_name(index)
        entry = write_shard(directory, {"categorical": X, "label": ytr[start:stop],
                                        "timestamp": np.arange(start, stop), "user_key": X[:, 0]})
        # No numeric features: an [n, 0] column, written here because write_shard cannot hash an
        # array with a zero-length axis (memoryview.cast refuses it).
        save_array(directory / "numeric.npy", np.zeros((len(X), 0), dtype=np.float32))
        entry["columns"]["numeric"] = {"dtype": "<f4", "shape": [len(X), 0], "sha256": hashlib.sha256(b"").hexdigest()}
        entries.append(entry)
    write_manifest(out, {"train": entries}, shard_rows=shard_rows, features={}, engine="bench")
    return out


# --------------------------------------------------------------------------------------------
# One measurement (runs in its own interpreter)


class _Meter:
    """Wall time plus this process's CPU and minor page faults over a block."""

    def __enter__(self) -> _Meter:
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.user_s = usage.ru_utime - self._usage.ru_utime
        self.sys_s = usage.ru_stime - self._usage.ru_stime
        self.minflt = usage.ru_minflt - self._usage.ru_minflt

    def record(self, samples: int) -> dict[str, Any]:
        return {"samples": samples, "train_s": round(self.seconds, 3),
                "samples_per_s": round(samples / self.seconds, 1), "user_s": round(self.user_s, 2),
                "sys_s": round(self.sys_s, 2), "minflt": self.minflt}


def _recforge_model(sparse: bool) -> Any:
    import torch

    from recforge.config import ModelConfig
    from recforge.features import FeatureLayout
    from recforge.models import build_model

    torch.manual_seed(0)
    features = FeatureLayout(categorical=FIELDS, cardinalities=tuple(VOCAB.values()), numeric=())
    cfg = ModelConfig(name="dnn", embedding_dim=EMBEDDING_DIM, hidden=list(HIDDEN), dropout=0.0)
    return build_model(features, cfg, sparse=sparse)


def _split(X: np.ndarray, y: np.ndarray, name: str) -> Any:
    import torch

    from recforge.data.batches import SplitData

    return SplitData(name=name, categorical=torch.from_numpy(X), numeric=torch.zeros((len(y), 0)),
                     label=torch.from_numpy(y), user_key=X[:, 0].copy())


def _train_config(optimizer: str, amp: str = "off", **extra: Any) -> Any:
    from recforge.config import TrainConfig

    return TrainConfig(epochs=1, batch_size=BATCH, lr=LR, optimizer=optimizer, amp=amp, progress=False,
                       checkpoint_every=0, device=DEVICE, **extra)


def _val_auc(score: Any, Xva: np.ndarray, yva: np.ndarray) -> float:
    import torch

    from recforge.metrics import auc

    X = torch.from_numpy(Xva)
    with torch.no_grad():
        logits = torch.cat([score(X[s : s + EVAL_BATCH]) for s in range(0, len(X), EVAL_BATCH)])
    return auc(yva, logits.float().numpy())


def _recforge_scorer(model: Any) -> Any:
    import torch

    model.eval()
    device = next(model.parameters()).device
    return lambda x: model(x.to(device), torch.zeros((len(x), 0), device=device)).cpu()


def run_recforge(data: tuple[np.ndarray, ...], optimizer: str, amp: str) -> dict[str, Any]:
    from recforge.train.trainer import TrainOptions, train

    Xtr, ytr, Xva, yva = data
    cfg = _train_config(optimizer, amp)
    model = _recforge_model(cfg.sparse_embeddings)
    split = _split(Xtr, ytr, "train")
    # The run directory gets model.pt and checkpoints/last.pt: on the same disk as the repository,
    # as a real run's would be (tmpfs would hide the cost of writing them).
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=CACHE.parent) as run_dir, _Meter() as meter:
        result = train(model, split, None, cfg, TrainOptions(run_dir, seed=0, log=lambda _: None))
    record = meter.record(len(ytr))
    record["allocator_in_process"] = "tuned by train() (TrainConfig.tune_allocator)" if cfg.tune_allocator else None
    # The headline figure is the epoch loop (data pipeline included), as the peers are timed;
    # the whole call adds one-off set-up (torch's first optimizer import) and the checkpoint write.
    record["whole_call_samples_per_s"] = record["samples_per_s"]
    record["samples_per_s"] = round(result.samples_per_s, 1)
    record["train_loss"] = round(result.state.history[-1]["train_loss"], 5)
    record["auc"] = _val_auc(_recforge_scorer(model), Xva, yva)
    return record


def run_prepared(prepared: Path, mode: str, shuffle_buffer: int, val: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """train() on the sharded split, all in memory or streamed: the timed part is the epoch loop."""

    from recforge.data.batches import SplitData
    from recforge.data.stream import ShardStream
    from recforge.train.trainer import TrainOptions, train

    cfg = _train_config("rowwise_adam", data_loading=mode, shuffle_buffer=shuffle_buffer)
    model = _recforge_model(cfg.sparse_embeddings)
    # Loading the memory path's split is outside the timed part, as for every variant; a stream reads
    # its shards inside the epoch loop, so its rate includes the reading.
    data = (ShardStream.open(prepared, "train", shuffle_buffer) if mode == "stream"
            else SplitData.load(prepared, "train"))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=CACHE.parent) as run_dir, _Meter() as meter:
        result = train(model, data, None, cfg, TrainOptions(run_dir, seed=0, log=lambda _: None))
    record = meter.record(len(data))
    record["whole_call_samples_per_s"] = record["samples_per_s"]
    record["samples_per_s"] = round(result.samples_per_s, 1)
    record["train_loss"] = round(result.state.history[-1]["train_loss"], 5)
    record["shuffle_buffer"] = shuffle_buffer if mode == "stream" else None
    record["peak_rss_mib"] = _peak_rss_mib()
    record["auc"] = _val_auc(_recforge_scorer(model), *val)
    return record


def _peak_rss_mib() -> int:
    """This process's own peak (VmHWM): ru_maxrss survives exec and would include the parent's."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024


def _naive_model() -> Any:
    import torch
    from torch import nn

    class PlainDNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.ModuleList(nn.Embedding(n, EMBEDDING_DIM) for n in VOCAB.values())
            for emb in self.embeddings:
                # Same small init as recforge, so the AUC columns compare training, not init
                # (nn.Embedding's N(0, 1) default costs ~.03 AUC on this workload).
                nn.init.normal_(emb.weight, std=0.01)
            self.mlp = nn.Sequential(
                nn.Linear(len(VOCAB) * EMBEDDING_DIM, HIDDEN[0]), nn.ReLU(),
                nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
                nn.Linear(HIDDEN[1], 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            emb = torch.cat([table(x[:, j]) for j, table in enumerate(self.embeddings)], dim=1)
            return self.mlp(emb).squeeze(-1)

    torch.manual_seed(0)
    return PlainDNN()


def run_naive(data: tuple[np.ndarray, ...]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    Xtr, ytr, Xva, yva = data
    model = _naive_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.from_numpy(Xtr), torch.from_numpy(ytr)),
                        batch_size=BATCH, shuffle=True)
    model.train()
    with _Meter() as meter:
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(xb), yb)
            loss.backward()
            optimizer.step()
    record = meter.record(len(ytr))
    record["allocator_in_process"] = None  # plain PyTorch: whatever the environment gives
    model.eval()
    record["auc"] = _val_auc(model, Xva, yva)
    return record


def _tune_allocator_like_trainer(cfg: Any) -> Any:
    """train() applies recforge's glibc malloc settings before its loop; the ceiling runs under the
    same allocator, or it would measure the allocator instead of the step."""
    if not cfg.tune_allocator:
        return None
    from recforge.runtime import tune_allocator

    return tune_allocator()


def run_ceiling(data: tuple[np.ndarray, ...], optimizer: str, amp: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from recforge.data.batches import iterate_batches
    from recforge.losses import bce_with_logits
    from recforge.train.trainer import autocast_context, make_optimizers, optimizer_step

    Xtr, ytr, Xva, yva = data
    cfg = _train_config(optimizer, amp)
    device = torch.device(DEVICE)
    model = _recforge_model(cfg.sparse_embeddings).to(device)
    allocator = _tune_allocator_like_trainer(cfg)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    skipped = torch.zeros((), device=device)
    # The trainer's own first batch, then its step (zero_grad, forward, loss, backward, step).
    batch = next(iterate_batches(_split(Xtr, ytr, "train"), BATCH, shuffle=True, seed=0)).to(device)
    model.train()
    loss_sum = torch.zeros((), device=device)

    def step() -> None:
        nonlocal loss_sum
        with autocast_context(cfg.amp, device):
            logits = model(batch.categorical, batch.numeric)
        loss = bce_with_logits(logits, batch.label)
        optimizer_step(loss, optimizers, scaler, skipped)
        loss_sum += loss.detach()

    for _ in range(warmup):  # optimizer state is allocated on the first step
        step()
    _sync()
    with _Meter() as meter:
        for _ in range(steps):
            step()
        _sync()
    record = meter.record(steps * len(batch))
    record["warmup_steps"] = warmup
    record["allocator_in_process"] = allocator
    record["auc"] = _val_auc(_recforge_scorer(model), Xva, yva)
    return record


def _sync() -> None:
    """Wait for queued GPU work, so a timer measures the work and not the launches."""
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    import torch

    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    kind, optimizer, amp = SPECS[args.worker]
    if kind == "prepared":  # the training rows come from the shards; only validation from the workload
        prepared = sharded_workload(Path(args.workload), args.rows, args.shard_rows)
        record = run_prepared(prepared, args.worker, args.shuffle_buffer, _val_arrays(Path(args.workload)))
        _save_record(record, optimizer, amp, args)
        return
    data = load_workload(Path(args.workload), args.rows)
    if kind == "trainer":
        record = run_recforge(data, optimizer, amp)
    elif kind == "naive":
        record = run_naive(data)
    else:
        record = run_ceiling(data, optimizer, amp, steps=args.ceiling_steps, warmup=args.ceiling_warmup)
    _save_record(record, optimizer, amp, args)


def _val_arrays(workload: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.ascontiguousarray(np.load(workload / "val_X.npy"), dtype=np.int64),
            np.ascontiguousarray(np.load(workload / "val_y.npy"), dtype=np.float32))


def _save_record(record: dict[str, Any], optimizer: str, amp: str, args: argparse.Namespace) -> None:
    import torch

    record.update(optimizer=optimizer, amp=amp)
    record["auc"] = round(record["auc"], 4)
    record["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------
# Driver


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def allocator_settings() -> dict[str, Any]:
    """The environment that decides how large tensors are allocated and freed."""
    malloc_vars = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    libc, libc_version = platform.libc_ver()
    return {
        "malloc_env": malloc_vars or None,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
        "libc": f"{libc} {libc_version}".strip() or None,
        "summary": ("default glibc malloc (no MALLOC_* variables, no LD_PRELOAD)"
                    if not malloc_vars and not os.environ.get("LD_PRELOAD")
                    and not os.environ.get("GLIBC_TUNABLES") else "customized: see fields"),
    }


def _recforge_version() -> dict[str, Any]:
    """The code under test: the commit, and whether src/ differs from it."""
    from recforge.config import TrainConfig

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "src_modified": None if status is None else bool(status),
            "src_sha256": _src_digest(),
            "tune_allocator_default": TrainConfig().tune_allocator}


def _src_digest() -> str:
    """Digest of the package source, compared before and after the runs: a change in between
    means the runs did not all measure the same code."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "recforge").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_one(variant: str, workload: Path, rows: int | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--workload", str(workload),
           "--threads", str(args.threads), "--result", str(result_path), "--device", args.device,
           "--ceiling-steps", str(args.ceiling_steps), "--ceiling-warmup", str(args.ceiling_warmup),
           "--shard-rows", str(args.shard_rows), "--shuffle-buffer", str(args.shuffle_buffer)]
    if rows is not None:
        cmd += ["--rows", str(rows)]
    try:
        # The worker's stdout goes to stderr: with --json, stdout carries the JSON object only.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed (exit status {proc.returncode}); see the messages above")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, records in runs.items():
        sps = [r["samples_per_s"] for r in records]
        entry: dict[str, Any] = {
            "samples_per_s": round(statistics.median(sps), 1),
            "auc": round(statistics.median(r["auc"] for r in records), 4),
            "samples_per_s_runs": sps,
            "auc_runs": [r["auc"] for r in records],
            "runs": records,
        }
        if "whole_call_samples_per_s" in records[0]:
            entry["whole_call_samples_per_s"] = round(
                statistics.median(r["whole_call_samples_per_s"] for r in records), 1)
        out[variant] = entry
    if "naive" in out:
        for entry in out.values():
            entry["ratio_to_naive"] = round(entry["samples_per_s"] / out["naive"]["samples_per_s"], 2)
    # How close each trainer variant runs to the compute ceiling of the same step.
    for variant, ceiling in (("recforge", "ceiling"), ("amp", "ceiling_amp"), ("recforge_dense", "ceiling_dense"),
                             ("amp_fp16", "ceiling_fp16")):
        if variant in out and ceiling in out:
            out[variant]["share_of_ceiling"] = round(out[variant]["samples_per_s"] / out[ceiling]["samples_per_s"], 3)
    if "memory" in out and "stream" in out:  # the goal: streaming within 10% of the memory path
        out["stream"]["share_of_memory"] = round(out["stream"]["samples_per_s"] / out["memory"]["samples_per_s"], 3)
    return out


def print_table(summary: dict[str, Any], meta: dict[str, Any]) -> None:
    print(f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_count']} CPUs ({meta['cpu_model']}), "
          f"{meta['rows']:,} training rows, {meta['val_rows']:,} validation rows, {meta['repeats']} repeats")
    print(f"allocator: {meta['allocator']['summary']}; MALLOC_*: {meta['allocator']['malloc_env']}; "
          f"recforge tunes glibc in-process: {meta['recforge']['tune_allocator_default']}")
    rf = meta["recforge"]
    print(f"recforge: commit {rf['commit']}, src/ modified: {rf['src_modified']}, "
          f"src sha256 {rf['src_sha256']} (after: {rf['src_sha256_after']})")
    print(f"data: {meta['data']}")
    print(f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}")
    header = f"{'variant':<16} {'median/s':>10} {'x naive':>8} {'AUC':>7}  runs (samples/s; sys s; minor faults)"
    print(header)
    print("-" * len(header))
    for variant, entry in summary.items():
        ratio = f"{entry['ratio_to_naive']:.2f}" if "ratio_to_naive" in entry else "-"
        runs = ", ".join(f"{r['samples_per_s']:,.0f} ({r['sys_s']:.1f}s; {r['minflt'] / 1e6:.2f}M)"
                         for r in entry["runs"])
        print(f"{variant:<16} {entry['samples_per_s']:>10,.0f} {ratio:>8} {entry['auc']:>7.4f}  {runs}")
        if "whole_call_samples_per_s" in entry:
            whole = ", ".join(f"{r['whole_call_samples_per_s']:,.0f}" for r in entry["runs"])
            share = f"; {entry['share_of_ceiling']:.0%} of its ceiling" if "share_of_ceiling" in entry else ""
            share += f"; {entry['share_of_memory']:.1%} of memory" if "share_of_memory" in entry else ""
            print(f"{'':<16} {entry['whole_call_samples_per_s']:>10,.0f} {'':>8} {'':>7}  "
                  f"whole train() call incl. set-up and checkpoint: {whole}{share}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None,
                        help="training rows (default 1,000,000; with --data: all rows of the files)")
    parser.add_argument("--val-rows", type=int, default=200_000, help="validation rows to generate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where recforge's variants train (naive always runs on the CPU)")
    parser.add_argument("--data", type=Path, default=None,
                        help="directory of .npy files written by ../shared/bench/peers/gen_data.py")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--ceiling-steps", type=int, default=100, help="timed steps of the ceiling variants")
    parser.add_argument("--ceiling-warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="rows a shard (memory and stream variants)")
    parser.add_argument("--shuffle-buffer", type=int, default=1_000_000,
                        help="train.shuffle_buffer of the stream variant (rows)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    if args.data is not None:
        missing = [f for f in DATA_FILES if not (args.data / f).is_file()]
        if missing:
            raise SystemExit(f"--data {args.data}: missing {', '.join(missing)} "
                             "(write them with ../shared/bench/peers/gen_data.py --out DIR)")
        workload, rows, data_desc = args.data, args.rows, f"{args.data} (--data)"
    else:
        rows = args.rows or 1_000_000
        workload = cached_workload(rows, args.val_rows)
        data_desc = f"generated, seed {SEED}, cached in {workload}"
    Xtr_shape = np.load(workload / "train_y.npy", mmap_mode="r").shape[0]
    n_train = min(rows, Xtr_shape) if rows is not None else Xtr_shape
    n_val = np.load(workload / "val_y.npy", mmap_mode="r").shape[0]

    import torch

    meta: dict[str, Any] = {
        "torch": torch.__version__, "threads": args.threads, "rows": n_train, "val_rows": n_val,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None,
        "repeats": args.repeats, "variants": variants, "data": data_desc,
        "allocator": allocator_settings(), "recforge": _recforge_version(),
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "ceiling_steps": args.ceiling_steps, "ceiling_warmup": args.ceiling_warmup,
        "batch_size": BATCH, "embedding_dim": EMBEDDING_DIM, "hidden": list(HIDDEN), "lr": LR,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    order_log = []
    for repeat in range(args.repeats):
        k = repeat % len(variants)
        order = variants[k:] + variants[:k]
        order_log.append(order)
        for variant in order:
            # The 1-minute load average around each run flags runs that shared the cores.
            load_start = round(os.getloadavg()[0], 2)
            record = run_one(variant, workload, n_train, args)
            record.update(repeat=repeat, loadavg_1m_start=load_start, loadavg_1m_end=round(os.getloadavg()[0], 2))
            runs[variant].append(record)
            _say(f"repeat {repeat + 1}/{args.repeats} {variant:<16} {record['samples_per_s']:>10,.0f} samples/s"
                 f"  auc {record['auc']:.4f}  sys {record['sys_s']:.1f}s  minflt {record['minflt']:,}"
                 f"  load {load_start:.2f}->{record['loadavg_1m_end']:.2f}")
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["recforge"]["src_sha256_after"] = _src_digest()
    if meta["recforge"]["src_sha256_after"] != meta["recforge"]["src_sha256"]:
        _say("warning: src/recforge changed while the benchmark ran; the runs measured different code")
    meta["order"] = order_log
    summary = summarize(runs)
    if args.json:
        print(json.dumps({**summary, "meta": meta}))
    else:
        print_table(summary, meta)


if __name__ == "__main__":
    main()
