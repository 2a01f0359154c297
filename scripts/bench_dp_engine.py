"""DP engine and CPU allocator on 2 gloo ranks: step time and peak RSS of ddp vs fsdp,
each with the glibc tuning on (what every CPU run did before ``trainer.reuse_cpu_memory``)
and off, plus ``dp_engine=auto`` with the default allocator rule; ``--configs "fsdp,
prefetch 0" "fsdp, prefetch 1" ...``: FSDP2's explicit prefetch depth instead.

Each configuration trains the same model, seed and global batch through the CLI
(launch/torchrun.sh, ``--threads`` OMP threads per rank); repeats are interleaved
(config A, B, C, ..., A, B, C, ...) so a busy machine slows all alike. Reports the median
over repeats of each run's median step time after ``--warmup`` and of rank 0's peak RSS
(``ru_maxrss``, metrics.jsonl ``peak_mem_gib``).

    python scripts/bench_dp_engine.py [--repeats 3 --steps 20] [override ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_layouts import train_cli  # noqa: E402

CONFIGS = {
    "ddp, allocator tuned": ["parallel.dp_engine=ddp", "trainer.reuse_cpu_memory=on"],
    "ddp, glibc default": ["parallel.dp_engine=ddp", "trainer.reuse_cpu_memory=off"],
    "fsdp, allocator tuned": ["parallel.dp_engine=fsdp", "trainer.reuse_cpu_memory=on"],
    "fsdp, glibc default": ["parallel.dp_engine=fsdp", "trainer.reuse_cpu_memory=off"],
    "auto (rule)": ["parallel.dp_engine=auto", "trainer.reuse_cpu_memory=auto"],
    # FSDP2 explicit prefetch depth (blocks ahead); pick them with --configs
    "fsdp, prefetch 0": ["parallel.dp_engine=fsdp", "parallel.fsdp_prefetch=0"],
    "fsdp, prefetch 1": ["parallel.dp_engine=fsdp", "parallel.fsdp_prefetch=1"],
    "fsdp, prefetch 2": ["parallel.dp_engine=fsdp", "parallel.fsdp_prefetch=2"],
}
DEFAULT = list(CONFIGS)[:5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=DEFAULT, choices=list(CONFIGS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    times: dict[str, list[float]] = {c: [] for c in args.configs}
    rss: dict[str, list[float]] = {c: [] for c in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for c in args.configs:
                recs = train_cli(c, 2, [f"trainer.max_steps={args.steps}", *args.overrides,
                                        *CONFIGS[c]], Path(tmp) / f"{r}_{len(times[c])}_{hash(c)}",
                                 args.threads)
                times[c].append(statistics.median(
                    x["step_time_s_raw"] for x in recs if x["step"] > args.warmup))
                rss[c].append(recs[-1]["peak_mem_gib"])
                print(f"repeat {r} {c}: {times[c][-1] * 1e3:.1f} ms/step, peak RSS rank 0 "
                      f"{rss[c][-1]:.3f} GiB", flush=True)
    base = statistics.median(times[args.configs[0]])
    print(f"overrides: {' '.join(args.overrides) or '(moe_tiny defaults)'}")
    print("| config | step ms (median) | vs first | peak RSS GiB rank 0 (median) |")
    print("|---|---|---|---|")
    for c in args.configs:
        t = statistics.median(times[c])
        print(f"| {c} | {t * 1e3:.1f} | {t / base:.2f}x | {statistics.median(rss[c]):.3f} |")


if __name__ == "__main__":
    main()
