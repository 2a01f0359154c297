"""Peak memory per rank for long sequences under context parallelism, CP1 vs CP2 vs CP4.

Runs the trainer CLI (gloo on CPU, or NCCL on GPUs) on the tiny MoE model at a long
sequence (default 8192 tokens, one sequence per rank per micro-batch) and prints the peak
memory each layout reports (CPU: the process's max RSS, which includes ~0.4 GiB of
interpreter and torch; CUDA: peak allocated), the step time and the final loss, which must
agree across layouts. Usage::

    python scripts/bench_cp_memory.py [--seq-len 8192] [--steps 3] [--cp 1 2 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_layouts import train_cli  # noqa: E402


def run(cp: int, seq_len: int, steps: int, out: Path) -> dict:
    overrides = [
        f"trainer.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
        f"trainer.max_steps={steps}", "trainer.log_every=1", f"parallel.cp={cp}",
    ]
    last = train_cli(f"cp={cp}", cp, overrides, out)[-1]
    return {"loss": last["loss"], "mem": last["peak_mem_gib"],
            "tok_s": last.get("tokens_per_s", float("nan"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cp:
            rows.append((cp, run(cp, args.seq_len, args.steps, Path(tmp) / f"cp{cp}")))
    base = rows[0][1]["mem"]
    print(f"seq {args.seq_len}, moe_tiny, peak memory of rank 0 (CPU: max RSS)")
    print("| layout | peak memory GiB | vs CP1 | tokens/s | final loss |")
    print("|---|---|---|---|---|")
    for cp, r in rows:
        print(f"| CP{cp} | {r['mem']:.2f} | {r['mem'] / base:.2f} | {r['tok_s']:,.0f} | "
              f"{r['loss']:.4f} |")


if __name__ == "__main__":
    main()
