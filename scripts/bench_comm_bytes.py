"""Bytes each rank hands to collectives per training step, by collective and dtype, for
FSDP2 in fp32 and bf16 (``MixedPrecisionPolicy``) with the gradient reduce-scatter after
every micro-batch or only the last one (``parallel.fsdp_grad_sync``); gloo on CPU, through
the real trainer (``trainer.train.run``) on 2 ranks of one spawn.

Counted: the input of every ``torch.distributed`` all-gather / reduce-scatter /
all-reduce / all-to-all / broadcast call made inside ``Trainer.train_step`` (FSDP's own
calls included), divided by the steps. Bytes are deterministic: contention does not
change them, only the wall time of this script.

    python scripts/bench_comm_bytes.py [--steps 3] [--micro 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]

# collective -> position of the tensor whose bytes it sends (the input)
COLLECTIVES = {
    "all_gather_single": 1, "all_gather_into_tensor": 1, "all_gather": 1,
    "reduce_scatter_single": 1, "reduce_scatter_tensor": 1, "reduce_scatter": 1,
    "all_reduce": 0, "all_to_all_single": 1, "broadcast": 0,
}
_KW = {"all_gather_single": "input_tensor", "all_gather_into_tensor": "input_tensor",
       "reduce_scatter_single": "input", "reduce_scatter_tensor": "input",
       "all_to_all_single": "input", "all_reduce": "tensor", "broadcast": "tensor"}

# name -> overrides on top of the common ones
CASES = {
    "fsdp_fp32_every": ["trainer.precision=fp32", "parallel.fsdp_grad_sync=every"],
    "fsdp_fp32_last": ["trainer.precision=fp32", "parallel.fsdp_grad_sync=last"],
    "fsdp_bf16_every": ["trainer.precision=bf16", "parallel.fsdp_grad_sync=every"],
    "fsdp_bf16_last": ["trainer.precision=bf16", "parallel.fsdp_grad_sync=last"],
}


class CollectiveBytes:
    """Counts bytes per ``(collective, dtype)`` while ``active``; install with
    :meth:`patched` (wraps the ``torch.distributed`` functions by name)."""

    def __init__(self):
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.active = False

    def _wrap(self, name: str, fn):
        pos, kw = COLLECTIVES[name], _KW.get(name)

        def wrapped(*args, **kwargs):
            t = kwargs.get(kw) if kw in kwargs else (args[pos] if len(args) > pos else None)
            if self.active and isinstance(t, torch.Tensor):
                dtype = str(t.dtype).removeprefix("torch.")
                self.bytes[(name, dtype)] += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return wrapped

    @contextmanager
    def patched(self):
        saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        try:
            for n, fn in saved.items():
                setattr(dist, n, self._wrap(n, fn))
            yield self
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)


def measure_rank(rank: int, world: int, jobs: list, cache: str) -> dict:
    """On each rank of a spawn: train every ``(name, overrides, run_dir)`` job and return
    ``{name: {(collective, dtype): bytes per step}}`` counted inside train_step."""
    from tests.helpers import compose_config
    from trainer.train import Trainer, run

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MOEFOLD_CACHE=cache,
                      WANDB_SILENT="true", OMP_NUM_THREADS="1")
    counter, out = CollectiveBytes(), {}
    original = Trainer.train_step

    def counted(self):
        counter.active = True
        try:
            return original(self)
        finally:
            counter.active = False

    Trainer.train_step = counted
    try:
        with counter.patched():
            for name, overrides, run_dir in jobs:
                counter.bytes.clear()
                cfg = compose_config([*overrides, f"run_dir={run_dir}"])
                run(cfg)
                dist.barrier()
                out[name] = {k: v / cfg.trainer.max_steps for k, v in counter.bytes.items()}
    finally:
        Trainer.train_step = original
    return out


def common(steps: int, micro: int, seq_len: int) -> list[str]:
    """dp2 FSDP on the tiny MoE, ``micro`` micro-batches per rank per step."""
    return [f"trainer.max_steps={steps}", f"trainer.seq_len={seq_len}",
            "trainer.micro_batch_size=1", f"trainer.global_batch_size={2 * micro}",
            "trainer.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
            "logger.console=none", "logger.tensorboard=false", "logger.expert_load_every=0",
            "parallel.dp_engine=fsdp", "optim.warmup_steps=1"]


def main() -> None:
    sys.path.insert(0, str(REPO))
    from tests.distributed_utils import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per rank per step")
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, [*common(args.steps, args.micro, args.seq_len), *extra], f"{tmp}/{n}")
                for n, extra in CASES.items()]
        res = spawn(measure_rank, 2, jobs, f"{tmp}/cache", timeout_s=600)[0]
    kinds = sorted({k for r in res.values() for k in r})
    base = sum(res["fsdp_fp32_every"].values())
    print(f"rank 0, bytes per step (MB), dp2 FSDP, {args.micro} micro-batches/rank, "
          "tiny MoE (configs/model/moe_tiny.yaml)")
    head = [f"{c} {d}" for c, d in kinds]
    print("| case | " + " | ".join(head) + " | total | vs fp32/every |")
    print("|---" * (len(head) + 3) + "|")
    for n, r in res.items():
        total = sum(r.values())
        cells = [f"{r.get(k, 0) / 1e6:.3f}" for k in kinds]
        print(f"| {n} | " + " | ".join(cells) + f" | {total / 1e6:.3f} | {total / base:.2f} |")


if __name__ == "__main__":
    main()
