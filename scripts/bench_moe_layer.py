"""One MoE layer, fwd+bwd: our MoELayer (LocalDispatcher) against its peers.

Peers, all with the same router weights, expert weights and inputs (outputs are checked
equal before timing):
- ``hf_eager``: transformers' ``MixtralSparseMoeBlock``, default (eager) experts;
- ``hf_gmm``: the same block with ``config._experts_implementation = "grouped_mm"``;
- ``tt``: torchtitan's local path (argsort reorder, ``GroupedExperts`` with three
  ``torch._grouped_mm`` on ``[E, F, D]`` weights transposed, score-weighted scatter-add
  combine), re-written here because ``torchtitan.models.common.moe`` imports the
  CUDA/SPMD-only ``spmd_types``; in fp32 its bf16 casts are left out ("fp32" row), under
  autocast the operands go to bf16 as torchtitan does;
- ``ours_loop``: our layer with ``grouped_mm_impl="loop"`` (the fallback where
  ``torch._grouped_mm`` is unavailable);
- ``mm``: the same GEMM FLOPs as plain ``torch.mm`` (one dense SwiGLU over all T*k rows,
  fwd+bwd), the ceiling a grouped GEMM can reach on this device.

Every repeat times each contender once on a fresh batch (the same batches for all), in
a rotating order, so a busy neighbour slows them all alike (``--same-batch`` repeats one
batch: the expert counts, hence the grouped GEMMs' shapes, then never change); in bf16
each contender runs alone in a fresh process (``--one-process``: all in this one). The
table shows the median time per contender and ratios of medians (ratio = our tokens/s /
peer's tokens/s). The clock is the main thread's CPU time
(``--clock cpu``, the default: torch runs one thread here, and time the OS gives to other
processes does not count), or wall time (``--clock wall``, for a quiet machine). Also printed: aten ops per fwd+bwd (a
TorchDispatchMode counter) and host-sync-prone calls per fwd+bwd (a TorchFunctionMode
counter: item / tolist / bool / int of a tensor, nonzero, bincount, boolean-mask
indexing, ...).

    python scripts/bench_moe_layer.py            # full shapes, ~15 min of one core
    python scripts/bench_moe_layer.py --quick    # fewer tokens at the large shapes, ~3 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import ModelConfig, MoEConfig  # noqa: E402
from models.moe import MoELayer  # noqa: E402

# (T, D, F, E, k): the three shapes, plus E=64/k=8 at the two smaller ones.
SHAPES = [
    (256, 64, 64, 8, 2),
    (2048, 256, 512, 8, 2),
    (4096, 512, 1024, 64, 8),
    (256, 64, 64, 64, 8),
    (2048, 256, 512, 64, 8),
]

_SYNC_METHODS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "cpu",
    "numpy",
    "bincount",
    "unique",
    "unique_consecutive",
    "masked_select",
    "repeat_interleave",
    "argwhere",
    "nonzero_static",
}


class SyncCounter(TorchFunctionMode):
    """Counts calls that make the host wait for the device's values: reading a value
    (item, tolist, bool/int/float of a tensor, .cpu()), data-dependent output sizes
    (nonzero, unique, masked_select, one-argument where, boolean-mask indexing) and
    bincount (CUDA reads its max to size the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_METHODS and name != "repeat_interleave":
            self.calls[name] += 1
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            # tensor repeats (x.repeat_interleave(r) or the one-argument form): the
            # output size is their sum, read back; int repeats are not
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
            if isinstance(repeats, torch.Tensor):
                self.calls[name] += 1
        elif name == "where" and len(args) == 1 and not kwargs:
            self.calls["where(cond)"] += 1
        elif name in ("__getitem__", "__setitem__") and _has_bool_index(args[1]):
            self.calls[f"{name}[bool mask]"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class OpCounter(TorchDispatchMode):
    """Counts aten ops (the kernels a fwd+bwd launches, views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_fwd_bwd(fn: Callable[[], torch.Tensor], x: torch.Tensor) -> tuple[OpCounter, SyncCounter]:
    """aten ops and sync-prone calls of one ``fn().backward(...)`` (autograd included)."""
    ops, syncs = OpCounter(), SyncCounter()
    with syncs, ops:
        y = fn()
        y.backward(torch.ones_like(y))
    return ops, syncs


# ---------------------------------------------------------------- contenders


def make_ours(D: int, F_: int, E: int, k: int, impl: str = "auto") -> MoELayer:
    cfg = ModelConfig(
        hidden_size=D, moe=MoEConfig(num_experts=E, top_k=k, expert_ffn_hidden_size=F_)
    )
    layer = MoELayer(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, D, generator=gen) * D**-0.5)
        ex = layer.experts
        for w, fan_in in ((ex.w1, D), (ex.w3, D), (ex.w2, F_)):
            w.copy_(torch.randn(w.shape, generator=gen) * fan_in**-0.5)
    layer.experts.grouped_mm_impl = impl
    return layer


def make_hf(ours: MoELayer, impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    ex = ours.experts
    E, D, F_ = ex.w1.shape
    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=F_,
        num_local_experts=E,
        num_experts_per_tok=ours.moe.top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl  # "eager" | "grouped_mm"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w1, ex.w3], 2).transpose(1, 2))
        block.experts.down_proj.copy_(ex.w2.transpose(1, 2))
    return block


class TorchtitanLocal(torch.nn.Module):
    """torchtitan's EP=1 MoE path (router softmax -> top-k, argsort reorder, GroupedExperts
    on [E, F, D] weights, scores applied in combine, scatter-add), see the module doc."""

    def __init__(self, ours: MoELayer):
        super().__init__()
        ex = ours.experts
        self.k = ours.moe.top_k
        self.gate = torch.nn.Parameter(ours.router.weight.detach().clone())
        self.w1_EFD = torch.nn.Parameter(ex.w1.detach().transpose(1, 2).contiguous())
        self.w3_EFD = torch.nn.Parameter(ex.w3.detach().transpose(1, 2).contiguous())
        self.w2_EDF = torch.nn.Parameter(ex.w2.detach().transpose(1, 2).contiguous())

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.reshape(-1, x_BTD.shape[-1])
        E = self.gate.shape[0]
        probs = F.linear(x, self.gate).float().softmax(-1)
        top, idx = probs.topk(self.k, -1)
        top = top / top.sum(-1, keepdim=True)
        counts = torch.zeros(x.shape[0], E, dtype=torch.bool, device=x.device)
        counts = counts.scatter_(1, idx, True).sum(0)
        order = torch.argsort(idx.view(-1), stable=True)
        scores = top.view(-1)[order]
        tok = order // self.k
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype

        def gmm(a, w):
            return torch._grouped_mm(a.to(cast), w.to(cast).transpose(-2, -1), offs=offs)

        xr = x[tok]
        h = F.silu(gmm(xr, self.w1_EFD)) * gmm(xr, self.w3_EFD)
        y = gmm(h, self.w2_EDF).type_as(x)
        y = (y.float() * scores.unsqueeze(1)).to(y.dtype)
        out = torch.zeros_like(x).scatter_add(0, tok.unsqueeze(1).expand(-1, x.shape[1]), y)
        return out.view_as(x_BTD)


class DenseMM(torch.nn.Module):
    """The experts' GEMM FLOPs as plain torch.mm: one SwiGLU over all T*k rows."""

    def __init__(self, ours: MoELayer):
        super().__init__()
        ex = ours.experts
        self.k = ours.moe.top_k
        self.w1 = torch.nn.Parameter(ex.w1[0].detach().clone())
        self.w3 = torch.nn.Parameter(ex.w3[0].detach().clone())
        self.w2 = torch.nn.Parameter(ex.w2[0].detach().clone())

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.reshape(-1, x_BTD.shape[-1]).repeat(self.k, 1).detach().requires_grad_()
        return (F.silu(x @ self.w1) * (x @ self.w3)) @ self.w2


# ---------------------------------------------------------------- timing


def run_shape(
    shape,
    bf16: bool,
    repeats: int,
    with_loop: bool,
    clock: Callable[[], float] = time.thread_time,
    with_hf_eager: bool = True,
    same_batch: bool = False,
    isolate: list[str] | None = None,
    only: str | None = None,
) -> dict[str, float]:
    """``isolate``: the command line that times one contender alone in a fresh process
    (``--time-one NAME`` is appended; it prints that contender's median); ``only``: time
    just this contender here and return ``{"median": seconds}``."""
    T, D, F_, E, k = shape
    torch.manual_seed(1)
    # A fresh batch per repeat (every contender gets the same ones), as in training: the
    # expert counts change every step, and so do the segment GEMMs' shapes (which CPU
    # bf16 pays for: models/grouped_gemm.py ROW_ALIGN). --same-batch repeats one batch.
    warmup = 3 if bf16 else 1
    xs = [torch.randn(1, T, D, requires_grad=True)
          for _ in range(1 if same_batch else warmup + repeats)]
    x = xs[0]
    ours = make_ours(D, F_, E, k)
    models: dict[str, torch.nn.Module] = {
        "ours": ours,
        "hf_gmm": make_hf(ours, "grouped_mm"),
        "tt": TorchtitanLocal(ours),
        "mm": DenseMM(ours),
    }
    if with_hf_eager:
        models["hf_eager"] = make_hf(ours, "eager")
    if with_loop:
        models["ours_loop"] = make_ours(D, F_, E, k, impl="loop")

    def step(name: str, i: int = 0) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return models[name](xs[i % len(xs)])

        return fn

    names = [only] if only else list(models)
    if only:
        return {"median": _time(models, names, step, xs, warmup, repeats, clock)[only]}
    # Same function: fp32 outputs agree. (Under autocast the peers' routers run in bf16,
    # ours in fp32, so a few tokens pick other experts: same FLOPs, other values.)
    with torch.no_grad():
        ref = step("ours")()
        for name in ("hf_eager", "hf_gmm", "tt", "ours_loop"):
            if name in models and (not bf16 or name == "ours_loop"):
                err = (step(name)().float() - ref.float()).abs().max().item()
                if err > (5e-2 if bf16 else 1e-3) * ref.abs().max().item():
                    print(f"  warning: {name} differs from ours by {err:.2e}")

    if isolate:
        med = {}
        for name in names:
            run = subprocess.run([*isolate, "--time-one", name], capture_output=True,
                                 text=True, check=True)
            med[name] = json.loads(run.stdout.strip().splitlines()[-1])["median"]
    else:
        med = _time(models, names, step, xs, warmup, repeats, clock)
    counts = {n: count_fwd_bwd(step(n), x) for n in ("ours", "hf_eager", "hf_gmm") if n in models}
    gemm_flops = 3 * 3 * 2 * T * k * D * F_  # 3 GEMMs, fwd + 2x bwd
    out = {
        "tok_s": T / med["ours"],
        "gflops": gemm_flops / med["ours"] / 1e9,
        "mm_gflops": gemm_flops / med["mm"] / 1e9,
    }
    for n in names:
        out[f"t_{n}"] = med[n]
    for n, (ops, syncs) in counts.items():
        out[f"ops_{n}"] = ops.total
        out[f"sync_{n}"] = syncs.total
    return out


def _time(models, names, step, xs, warmup, repeats, clock) -> dict[str, float]:
    """Median fwd+bwd seconds per contender: ``warmup`` rounds, then ``repeats`` rounds in
    a rotating order, round i on batch i."""
    def timed(name: str, i: int) -> float:
        for p in models[name].parameters():
            p.grad = None
        for b in xs:
            b.grad = None
        t0 = clock()
        y = step(name, i)()
        y.backward(torch.ones_like(y))
        return clock() - t0

    for i in range(warmup):
        for name in names:
            timed(name, i)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        rot = names[r % len(names) :] + names[: r % len(names)]
        for name in rot:
            times[name].append(timed(name, warmup + r))
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="T halved until T*k*D*F <= 2**29 (the E=64 shape at 128 tokens), "
        "3 repeats, no HF eager at E=64",
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--no-loop", action="store_true", help="skip the loop fallback")
    ap.add_argument("--no-hf-eager", action="store_true", help="skip HF eager (slow at E=64)")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (robust to busy neighbours); wall",
    )
    ap.add_argument(
        "--shapes", default=None, help="indices into the shape list, e.g. 0,2 (default: all)"
    )
    ap.add_argument(
        "--allocator",
        choices=["tuned", "glibc"],
        default="tuned",
        help="tuned: glibc keeps freed blocks (trainer/perf.py reuse_freed_cpu_memory, as a "
        "one-process CPU run of the trainer does); glibc: its defaults, under which 16-32 "
        "MiB activations are unmapped and page-faulted back every step, a cost that "
        "depends on the allocation history more than on the kernels",
    )
    ap.add_argument(
        "--same-batch",
        action="store_true",
        help="time one batch over and over (the expert counts never change) instead of a "
        "fresh batch per repeat",
    )
    ap.add_argument(
        "--one-process",
        action="store_true",
        help="bf16: time all contenders in this process (by default each runs alone in a "
        "fresh process: oneDNN's kernel cache is process-wide, so one contender's segment "
        "shapes evict another's)",
    )
    ap.add_argument("--time-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)  # T,D,F,E,k
    args = ap.parse_args()
    if args.allocator == "tuned":
        from trainer.perf import reuse_freed_cpu_memory

        reuse_freed_cpu_memory()
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 7)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    if args.time_one:  # a child of an isolated run: one contender, one shape, one dtype
        name, shape = args.time_one, tuple(int(v) for v in args.shape.split(","))
        r = run_shape(shape, dtypes == ["bf16"], repeats, name == "ours_loop", clock,
                      name == "hf_eager", args.same_batch, only=name)
        print(json.dumps(r))
        return
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, {repeats} interleaved "
        f"repeats, medians, allocator {args.allocator}, "
        f"{'one batch' if args.same_batch else 'a fresh batch per repeat'}; "
        "ratio = our tokens/s / peer's"
        + ("" if args.one_process or args.same_batch else
           "; bf16: each contender alone in a fresh process")
    )
    hdr = (
        f"{'shape (T,D,F,E,k)':<26}{'dtype':<6}{'ours tok/s':>11}{'/hf_eager':>10}"
        f"{'/hf_gmm':>9}{'/tt':>7}{'/loop':>7}{'GF/s':>7}{'/mm':>6}"
        f"{'ops ours/hf/hf_gmm':>20}{'syncs ours/hf/gmm':>19}"
    )
    print(hdr)
    t_start = time.perf_counter()
    for shape in shapes:
        T, D, F_, E, k = shape
        while args.quick and T * k * D * F_ > 2**29:
            T //= 2
        for dt in dtypes:
            # HF eager at E=64 costs ~40x ours (each expert's weight slice zero-fills the
            # whole weight gradient in backward): --quick leaves it out there.
            eager = not (args.no_hf_eager or (args.quick and E >= 64))
            isolate = None
            if dt == "bf16" and not (args.one_process or args.same_batch):
                isolate = [sys.executable, __file__, "--shape", f"{T},{D},{F_},{E},{k}",
                           "--dtype", dt, "--repeats", str(repeats), "--clock", args.clock,
                           "--allocator", args.allocator]
            r = run_shape((T, D, F_, E, k), dt == "bf16", repeats, not args.no_loop, clock, eager,
                          args.same_batch, isolate)
            loop = f"{r['t_ours_loop'] / r['t_ours']:.2f}" if "t_ours_loop" in r else "-"
            hf_e = f"{r['t_hf_eager'] / r['t_ours']:.2f}" if eager else "-"
            print(
                f"{str((T, D, F_, E, k)):<26}{dt:<6}{r['tok_s']:>11.0f}"
                f"{hf_e:>10}{r['t_hf_gmm'] / r['t_ours']:>9.2f}"
                f"{r['t_tt'] / r['t_ours']:>7.2f}{loop:>7}{r['gflops']:>7.1f}"
                f"{r['gflops'] / r['mm_gflops']:>6.2f}"
                f"{r['ops_ours']:>8}/{r.get('ops_hf_eager', '-')}/{r['ops_hf_gmm']:<6}"
                f"{r['sync_ours']:>8}/{r.get('sync_hf_eager', '-')}/{r['sync_hf_gmm']}",
                flush=True,
            )
    print(
        f"({time.perf_counter() - t_start:.0f} s; /loop = loop-fallback time / fused time; "
        "GF/s = expert-GEMM GFLOP/s of ours; /mm = that over torch.mm's at the same FLOPs)"
    )


if __name__ == "__main__":
    main()
