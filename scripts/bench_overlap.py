"""Communication/compute overlap (issue 19): step time and profiled overlap, on vs off.

Runs ``--world`` gloo ranks on CPU, each a small MoE transformer with expert parallelism
over all ranks (EP = world, shared experts) and the ``ddp`` engine over the dense group,
``--micro`` accumulated micro-batches per step. Steps alternate between overlap on
(``parallel.overlap=true``: ddp buckets all-reduced during the last backward, shared
experts computed while the EP all-to-all is in flight) and off (the same model and data:
reductions after backward, shared experts after the exchange), so machine contention hits
both alike; the median step time of each and their ratio are printed. ``--parts
two_batch`` compares the two-batch overlap (parallel.two_batch_overlap: micro-batch pairs
interleaved at the all-to-all) against the plain loop, both with every other overlap on.

Then ``--profile-steps`` steps of each are recorded with torch.profiler (chrome traces of
the last ones written to ``--trace-dir``). gloo runs every collective on its own thread, so the trace shows it
beside the main thread's operators: the script prints, for rank 0 (medians), the time
collectives were in flight (union of ``gloo:*`` events: from launch to completion, so a
collective launched early and waiting for its peer counts), the part of it during which
the main thread was computing (intersection with the union of its ``aten::*``
operators), and the main thread's idle time (blocked in a wait).

    OMP_NUM_THREADS=1 python scripts/bench_overlap.py [--world 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv) -> float:
    return sum(b - a for a, b in iv)


def _intersect(x, y) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def trace_overlap(path: Path) -> dict[str, float]:
    """Milliseconds: step (the ``step`` span), comm (gloo threads busy), overlapped (comm
    while the main thread ran an operator), idle (main thread ran no operator)."""
    ev = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    step = next(e for e in ev if e["name"] == "step")
    main, t0, t1 = step["tid"], step["ts"], step["ts"] + step["dur"]
    inside = [e for e in ev if t0 <= e["ts"] <= t1]
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in inside
                   if e["name"].startswith("gloo:")])
    compute = _union([(e["ts"], min(t1, e["ts"] + e["dur"])) for e in inside
                      if e["tid"] == main and e["name"].startswith("aten::")])
    ms = 1e-3
    return {"step": step["dur"] * ms, "comm": _length(comm) * ms,
            "overlapped": _intersect(comm, compute) * ms,
            "idle": (step["dur"] - _length(compute)) * ms}


def _worker(rank: int, world: int, args) -> dict:
    from types import SimpleNamespace

    import torch.distributed as dist
    import torch.nn.functional as F

    from models.build import build_model
    from models.config import ModelConfig, MoEConfig
    from models.steps import call_steps, interleave
    from parallel.data_parallel import DataParallel
    from parallel.dims import ParallelDims
    from parallel.dispatch import set_dispatch_overlap
    from parallel.expert_parallel import apply_expert_parallel

    torch.set_num_threads(1)
    if args.allocator == "tuned":  # as the trainer runs on CPU (trainer/perf.py)
        from trainer.perf import reuse_freed_cpu_memory

        reuse_freed_cpu_memory()
    dims = ParallelDims.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=world, etp=1), world)
    dims.build_meshes("cpu")
    D = args.hidden
    moe = MoEConfig(num_experts=4 * world, top_k=2, expert_ffn_hidden_size=D,
                    num_shared_experts=1, shared_expert_ffn_hidden_size=2 * D)
    cfg = ModelConfig(vocab_size=1024, hidden_size=D, num_layers=args.layers, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=4 * D, max_seq_len=args.seq, moe=moe)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    apply_expert_parallel(model, dims)
    dp_on = DataParallel(model, dims, "ddp", overlap=True, bucket_mb=args.bucket_mb)
    dp_off = DataParallel(model, dims, "ddp", overlap=False)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 1024, (args.batch, args.seq + 1), generator=gen)
               for _ in range(args.micro)]

    def loss(logits, b):
        return F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())

    two_batch = args.parts == "two_batch"  # on = off + pairs interleaved

    def step(on: bool) -> float:
        set_dispatch_overlap(model, two_batch or (on and args.parts in ("both", "shared")))
        dp = dp_on if two_batch or (on and args.parts in ("both", "ddp")) else dp_off
        dist.barrier()
        t = time.perf_counter()
        with torch.profiler.record_function("step"):
            if on and two_batch:  # what parallel/runner.py TwoBatchLoop does
                for i in range(0, len(batches), 2):
                    pair = batches[i:i + 2]
                    dp.prepare_backward(last=i + len(pair) == len(batches))
                    outs = interleave([call_steps(model, b[:, :-1]) for b in pair])
                    sum(loss(o, b) for o, b in zip(outs, pair)).backward()
            else:
                for i, b in enumerate(batches):
                    dp.prepare_backward(last=i == len(batches) - 1)
                    loss(model(b[:, :-1]), b).backward()
            dp.reduce_gradients()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for i in range(args.steps):  # interleaved, alternating which goes first
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            times[on].append(step(on))
    from torch.profiler import ProfilerActivity, profile
    traces: dict[bool, list[dict]] = {True: [], False: []}
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own warm-up
        step(True)
    for _ in range(args.profile_steps):  # interleaved too; the medians are reported
        for on in (True, False):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(on)
            path = Path(args.trace_dir) / f"overlap_{'on' if on else 'off'}_rank{rank}.json"
            prof.export_chrome_trace(str(path))  # the last one of each is kept
            traces[on].append(trace_overlap(path) | {"trace": str(path)})
    med = {on: {k: statistics.median(t[k] for t in v) for k in v[0] if k != "trace"}
           | {"trace": v[-1]["trace"]} for on, v in traces.items()}
    return {"on": times[True], "off": times[False], "trace_on": med[True],
            "trace_off": med[False]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each (interleaved)")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--parts", choices=("both", "ddp", "shared", "two_batch"),
                    default="both",
                    help="what 'on' turns on: both overlaps, only the ddp buckets, or only "
                         "the shared experts during the all-to-all; two_batch: both are on "
                         "in on and off, and on also interleaves micro-batch pairs "
                         "(parallel.two_batch_overlap)")
    ap.add_argument("--allocator", choices=("tuned", "glibc"), default="tuned",
                    help="tuned: glibc keeps freed blocks, as the trainer sets it on CPU")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps of each")
    ap.add_argument("--trace-dir", default="/tmp/moefold_overlap")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    from tests.distributed_utils import spawn

    res = spawn(_worker, args.world, args, timeout_s=600)
    print(f"world={args.world} (EP={args.world}, ddp over dp={args.world}), hidden="
          f"{args.hidden}, layers={args.layers}, overlap on = {args.parts}, {args.micro} "
          "micro-batches of "
          f"{args.batch}x{args.seq} tokens, bucket {args.bucket_mb} MiB, os.cpu_count()="
          f"{os.cpu_count()}, allocator {args.allocator}, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'rank':>4} {'on ms (median)':>15} {'off ms (median)':>16} {'off/on':>7} "
          f"{'median pair off/on':>19}  (pair: the two adjacent steps)")
    for r, x in enumerate(res):
        on, off = statistics.median(x["on"]) * 1e3, statistics.median(x["off"]) * 1e3
        pair = statistics.median(b / a for a, b in zip(x["on"], x["off"]))
        print(f"{r:>4} {on:>15.1f} {off:>16.1f} {off / on:>7.3f} {pair:>19.3f}")
    print(f"profiled steps, rank 0, median of {args.profile_steps} (ms): step; collectives "
          "in flight (gloo thread, from launch to completion, including waiting for the "
          "peer); of which overlapped with main-thread operators; main-thread idle")
    for key in ("trace_on", "trace_off"):
        t = res[0][key]
        print(f"  overlap {key[6:]:<3}: step {t['step']:.1f}, comm {t['comm']:.1f}, "
              f"overlapped {t['overlapped']:.1f} ({t['overlapped'] / max(t['comm'], 1e-9):.0%}"
              f"), idle {t['idle']:.1f}   trace {t['trace']}")


if __name__ == "__main__":
    main()
