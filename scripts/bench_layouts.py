"""Training throughput of parallel layouts side by side, through the real CLI.

Each layout trains the same model, seed and global batch for ``--steps`` steps; the
script reports the median tokens/s of the steps after ``--warmup`` (from metrics.jsonl),
the ratio to the single-process run measured in the same invocation, and the last loss
(equal across layouts: the parity promise). On CPU with gloo, model parallelism is not
expected to speed a tiny model up; the ratios show what the collectives cost.

    python scripts/bench_layouts.py [--steps 20] [--seq-len 128] [--layouts tp2 tp2_sp ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (processes, overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_etp2": (2, ["parallel.tp=2", "parallel.etp=2"]),
    "tp2_sp_ep2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]),
    "tp2xdp2_ep4": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4"]),
}


def train_cli(name: str, nproc: int, overrides: list[str], run_dir: Path,
              threads: int = 1) -> list[dict]:
    """Train through the CLI (launch/torchrun.sh for nproc > 1) without evaluation,
    checkpoints or loggers beyond metrics.jsonl; returns its records."""
    overrides = [
        f"run_dir={run_dir}", "trainer.eval_every=0", "checkpoint.every=0",
        "checkpoint.save_final=false", "logger.console=plain", "logger.tensorboard=false",
        "logger.wandb.mode=disabled", "logger.expert_load_every=0", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHON=sys.executable)
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer.train", *overrides]
    else:
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), str(nproc), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(name: str, nproc: int, extra: list[str], args, out: Path) -> dict:
    overrides = [
        f"trainer.max_steps={args.steps}", f"trainer.seq_len={args.seq_len}",
        f"trainer.micro_batch_size={args.micro_batch}", f"trainer.global_batch_size={args.global_batch}",
        *extra,
    ]  # fmt: skip
    recs = train_cli(name, nproc, overrides, out / name, args.threads)
    tps = [r["tokens_per_s"] for r in recs if r["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(tps), "loss": recs[-1]["loss"], "nproc": nproc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = ap.parse_args()
    names = ["single"] + [n for n in args.layouts if n != "single"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, *LAYOUTS[n], args, Path(tmp)) for n in names}
    base = results["single"]["tokens_per_s"]
    print(f"{'layout':<14} {'procs':>5} {'tokens/s':>10} {'vs single':>10} {'last loss':>10}")
    for n, r in results.items():
        print(f"{n:<14} {r['nproc']:>5} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s'] / base:>10.2f} {r['loss']:>10.4f}")


if __name__ == "__main__":
    main()
