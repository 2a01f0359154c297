#!/usr/bin/env bash
# Single node, N processes:  launch/torchrun.sh 8 parallel.ep=8 model=deepseek_v3_like ...
# NPROC defaults to the number of visible GPUs (or 2 on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; else
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)"); fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m trainer.torchrun --standalone --nproc_per_node="$NPROC" -m trainer.train "$@"
