"""Tokens/s of the reference selective scan (models/mamba.py: chunked, log-depth inside
each chunk) against the step-by-step recurrence (a Python loop over time steps), on CPU,
forward and forward+backward, at the given sequence lengths. Both compute the same
outputs (checked here too); the ratio is what the chunked form buys.

    python -m scripts.bench_scan --seq 1024 4096 --batch 4 --d-inner 128 --d-state 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from models.mamba import selective_scan, selective_scan_naive
from trainer.perf import reuse_freed_cpu_memory


def _inputs(B: int, T: int, Dn: int, N: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, T, Dn, generator=g)
    delta = F.softplus(torch.randn(B, T, Dn, generator=g) - 2)
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(Dn, N).contiguous()
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    D = torch.ones(Dn)
    args = [u, delta, A, Bm, Cm, D]
    return [a.requires_grad_(grad) for a in args]


def _time(fn, args, backward: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for a in args:
            a.grad = None
        t0 = time.perf_counter()
        y = fn(*args)
        if backward:
            y.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-inner", type=int, default=128)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--chunk", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_cpu_memory()  # as the trainer does on CPU (trainer/perf.py)
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, "
          f"{args.threads} threads; tokens/s (median of {args.repeats})")
    print("| seq | pass | naive recurrence | " + " | ".join(
        f"chunked (chunk {c})" for c in args.chunk) + " | best speed-up |")
    print("|---|---|---|" + "---|" * len(args.chunk) + "---|")
    for T in args.seq:
        for backward in (False, True):
            x = _inputs(args.batch, T, args.d_inner, args.d_state, backward)
            with torch.set_grad_enabled(backward):
                ref = selective_scan_naive(*x)
                for c in args.chunk:
                    torch.testing.assert_close(selective_scan(*x, chunk=c), ref, rtol=1e-4,
                                               atol=1e-4)
                tokens = args.batch * T
                naive = tokens / _time(selective_scan_naive, x, backward, args.repeats)
                chunked = [tokens / _time(lambda *a, c=c: selective_scan(*a, chunk=c), x,
                                          backward, args.repeats) for c in args.chunk]
            cells = " | ".join(f"{v:,.0f}" for v in chunked)
            print(f"| {T} | {'fwd+bwd' if backward else 'fwd'} | {naive:,.0f} | {cells} | "
                  f"{max(chunked) / naive:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
