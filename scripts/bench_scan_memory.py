"""Peak memory and time of a stack of ``--layers`` Mamba mixers, forward+backward, on CPU with the reference
scan's fp32 intermediates kept for backward (``recompute=False``, the old behaviour) or
recomputed in backward (``recompute=True``, the default).

Each variant runs in its own fresh process (peak RSS cannot be reset), the variants
interleaved ``--repeats`` times; reported: median peak RSS growth over the process's RSS
before the forward, median fwd+bwd seconds (second of two iterations), their ratios.

    python scripts/bench_scan_memory.py [--hidden 256] [--seq-len 2048] [--batch 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(hidden: int, T: int, B: int, L: int, recompute: bool) -> dict:
    import functools
    import resource
    import time

    import torch

    import models.mamba as mamba
    from models.build import build_model
    from models.config import ModelConfig
    from models.modality import ModalityRoute

    torch.manual_seed(0)
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=hidden, num_layers=L,
                      num_heads=4, num_kv_heads=4, ffn_hidden_size=2 * hidden, max_seq_len=T)
    cfg.mot.modalities = ["text", "image"]
    mixers = [block.mixer for block in build_model(cfg).layers.values()]
    mamba.selective_scan = functools.partial(mamba.selective_scan, recompute=recompute)
    route = ModalityRoute.build(torch.randint(0, 2, (B, T)), 2)
    x = torch.randn(B, T, hidden, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        start = time.perf_counter()
        y = x
        for m in mixers:  # residual stack: every layer's saved tensors live until backward
            y = y + m(y, route)
        y.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - before) / 1024, "s": times[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.hidden, a.seq_len, a.batch, a.layers, a.child == "recompute")))
        return
    res: dict[str, list[dict]] = {"keep": [], "recompute": []}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(a.repeats):
        for name in res:
            out = subprocess.run([sys.executable, __file__, "--child", name,
                                  "--hidden", str(a.hidden), "--seq-len", str(a.seq_len),
                                  "--batch", str(a.batch), "--layers", str(a.layers)],
                                 cwd=REPO, env=env,
                                 capture_output=True, text=True, check=True)
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "s")}
           for n, rs in res.items()}
    print(f"{a.layers} Mamba mixers fwd+bwd, hidden {a.hidden} (d_inner {2 * a.hidden}), T {a.seq_len}, "
          f"B {a.batch}, CPU 1 thread, median of {a.repeats} interleaved processes")
    print("| scan intermediates | peak RSS growth (MiB) | fwd+bwd (s) |")
    print("|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['peak_mib']:.0f} | {m['s']:.2f} |")
    k, r = med["keep"], med["recompute"]
    print(f"recompute/keep: memory {r['peak_mib'] / k['peak_mib']:.2f}, time {r['s'] / k['s']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
