"""One-GPU check of everything CI (CPU, gloo) cannot run: the plan of the GPU checklist's
last section (docs/gpu.md), steps 0-8, on one H100/H200 in <= 8 minutes.

Each step is guarded: a failing step prints ``FAIL`` with a one-line reason and the
script goes on. At the end one markdown table (step, result, numbers, seconds) is printed
and written to ``$OUT/gpu_check.md`` (or ``runs/gpu_check/gpu_check.md``); the steps' run
directories, logs and tracebacks stay in ``<out>/work/``.

    bash scripts/gpu_check.sh                # on a CUDA machine
    bash scripts/gpu_check.sh --cpu-smoke    # tiny sizes on CPU: exercises every step's
                                             # code path (CUDA-only parts say SKIP)

Results: PASS (the check held), FAIL (it did not, or the step raised), INFO (a measurement
with nothing to hold it against), SKIP (not applicable here, e.g. needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ctx:
    """What every step gets: the device, the size preset and a scratch directory."""
    device: torch.device
    smoke: bool
    work: Path
    rows: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, gpu, cpu):
        return cpu if self.smoke else gpu


class Skip(Exception):
    """A step that does not apply here (its message is the reason)."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _peak_reset(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(ctx: Ctx) -> float:
    if ctx.cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return float("nan")


def _timed_fwd_bwd(ctx: Ctx, params: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
                   x0: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn(x)`` and the backward of its mean square (``params``'
    gradients reset each run; x a fresh leaf copy of ``x0``), and the last output."""
    runs = []
    for _ in range(ctx.size(5, 2)):
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_()
        _peak_reset(ctx)  # (synchronizes on CUDA)
        t0 = time.perf_counter()
        y = fn(x)
        y.float().pow(2).sum().backward()
        if ctx.cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2], y


# ----------------------------------------------------------------------------- steps
def step_env(ctx: Ctx):
    """0. versions, capability, the APIs the code relies on, optional kernels."""
    import importlib

    parts = [f"torch {torch.__version__}"]
    if ctx.cuda:
        cap = torch.cuda.get_device_capability()
        parts += [torch.cuda.get_device_name(), f"sm{cap[0]}{cap[1]}",
                  f"CUDA {torch.version.cuda}", f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"]
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    need = {"torch._grouped_mm": hasattr(torch, "_grouped_mm"),
            "DeviceMesh._flatten": hasattr(DeviceMesh, "_flatten"),
            "FSDPModule.set_force_sum_reduction_for_comms":
                hasattr(FSDPModule, "set_force_sum_reduction_for_comms"),
            "torch.distributed.pipelining": importlib.util.find_spec(
                "torch.distributed.pipelining") is not None}
    missing = [k for k, v in need.items() if not v]
    for pkg in ("mamba_ssm", "causal_conv1d"):
        try:
            importlib.import_module(pkg)
            parts.append(f"{pkg} ok")
        except Exception as e:  # ImportError, or a broken CUDA extension
            parts.append(f"{pkg} missing ({type(e).__name__})")
    if missing:
        return "FAIL", "missing: " + ", ".join(missing) + "; " + ", ".join(parts)
    return "PASS", ", ".join(parts)


def step_grouped_gemm(ctx: Ctx):
    """1. grouped GEMM fused vs loop under autocast, fwd+bwd twice; some experts empty and
    rows past the counts: finite, close, empty-expert weight grads zero."""
    from models.grouped_gemm import grouped_mm_available, grouped_mm_fused, grouped_mm_loop

    E, D, F = ctx.size((8, 1024, 512), (4, 32, 16))
    dev = ctx.device
    g = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.tensor([ctx.size(700, 7), 0, ctx.size(1300, 13), 0, *[ctx.size(500, 5)]
                           * (E - 4)], dtype=torch.int64)[:E]
    N = int(counts.sum()) + ctx.size(64, 3)  # parked rows past the counts
    x = torch.randn(N, D, generator=g).to(dev)
    w = (torch.randn(E, D, F, generator=g) * D ** -0.5).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    with amp:
        if not grouped_mm_available(x, w):
            raise Skip(f"torch._grouped_mm does not run here ({dev.type}); loop only")
    outs = {}
    for name, fn in (("fused", grouped_mm_fused), ("loop", grouped_mm_loop)):
        for _ in range(2):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            with amp:
                y = fn(xi, wi, counts.to(dev))
            y.float().pow(2).sum().backward()
        outs[name] = (y.float(), xi.grad.float(), wi.grad.float())
    (yf, gxf, gwf), (yl, gxl, gwl) = outs["fused"], outs["loop"]
    finite = all(torch.isfinite(t).all() for t in (yf, gxf, gwf))
    diff = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-9)
               for a, b in ((yf, yl), (gxf, gxl), (gwf, gwl)))
    empty = gwf[counts.to(dev) == 0].abs().max().item()
    parked = yf[int(counts.sum()):].abs().max().item()
    ok = finite and diff < 2e-2 and empty == 0 and parked == 0
    return ("PASS" if ok else "FAIL",
            f"E{E} D{D} F{F} N{N}: max rel diff {diff:.2e}, empty-expert grad {empty:.1e}, "
            f"parked rows {parked:.1e}, finite {finite}")


def _moe_layer(ctx: Ctx, D: int, E: int, k: int, F: int):
    from models.config import ModelConfig
    from models.moe import MoELayer

    cfg = ModelConfig(vocab_size=64, hidden_size=D, num_layers=1, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=2 * D, max_seq_len=64)
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = E, k, F
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=D ** -0.5)
    return layer.to(ctx.device)


def step_combine_autocast(ctx: Ctx):
    """2. the MoE layer (dispatch, experts, weighted combine) with autocast on vs off:
    output dtype, and the difference the bf16 experts make."""
    D, E = ctx.size((1024, 16), (32, 4))
    layer = _moe_layer(ctx, D, E, 2, D // 2)
    x = torch.randn(2, ctx.size(512, 16), D, device=ctx.device)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            amp = layer(x)
    rel = ((amp.float() - ref).abs().max() / ref.abs().max()).item()
    ok = ref.dtype == torch.float32 and rel < 5e-2
    return ("PASS" if ok else "FAIL",
            f"fp32 out {ref.dtype}, autocast out {amp.dtype}, max rel diff {rel:.2e}")


def step_expert_kernels(ctx: Ctx):
    """2b. the experts' three kernels (``_grouped_mm``, segment loop, padded bmm: two tiers
    where ``pad_plan`` finds them cheaper) under bf16 autocast, fwd+bwd: equal values, and
    their times, which calibrate ``models.grouped_gemm`` CALL_COST_S / FLOP_RATE /
    TIER_COST_S["cuda"] (the padded-vs-segments choice) and show whether "auto" picks the
    fastest here."""
    from models.grouped_gemm import IMPLS, padded_pays

    D, F, E, k, T = ctx.size((1024, 512, 64, 8, 4096), (32, 16, 8, 2, 64))
    layer = _moe_layer(ctx, D, E, k, F)
    x = torch.randn(1, T, D, device=ctx.device)
    amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    times, outs = {}, {}
    for impl in [i for i in IMPLS if i not in ("auto", "loop")]:
        layer.experts.grouped_mm_impl = impl

        def run(xi):
            with amp:
                return layer(xi)

        times[impl], y = _timed_fwd_bwd(ctx, list(layer.parameters()), run, x)
        outs[impl] = (y.float(), layer.experts.w1.grad.float())
    ref_y, ref_g = outs["fused"]
    diff = max(max((a - ref_y).abs().max().item() / (ref_y.abs().max().item() + 1e-9),
                   (g - ref_g).abs().max().item() / (ref_g.abs().max().item() + 1e-9))
               for a, g in outs.values())
    with torch.no_grad():
        r = layer.router(x.view(-1, D))
        counts = torch.bincount(r.routing.expert_idx_TK.flatten(), minlength=E).tolist()
    kind = "cuda" if ctx.cuda else "cpu"
    plan = padded_pays(counts, D, F, kind)
    pick = "segments" if plan is None else (
        f"padded (main tier {plan.C0} rows, {len(plan.over)} experts overflow by "
        f"{plan.C1})" if plan.over else "padded (one tier)")
    ms = ", ".join(f"{i} {t * 1e3:.2f} ms" for i, t in times.items())
    ok = diff < 5e-2
    return ("PASS" if ok else "FAIL",
            f"T{T} D{D} F{F} E{E} k{k}: {ms}; max rel diff {diff:.1e}; cost model picks "
            f"{pick} for the loop")


def step_skewed_padding(ctx: Ctx):
    """2c. the loop fallback's kernels on a skewed load (expert i picked ~ i^-0.5, an early
    router's), bf16, fwd+bwd of one SwiGLU: the fused kernel, the segment loop, the padded
    bmm in one tier and with ``pad_plan``'s overflow tier. Calibrates
    ``TIER_COST_S["cuda"]`` (priced, not measured) and shows which the cost model picks."""
    import torch.nn.functional as F

    from models import grouped_gemm as gg

    D, Fh, E, N = ctx.size((1024, 512, 64, 32768), (32, 16, 8, 256))
    dev, dt = ctx.device, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    p = torch.arange(1, E + 1).float().pow(-0.5)
    counts = torch.bincount(torch.multinomial(p / p.sum(), N, True, generator=g), minlength=E)
    cl, tpe = counts.tolist(), counts.to(dev)
    x0 = torch.randn(N, D, device=dev, dtype=dt)
    ws = [(torch.randn(E, *shape, device=dev, dtype=dt) * 0.02).requires_grad_()
          for shape in ((D, Fh), (D, Fh), (Fh, D))]
    kind = gg.cost_kind(dev.type, dt)
    tiered = gg.pad_plan(cl, D, Fh, "cuda")
    one = gg.PadPlan(max(cl), (), 0, 0.0)

    def padded(plan):
        def fn(x):
            x_R, dest = gg.pad_segments(x, tpe, cl, plan)
            return gg.unpad_segments(gg.padded_swiglu(x_R, *ws, plan), dest, N)
        return fn

    def segments(x):
        h = F.silu(gg.grouped_mm_loop_unmasked(x, ws[0], cl))
        return gg.grouped_mm_loop_unmasked(h * gg.grouped_mm_loop_unmasked(x, ws[1], cl), ws[2], cl)

    def fused(x):
        offs = torch.cumsum(tpe, 0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(x, ws[0], offs=offs))
        return torch._grouped_mm(h * torch._grouped_mm(x, ws[1], offs=offs), ws[2], offs=offs)

    fns = {"segments": segments, "one tier": padded(one), "two tiers": padded(tiered)}
    if gg.grouped_mm_available(x0, ws[0]):
        fns["fused"] = fused
    times, outs = {}, {}
    for name, fn in fns.items():
        times[name], y = _timed_fwd_bwd(ctx, ws, fn, x0)
        outs[name] = y.float()
    ref = outs["segments"]
    diff = max((o - ref).abs().max().item() / (ref.abs().max().item() + 1e-9)
               for o in outs.values())
    plan = gg.padded_pays(cl, D, Fh, kind)
    pick = "segments" if plan is None else "two tiers" if plan.over else "one tier"
    ms = ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items())
    return ("PASS" if diff < 5e-2 else "FAIL",
            f"N{N} D{D} F{Fh} E{E}, longest {max(cl)}, overflow {len(tiered.over)} experts "
            f"past {tiered.C0}: {ms}; max rel diff {diff:.1e}; cost model picks {pick}")


def step_sdpa(ctx: Ctx):
    """3. SDPA with GQA at B1 H32 Hkv8 T8192 Dh128 bf16: which fused kernel takes causal /
    document-mask / additive-bias attention, and the default path's peak memory."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not ctx.cuda:
        raise Skip("the fused SDPA kernels are CUDA-only")
    B, H, Hkv, T, Dh = 1, 32, 8, ctx.size(8192, 256), 128
    dev, dt = ctx.device, torch.bfloat16
    q = torch.randn(B, H, T, Dh, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, Hkv, T, Dh, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, Hkv, T, Dh, device=dev, dtype=dt, requires_grad=True)
    doc = torch.arange(T, device=dev) // (T // 4)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    doc_mask = causal & (doc[:, None] == doc[None, :])
    bias = torch.zeros(T, T, device=dev, dtype=dt).masked_fill(~causal, float("-inf"))
    cases = {"causal": dict(is_causal=True), "document": dict(attn_mask=doc_mask),
             "cp_bias": dict(attn_mask=bias)}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    out = []
    for cname, kw in cases.items():
        took = []
        for bname, b in backends.items():
            try:
                with sdpa_kernel([b]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                took.append(bname)
            except RuntimeError:
                pass
        _peak_reset(ctx)
        base = torch.cuda.memory_allocated()
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        y.sum().backward()
        peak = _peak(ctx) - base
        q.grad = k.grad = v.grad = None
        out.append(f"{cname}: fused {'/'.join(took) or 'none'}, default fwd+bwd peak {_mb(peak)}")
    return "INFO", "; ".join(out)


def step_host_syncs(ctx: Ctx):
    """4. torch.cuda.set_sync_debug_mode("warn") around one MoE layer fwd+bwd: the number
    of host syncs (target: one per MoE layer, the count exchange)."""
    if not ctx.cuda:
        raise Skip("sync debug mode is CUDA-only (tests count syncs on CPU)")
    D, E = ctx.size((1024, 16), (32, 4))
    layer = _moe_layer(ctx, D, E, 2, D // 2)
    x = torch.randn(2, ctx.size(512, 16), D, device=ctx.device, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x).float().sum().backward()  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                layer(x).float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message).lower()]
    kinds = sorted(set(syncs))
    return "INFO", f"{len(syncs)} host syncs in fwd+bwd ({'; '.join(kinds)[:200]})"


def step_two_batch(ctx: Ctx):
    """4b. the two-batch overlap's stepped forward on the device, bf16: the paired call
    equals two plain calls (one device: nothing pauses, so bit for bit), and with the
    stepped recompute (activation checkpointing inside the steps, the experts' loop path
    whose counts come from the host) the gradients match."""
    from models import build_model
    from models.config import ModelConfig
    from parallel.activation_checkpoint import apply_activation_checkpointing

    D = ctx.size(1024, 32)
    cfg = ModelConfig(vocab_size=512, hidden_size=D, num_layers=2, num_heads=8,
                      num_kv_heads=4, ffn_hidden_size=2 * D, max_seq_len=2048)
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = 8, 2, D // 2
    cfg.moe.num_shared_experts = 1
    T = ctx.size(1024, 32)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 512, (2, T), generator=gen).to(ctx.device) for _ in range(2))
    out = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, ctx.device.type)
        for layer in model.moe_layers():
            layer.experts.grouped_mm_impl = "loop"
        if recompute:
            apply_activation_checkpointing(model, stepped=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            plain = (model(a), model(b)) if not recompute else None
            ya, yb = model(a, paired={"tokens_BT": b})
        (ya.float().square().mean() + yb.float().square().mean()).backward()
        out[recompute] = (plain, (ya, yb), [p.grad.float() for p in model.parameters()])
    plain, paired, g0 = out[False]
    same = all(torch.equal(x, y) for x, y in zip(plain, paired))
    g_diff = max((x - y).abs().max().item() / (y.abs().max().item() or 1)
                 for x, y in zip(out[True][2], g0))
    ok = same and g_diff < 2e-2  # bf16: recompute may round the SwiGLU differently
    return ("PASS" if ok else "FAIL",
            f"paired == plain: {same}; stepped recompute grads max rel diff {g_diff:.2e}")


def step_one_rank_group(ctx: Ctx):
    """5. a 1-rank NCCL group (gloo in the smoke run): collectives on device tensors,
    grad-norm clipping through DataParallel, FSDP2 with the bf16 policy, DCP save/load."""
    from types import SimpleNamespace

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from parallel.data_parallel import DataParallel

    backend = "nccl" if ctx.cuda else "gloo"
    dev = ctx.device
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kw = {"device_id": dev} if ctx.cuda else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, **kw)
    try:
        t = torch.arange(8.0, device=dev)
        dist.all_reduce(t)
        out = torch.empty(8, device=dev)
        dist.all_gather_single(out, t)
        dist.reduce_scatter_single(out, t)
        dist.all_to_all_single(out, t)
        # grad norm through a DataParallel whose dims claim 2 ranks: it all-reduces
        dims = SimpleNamespace(dp=2, cp=1, edp=1, ep=1, etp=1, pp=1, world_size=2)
        lin = torch.nn.Linear(16, 16, device=dev)
        lin(torch.randn(4, 16, device=dev)).sum().backward()
        norm = DataParallel(lin, dims, "ddp", overlap=False).clip_grad_norm_(1.0)
        # FSDP2 on a 1-rank mesh with bf16 all-gather / fp32 reduce, then DCP
        mesh = init_device_mesh(dev.type, (1,))
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)).to(dev)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in model:
            fully_shard(m, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        y = model(torch.randn(4, 32, device=dev))
        y.float().sum().backward()
        gdt = {p.grad.dtype for p in model.parameters()}
        ckpt = ctx.work / "dcp"
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
        saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))
        same = all(torch.equal(v.full_tensor(), saved[k]) for k, v in model.state_dict().items())
    finally:
        dist.destroy_process_group()
    ok = y.dtype == torch.bfloat16 and gdt == {torch.float32} and same and norm.device == \
        lin.weight.device and torch.isfinite(norm)
    return ("PASS" if ok else "FAIL",
            f"{backend}: collectives ok, grad norm {norm.item():.3f} on {norm.device}, FSDP2 "
            f"out {y.dtype} grads {sorted(map(str, gdt))}, DCP round trip equal {same}")


def step_mamba(ctx: Ctx):
    """6. Mamba mixer fwd+bwd (hidden 1024, T 2048, B 2) without / with document ids:
    peak memory, which path runs, kernel vs reference where importable."""
    from models import mamba_kernels
    from models.build import build_model
    from models.config import ModelConfig
    from models.modality import ModalityRoute

    D, T, B = ctx.size((1024, 2048, 2), (32, 64, 2))
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=D, num_layers=1, num_heads=8,
                      num_kv_heads=8, ffn_hidden_size=2 * D, max_seq_len=T)
    cfg.mot.modalities = ["text", "image"]
    torch.manual_seed(0)
    mixer = build_model(cfg).layers["0"].mixer.to(ctx.device)  # initialised by the model
    route = ModalityRoute.build(torch.randint(0, 2, (B, T), device=ctx.device), 2)
    x = torch.randn(B, T, D, device=ctx.device)
    docs = (torch.arange(T, device=ctx.device) // (T // 4)).expand(B, T)
    res, parts = {}, []
    for label, doc in (("no docs", None), ("docs", docs)):
        for mode in ("torch", "auto"):
            mixer.seq.kernels = mode
            _peak_reset(ctx)
            xi = x.clone().requires_grad_()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                y = mixer(xi, route, doc)
            y.float().pow(2).mean().backward()
            res[(label, mode)] = (y.float().detach(), xi.grad.detach())
            if mode == "torch":
                parts.append(f"{label}: reference peak {_mb(_peak(ctx))}")
    scan_fn, why = mamba_kernels.load("scan")
    if ctx.cuda and scan_fn is not None:
        y_k, g_k = res[("no docs", "auto")]
        y_r, g_r = res[("no docs", "torch")]
        rel = ((y_k - y_r).abs().max() / y_r.abs().max()).item()
        grel = ((g_k - g_r).abs().max() / g_r.abs().max()).item()
        parts.append(f"kernel vs reference: out rel {rel:.2e}, grad rel {grel:.2e}")
        status = "PASS" if rel < 5e-2 and grel < 5e-2 else "FAIL"
    else:
        parts.append(f"kernels not used ({why or 'CPU'})")
        status = "INFO"
    finite = all(torch.isfinite(t).all() for v in res.values() for t in v)
    return ("FAIL" if not finite else status), "; ".join(parts)


def step_priming(ctx: Ctx):
    """7. an MoE layer on zero input (what torch's PP shape inference used to feed a
    non-first stage) vs the seeded normal input the pipeline stage now feeds: share of
    routed tokens taken by the busiest expert."""
    D, E = ctx.size((1024, 64), (32, 8))
    layer = _moe_layer(ctx, D, E, 2, 64)
    counts = {}

    def hook(mod, args):
        counts["c"] = args[1].detach().float().cpu()
    h = layer.experts.register_forward_pre_hook(hook)
    try:
        share = {}
        gen = torch.Generator(device=ctx.device).manual_seed(0x5EED)
        inputs = {"zeros": torch.zeros(2, ctx.size(1024, 64), D, device=ctx.device)}
        inputs["normal"] = torch.randn(inputs["zeros"].shape, device=ctx.device, generator=gen)
        for name, x in inputs.items():
            with torch.no_grad():
                layer(x)
            c = counts["c"]
            share[name] = (c.max() / c.sum()).item()
    finally:
        h.remove()
    ok = share["normal"] < 4.0 / E + 0.1
    return ("PASS" if ok else "FAIL",
            f"E{E} top-2: busiest expert share zeros {share['zeros']:.2f}, "
            f"normal {share['normal']:.2f} (even routing: {1 / E:.3f})")


def _train(ctx: Ctx, name: str, overrides: list[str], timeout: float) -> list[dict]:
    run_dir = ctx.work / name
    cmd = [sys.executable, "-m", "trainer.train", f"run_dir={run_dir}",
           "logger.console=plain", "logger.tensorboard=false", "logger.expert_load_every=0",
           "logger.wandb.mode=disabled", *overrides]
    if not ctx.cuda:
        cmd += ["trainer.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    (ctx.work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"{name} exited {proc.returncode}: {tail[-1] if tail else ''}")
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _losses(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "step" in r}


TINY = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        "trainer.eval_every=0", "optim.warmup_steps=2"]


def step_resume(ctx: Ctx):
    """8a. the tiny MoE for 20 steps with a checkpoint at 10, then a resume from it: the
    resumed steps' losses against the uninterrupted run's."""
    n = ctx.size(20, 4)
    half = n // 2
    full = _losses(_train(ctx, "resume_a", [*TINY, f"trainer.max_steps={n}",
                                             f"checkpoint.every={half}", "checkpoint.keep_last=0",
                                             "trainer.log_every=1"], 180))
    ckpt = ctx.work / "resume_a" / "checkpoints" / f"step_{half:07d}"
    again = _losses(_train(ctx, "resume_b", [*TINY, f"trainer.max_steps={n}",
                                              f"checkpoint.resume={ckpt}", "trainer.log_every=1",
                                              "checkpoint.save_final=false"], 180))
    steps = [s for s in range(half + 1, n + 1) if s in full and s in again]
    if not steps:
        return "FAIL", f"no resumed steps to compare (full {sorted(full)}, again {sorted(again)})"
    diff = max(abs(full[s] - again[s]) for s in steps)
    return ("PASS" if diff <= 1e-3 * abs(full[steps[-1]]) else "FAIL",
            f"steps {steps[0]}-{steps[-1]}: max |loss diff| {diff:.2e} (loss {full[steps[-1]]:.4f})")


def step_mom(ctx: Ctx):
    """8b. a Mixture-of-Mamba run on the embedded multimodal data (which scan path runs is
    in its log)."""
    n = ctx.size(10, 2)
    recs = _train(ctx, "mom", ["model=mom_tiny", "data=digits_chameleon", *TINY,
                               f"trainer.max_steps={n}", "trainer.seq_len=256",
                               "checkpoint.every=0", "checkpoint.save_final=false",
                               "trainer.log_every=1"], 180)
    loss = _losses(recs)
    log = (ctx.work / "mom.log").read_text()
    path = [ln.split("mamba ", 1)[1][:60] for ln in log.splitlines() if "mamba scan:" in ln]
    ok = bool(loss) and all(math.isfinite(v) for v in loss.values())
    return ("PASS" if ok else "FAIL",
            f"{len(loss)} steps, last loss {loss[max(loss)]:.4f}; "
            f"{path[0] if path else 'scan path not logged (CPU: reference)'}")


def step_train_1b(ctx: Ctx):
    """8c. bf16 training of the ~1.2B MoE (configs/experiment/gpu_check_1b.yaml): MFU,
    tokens/s and torch.cuda.max_memory_allocated next to the dry run's estimate."""
    small = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
             "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=2048",
             "model.moe.num_experts=4", "model.moe.expert_ffn_hidden_size=64",
             "model.moe.shared_expert_ffn_hidden_size=64", "trainer.seq_len=64",
             "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
             "trainer.max_steps=3", "trainer.log_every=1"] if ctx.smoke else []
    if not ctx.cuda:
        small += ["trainer.device=cpu"]
    base = ["experiment=gpu_check_1b", *small]
    dry_dir = ctx.work / "dry_1b"
    proc = subprocess.run([sys.executable, "-m", "trainer.train", *base, "trainer.dry_run=true",
                           "parallel.world_size=1", f"run_dir={dry_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    est = None
    if proc.returncode == 0 and (dry_dir / "memory.json").exists():
        est = json.loads((dry_dir / "memory.json").read_text())["total_bytes"]
    recs = _train(ctx, "train_1b", base, 300)
    steps = [r for r in recs if "mfu" in r or "tokens_per_s" in r]
    if not steps:
        return "FAIL", "no step metrics in metrics.jsonl"
    last = steps[-1]
    peak = max((r.get("peak_mem_gib", 0.0) for r in steps), default=0.0)
    parts = [f"{last['step']} steps, loss {last.get('loss', float('nan')):.3f}",
             f"{last.get('tokens_per_s', float('nan')):,.0f} tokens/s",
             f"MFU {100 * last.get('mfu', float('nan')):.1f}%",
             f"peak allocated {peak:.2f} GiB" if ctx.cuda else f"peak RSS {peak:.2f} GiB"]
    if est is not None:
        parts.append(f"dry-run estimate {est / 2**30:.2f} GiB"
                     + (f" (measured/estimate {peak * 2**30 / est:.2f})" if ctx.cuda else ""))
    else:
        parts.append(f"dry run failed: {(proc.stderr or proc.stdout).strip()[-120:]}")
    finite = math.isfinite(last.get("loss", float("nan")))
    return ("PASS" if finite and est is not None else "FAIL"), ", ".join(parts)


STEPS: list[tuple[str, Callable[[Ctx], tuple[str, str]]]] = [
    ("0 env", step_env),
    ("1 grouped GEMM fused vs loop", step_grouped_gemm),
    ("2 MoE combine autocast", step_combine_autocast),
    ("2b expert kernels: fused / segments / padded", step_expert_kernels),
    ("2c skewed load: segments / one tier / two tiers", step_skewed_padding),
    ("3 SDPA kernels + memory", step_sdpa),
    ("4 host syncs (MoE layer)", step_host_syncs),
    ("4b two-batch stepped forward", step_two_batch),
    ("5 1-rank group, clip, FSDP2, DCP", step_one_rank_group),
    ("6 Mamba mixer memory / kernels", step_mamba),
    ("7 routing on priming input", step_priming),
    ("8a train 20 steps + resume", step_resume),
    ("8b Mixture-of-Mamba run", step_mom),
    ("8c ~1B MoE bf16: MFU, memory", step_train_1b),
]


def run_steps(ctx: Ctx, only: list[str] | None = None) -> list[tuple[str, str, str, float]]:
    """Every step, guarded: an exception is that step's FAIL (one line), not the end."""
    rows = []
    for name, fn in STEPS:
        if only and not any(name.startswith(o) for o in only):
            continue
        start = time.perf_counter()
        try:
            status, numbers = fn(ctx)
        except Skip as e:
            status, numbers = "SKIP", str(e)
        except Exception as e:  # noqa: BLE001 - a step's failure is a row, not the end
            status = "FAIL"
            numbers = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            with (ctx.work / "tracebacks.txt").open("a") as f:
                f.write(f"== {name}\n{traceback.format_exc()}\n")
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()
        secs = time.perf_counter() - start
        print(f"[{status}] {name}: {numbers} ({secs:.1f} s)", flush=True)
        rows.append((name, status, numbers, secs))
    return rows


def table(rows) -> str:
    lines = ["| step | result | numbers | s |", "|---|---|---|---|"]
    for name, status, numbers, secs in rows:
        lines.append(f"| {name} | {status} | {numbers.replace('|', '/')} | {secs:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on CPU: every step's code path, CUDA-only parts SKIP")
    ap.add_argument("--only", nargs="*", help="step name prefixes (e.g. 0 1 8c)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"))
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-smoke for the CPU smoke run)")
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    work = out / "work"  # run dirs, logs (<step>.log), tracebacks.txt: kept for reading
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.environ.setdefault("MOEFOLD_CACHE", str(out / "cache"))
    ctx = Ctx(device=device, smoke=args.cpu_smoke, work=work)
    rows = run_steps(ctx, args.only)
    total = time.perf_counter() - start
    md = (f"# gpu_check ({'cpu smoke' if args.cpu_smoke else torch.cuda.get_device_name()}, "
          f"{total:.0f} s)\n\n{table(rows)}\n")
    print("\n" + md)
    (out / "gpu_check.md").write_text(md)
    print(f"wrote {out / 'gpu_check.md'}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
