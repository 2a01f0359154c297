"""``parallel.compile=true`` vs eager, one process: first-step time (compilation) and
steady-state step time.

Two Trainers with the same config except ``parallel.compile`` (same seed: same weights and
batches) step in lockstep (eager, compiled, eager, compiled, ...) so that a busy machine
slows both alike. The first step of each is reported on its own (it holds the
compilation); the ratio is over the median of the steps after it. The losses of the two
are printed side by side (compile must not change them beyond rounding).

    python scripts/bench_compile.py [--steps 8] [--backend inductor] [override ...]
    python scripts/bench_compile.py --model-200m   # ~200M-parameter MoE, seq 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_trainer_overhead import build_trainer  # noqa: E402

# ~200M parameters (8 layers, hidden 768, 8 experts top-2 of width 1024, one shared)
MODEL_200M = ["model.hidden_size=768", "model.num_layers=8", "model.num_heads=12",
              "model.num_kv_heads=4", "model.ffn_hidden_size=3072",
              "model.moe.expert_ffn_hidden_size=1024",
              "model.moe.shared_expert_ffn_hidden_size=1024", "trainer.seq_len=256",
              "trainer.micro_batch_size=1", "trainer.global_batch_size=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--model-200m", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = ["logger.console=none", "logger.tensorboard=false", "trainer.eval_every=0",
              "logger.expert_load_every=0", *(MODEL_200M if args.model_200m else []),
              *args.overrides]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        eager = build_trainer(common, d1, args.steps)
        comp = build_trainer([*common, "parallel.compile=true",
                         f"parallel.compile_backend={args.backend}"], d2, args.steps)
        n = sum(p.numel() for p in eager.model.parameters())
        print(f"{n / 1e6:.1f}M parameters; backend {args.backend}; "
              f"{' '.join(common)}", flush=True)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for step in range(args.steps):
            for name, tr in (("eager", eager), ("compiled", comp)):
                t0 = time.perf_counter()
                m = tr.train_step()
                times[name].append(time.perf_counter() - t0)
                print(f"step {step + 1} {name}: {times[name][-1]:.3f} s, loss "
                      f"{float(m['objective']):.6f}", flush=True)
    e, c = statistics.median(times["eager"][1:]), statistics.median(times["compiled"][1:])
    print(f"first step: eager {times['eager'][0]:.2f} s, compiled {times['compiled'][0]:.2f} s "
          f"(compilation ~{times['compiled'][0] - times['eager'][0]:.1f} s)")
    print(f"steps 2..{args.steps} (median): eager {e * 1e3:.1f} ms, compiled {c * 1e3:.1f} ms, "
          f"speed-up {e / c:.2f}x")


if __name__ == "__main__":
    main()
