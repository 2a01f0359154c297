"""Per-rank peak RSS at start-up (after ``parallelize`` + the optimizer, before the first
step) for a ~1B-parameter MoE: 1 process vs 4 CPU gloo ranks under FSDP (dp4), EP4 (+FSDP
over edp) and TP2xDP2. Sharded initialisation (parallel/sharded_init.py) should make a
rank's peak approach 1/4 of the single process's weights.

    python scripts/bench_startup_memory.py [--hidden 1024 --layers 8 --experts 16 ...]

``--startup``: instead, the wall time of a tiny default run (``python -m trainer.train``,
moe_tiny, the builtin corpus, the default logger) from process start to its first step's
line, against ``python -c "import torch"``, interleaved ``--repeats`` times after one
untimed run that fills the caches; medians, and the slowest imports of one run
(``python -X importtime``).

    python scripts/bench_startup_memory.py --startup [--repeats 5] [override ...]

RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` in each rank (forked from a server that has
imported torch; ``base`` is that RSS before the model exists). The optimizer is built but
never stepped (AdamW allocates its moments at the first step). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from parallel.dims import ParallelDims  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402
from tests.distributed_utils import spawn  # noqa: E402
from tests.helpers import compose_config  # noqa: E402
from trainer.config import moe_layer_pattern  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

LAYOUTS = {"1 process": (1, []), "dp4 (FSDP)": (4, []),
           "ep4 (+FSDP edp)": (4, ["parallel.ep=4"]),
           "tp2xdp2 (FSDP)": (4, ["parallel.tp=2"])}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank(rank: int, world: int, model_overrides: list[str], layout: list[str]) -> dict:
    base = _rss_mib()
    cfg = compose_config([*model_overrides, *layout, "trainer.seq_len=64",
                          "trainer.micro_batch_size=1", "trainer.global_batch_size=8"])
    mc = OmegaConf.to_object(cfg.model)
    dims = ParallelDims.from_config(cfg.parallel, world, rank=rank)
    if world > 1:
        dims.build_meshes("cpu")
    pm = parallelize(mc, cfg.parallel, dims, device=torch.device("cpu"), seed=1234,
                     seq_len=64, num_micro=8 // dims.dp_size,
                     moe_pattern=moe_layer_pattern(cfg.model))
    build_optimizer(pm.model, cfg.optim)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                for p in pm.model.parameters())
    total = sum(p.numel() for p in pm.model.parameters())
    return {"base": base, "peak": _rss_mib(), "local": local, "global": total}


REPO = Path(__file__).resolve().parents[1]


def _wall_to(cmd: list[str], marker: str | None, env: dict) -> float:
    """Seconds from spawning ``cmd`` to the first stdout line starting with ``marker``
    (to its exit when None)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = None
    for line in proc.stdout:
        if seen is None and marker is not None and line.startswith(marker):
            seen = time.perf_counter() - t0
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with code {proc.returncode}")
    return seen if seen is not None else time.perf_counter() - t0


def startup(repeats: int, overrides: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as d:
        def train_cmd(i: int, *pre: str) -> list[str]:
            return [sys.executable, *pre, "-m", "trainer.train", f"run_dir={d}/run{i}",
                    "trainer.max_steps=2", "logger.console=plain", "checkpoint.save_final=false",
                    "trainer.eval_every=0", *overrides]

        _wall_to(train_cmd(-1), None, env)  # corpus, tokenizer, sample cache
        torch_s, run_s = [], []
        for i in range(repeats):
            torch_s.append(_wall_to([sys.executable, "-c", "import torch"], None, env))
            run_s.append(_wall_to(train_cmd(i), "step 1/", env))
            print(f"repeat {i}: import torch {torch_s[-1]:.2f} s, first step line "
                  f"{run_s[-1]:.2f} s, difference {run_s[-1] - torch_s[-1]:.2f} s", flush=True)
        print(f"median: import torch {statistics.median(torch_s):.2f} s, first step line "
              f"{statistics.median(run_s):.2f} s, median difference "
              f"{statistics.median(b - a for a, b in zip(torch_s, run_s)):.2f} s")
        out = subprocess.run(train_cmd(99, "-X", "importtime"), cwd=REPO, env=env,
                             capture_output=True, text=True)
    rows = []
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = line.split("|")
            if cum.strip().isdigit():
                rows.append((int(cum), name.rstrip()))
    print("slowest imports (cumulative, one run):")
    for cum, name in sorted(rows, reverse=True)[:12]:
        print(f"  {cum / 1e6:6.2f} s {name}")


def main() -> None:
    if "--startup" in sys.argv:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--startup", action="store_true")
        ap.add_argument("--repeats", type=int, default=5)
        ap.add_argument("overrides", nargs="*")
        args = ap.parse_args()
        startup(args.repeats, args.overrides)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-ffn", type=int, default=2304)
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = ap.parse_args()
    model = ["model=moe_tiny", f"model.hidden_size={args.hidden}",
             f"model.num_layers={args.layers}", "model.num_heads=16", "model.num_kv_heads=4",
             f"model.ffn_hidden_size={4 * args.hidden}", f"model.moe.num_experts={args.experts}",
             f"model.moe.expert_ffn_hidden_size={args.expert_ffn}",
             f"model.moe.shared_expert_ffn_hidden_size={args.expert_ffn}"]
    rows, single = [], None
    for name in args.layouts:
        world, layout = LAYOUTS[name]
        res = spawn(_rank, world, model, layout, timeout_s=1800)
        peak = max(r["peak"] for r in res)
        base = max(r["base"] for r in res)
        if world == 1:
            single = res[0]
        rows.append((name, world, res[0]["global"], max(r["local"] for r in res), base, peak))
    print("| layout | ranks | params (global) | params / rank (max) | base RSS MiB | "
          "peak RSS MiB / rank (max) | 1-process peak / rank peak | same, above base |")
    print("|---|---|---|---|---|---|---|---|")
    for name, world, g, loc, base, peak in rows:
        ratio = single["peak"] / peak if single else float("nan")
        above = ((single["peak"] - single["base"]) / (peak - base)) if single else float("nan")
        print(f"| {name} | {world} | {g / 1e9:.3f} B | {loc / 1e9:.3f} B | {base:.0f} | "
              f"{peak:.0f} | {ratio:.2f}x | {above:.2f}x |")


if __name__ == "__main__":
    main()
