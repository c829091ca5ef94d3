#!/usr/bin/env bash
# The CUDA check, for a machine with NVIDIA GPUs: one short run (well under 10 minutes) that prints
# in one place what CPU-only CI cannot show.
#   1. recforge doctor --device cuda (driver, CUDA build, GPUs, AMP and NCCL smoke tests)
#   2. training throughput on CUDA: fp32, fp16 + GradScaler, bf16 (the shared workload, 1 epoch)
#   3. a DDP run over every visible GPU (NCCL), through `recforge train --nproc-per-node`
# usage (from the repository root, after `make quickstart` or with the package installed):
#   bash bench/gpu_check.sh [ROWS]        ROWS: training rows of the workload (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ROWS=${1:-1000000}
WORK=${WORK:-$(mktemp -d)}
echo "== recforge doctor --device cuda"
"$PY" -m recforge.cli doctor --device cuda

echo "== throughput on CUDA (samples/s, one epoch of $ROWS rows)"
"$PY" bench/train_throughput.py --device cuda --rows "$ROWS" --repeats 1 \
    --variants recforge,amp_fp16,amp,recforge_dense,ceiling,ceiling_fp16,ceiling_amp

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
echo "== DDP over $GPUS GPU(s) (NCCL), synthetic world, 1 epoch"
"$PY" -m recforge.cli data generate workdir="$WORK" data.generate.events=1000000
"$PY" -m recforge.cli data prepare workdir="$WORK"
"$PY" -m recforge.cli train --nproc-per-node "$GPUS" workdir="$WORK" run_dir="$WORK/ddp" \
    train.device=cuda train.optimizer=adam train.amp=bf16 train.epochs=1 train.progress=false
"$PY" -c "import json,sys; s=json.load(open('$WORK/ddp/train_summary.json')); print('DDP samples/s:', round(s['samples_per_s']), 'ranks:', s['world_size'])"
