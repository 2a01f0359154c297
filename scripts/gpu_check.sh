#!/usr/bin/env bash
# One-GPU check of what CI cannot run (docs/gpu.md): grouped GEMM, SDPA kernels, host
# syncs, a 1-rank NCCL group with FSDP2/DCP, Mamba kernels, priming routing, and training
# runs (resume, Mixture-of-Mamba, a ~1B MoE in bf16 with MFU and peak memory next to the
# dry-run estimate). <= 8 minutes on one H100/H200; prints one markdown table and writes
# it to $OUT/gpu_check.md (or runs/gpu_check/gpu_check.md).
#   bash scripts/gpu_check.sh [--only 0 1 8c]
#   bash scripts/gpu_check.sh --cpu-smoke     # tiny sizes on CPU (what CI runs)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-600}" "$PY" scripts/gpu_check.py "$@"
