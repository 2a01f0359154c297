"""Mamba-1 and Mixture-of-Mamba (Liang et al., 2025), pure PyTorch.

Selective scan (Gu & Dao, 2023), per channel d and state n::

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,      y_t = C_t · h_t + D u_t

:func:`selective_scan` is the reference: the sequence is cut into chunks of ``chunk``
steps, all chunks are scanned in lockstep (a loop over the few positions of a chunk, each
step one fused multiply-add over every chunk at once, never a loop over T), and the
chunks' states are then joined by a log-depth (Hillis-Steele) associative scan across
chunks. It is exact (no exp of positive sums: only products of decays ≤ 1) and equals the
step-by-step recurrence (tests/test_mamba.py).

A document boundary resets the state (the decay into a document's first token is 0) and
the causal conv1d never reads across it, so packed documents stay independent, as the
attention masks make them for transformers.

Mixture-of-Mamba: ``in_proj``, ``x_proj``, ``dt_proj`` (with its bias) and ``out_proj``
are modality-specific (``model.mamba.untie`` picks which, for the ablation), grouped by
modality exactly like MoT's projections (``models.modality.ModalityLinear``); ``conv1d``,
``A_log``, ``D`` and the block's RMSNorm are shared. With ``untie: []`` it is the dense
Mamba baseline with identical FLOPs per token. The dt bias is kept whether or not
``dt_proj`` is split (the reference code drops it when unsplit; ANCHORS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import models.mamba_kernels as mamba_kernels
from models.config import ModelConfig
from models.layers import Initializer, RMSNorm
from models.modality import SINGLE_DEVICE, ModalityLinear, ModalityRoute, Region

PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def dt_rank(cfg: ModelConfig) -> int:
    return cfg.mamba.dt_rank or math.ceil(cfg.hidden_size / 16)


def _shift(x: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """x[:, t - k] along dim 1 (``fill`` for t < k)."""
    pad = x.new_full((x.shape[0], k, *x.shape[2:]), fill)
    return torch.cat([pad, x[:, :-k]], 1)


def _scan_chunk(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_k = a_k h_{k-1} + b_k (h_{-1} = 0) along dim 1, log-depth.
    Returns (h, prod_{j<=k} a_j)."""
    k = 1
    while k < a.shape[1]:
        b = b + a * _shift(b, k, 0.0)
        a = a * _shift(a, k, 1.0)
        k *= 2
    return b, a


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, reset: Optional[torch.Tensor] = None,
                   h0: Optional[torch.Tensor] = None, chunk: int = 16,
                   return_state: bool = False, recompute: bool = True):
    """u, delta [Bt, T, Dn]; A [Dn, N]; B, C [Bt, T, N]; D [Dn]; ``reset`` [Bt, T] bool
    (the state is zeroed before these steps: document starts); ``h0`` [Bt, Dn, N].
    Computed in fp32; returns y [Bt, T, Dn] in u's dtype (and the final state).

    The sequence is cut into ``T/chunk`` chunks of ``chunk`` steps. (1) Every chunk is
    scanned from a zero state, all chunks in lockstep: a loop over the ``chunk`` positions
    whose every step is one fused multiply-add over ``[Bt, T/chunk, Dn, N]``. (2) The
    chunks' (total decay, final state) pairs are scanned across chunks in log depth, giving
    the state entering each chunk. (3) ``h_t += P_t ⊙ h_in`` with P_t the decay from the
    chunk start (exp of a cumulative sum of ΔA ≤ 0: no overflow). Work is linear in T.

    Autocast is off inside: the output contraction is an ``einsum``, which autocast (CPU
    and CUDA) would otherwise run in bf16 although every operand was upcast to fp32.

    ``recompute`` (default): when a gradient is needed, the scan's fp32 ``[Bt, T, Dn, N]``
    intermediates are not kept for backward but recomputed there (non-reentrant
    checkpoint; the same values, so identical gradients): a layer then keeps only its
    inputs, ~8 B per token and channel instead of ~(5 + 4/chunk) * 4 * N."""
    args = (u, delta, A, B, C, D, reset, h0, chunk, return_state)
    with fp32_region(u):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, h0))
        if recompute and needs_grad:
            return checkpoint(_selective_scan, *args, use_reentrant=False)
        return _selective_scan(*args)


def fp32_region(t: torch.Tensor):
    """Autocast disabled for ``t``'s device type: a region whose contractions are meant
    to run in fp32 (autocast lowers ``einsum``/``matmul`` to bf16 even on fp32 inputs)."""
    return torch.autocast(t.device.type, enabled=False)


def _selective_scan(u, delta, A, B, C, D, reset, h0, chunk, return_state):
    dtype = u.dtype
    Bt, T, Dn = u.shape
    c = max(1, min(chunk, T))
    n = -(-T // c)

    def by_step(t: torch.Tensor) -> torch.Tensor:
        """[Bt, T, ...] -> [c, Bt, n, ...]: row i holds step i of every chunk (the tail
        padded with zeros: Δ = 0 there, so the padded steps keep the state unchanged)."""
        t = t.float()
        if n * c > T:
            t = torch.cat([t, t.new_zeros(Bt, n * c - T, *t.shape[2:])], 1)
        return t.view(Bt, n, c, *t.shape[2:]).movedim(2, 0).contiguous()

    u_, dt_, B_, C_ = by_step(u), by_step(delta), by_step(B), by_step(C)
    dA = dt_.unsqueeze(-1) * A.float()  # [c, Bt, n, Dn, N], <= 0
    a, P = torch.exp(dA), torch.exp(torch.cumsum(dA, 0))
    if reset is not None:
        r = by_step(reset) > 0
        a = a.masked_fill(r[..., None, None], 0.0)
        P = P.masked_fill((torch.cumsum(r.long(), 0) > 0)[..., None, None], 0.0)
    b = (dt_ * u_).unsqueeze(-1) * B_.unsqueeze(-2)
    a_steps, b_steps = a.unbind(0), b.unbind(0)  # one backward for all steps, not c
    hs = [b_steps[0]]
    for i in range(1, c):  # a loop over the positions of a chunk, never over T
        hs.append(torch.addcmul(b_steps[i], a_steps[i], hs[-1]))
    ends, decay = _scan_chunk(P[-1], hs[-1])  # [Bt, n, Dn, N]: chunk-final states
    if h0 is not None:
        ends = ends + decay * h0.float().unsqueeze(1)
        h_in = torch.cat([h0.float().unsqueeze(1), ends[:, :-1]], 1)
    else:
        h_in = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1)
    h = torch.addcmul(torch.stack(hs), P, h_in.unsqueeze(0))
    y = torch.einsum("ibkdn,ibkn->ibkd", h, C_) + u_ * D.float()
    y = y.movedim(0, 2).reshape(Bt, n * c, Dn)[:, :T].to(dtype)
    return (y, ends[:, -1]) if return_state else y


def selective_scan_naive(u, delta, A, B, C, D, reset=None, h0=None):
    """The recurrence step by step (a Python loop over time): the benchmark's baseline."""
    with fp32_region(u):
        return _selective_scan_naive(u, delta, A, B, C, D, reset, h0)


def _selective_scan_naive(u, delta, A, B, C, D, reset, h0):
    Bt, T, Dn = u.shape
    h = h0.float() if h0 is not None else u.new_zeros(Bt, Dn, A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(T):
        a = torch.exp(delta[:, t].float().unsqueeze(-1) * A.float())
        if reset is not None:
            a = a * (~reset[:, t]).float()[:, None, None]
        h = a * h + (delta[:, t] * u[:, t]).float().unsqueeze(-1) * B[:, t].float().unsqueeze(1)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t].float()))
    return (torch.stack(ys, 1) + u.float() * D.float()).to(u.dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise causal conv over dim 1: x [B, T, Dn], weight [Dn, K], bias [Dn]; a tap
    that would read another document contributes nothing."""
    K = weight.shape[1]
    out = x * weight[:, K - 1] + bias
    for k in range(1, K):  # a loop over the K-1 taps, not over time
        tap = _shift(x, k, 0.0) * weight[:, K - 1 - k]
        if doc_ids is not None:
            same = doc_ids == _shift(doc_ids, k, -1)
            tap = tap * same.unsqueeze(-1).to(tap.dtype)
        out = out + tap
    return out


class SequenceScan:
    """How a mixer runs its sequence-mixing parts over the tokens it holds: the causal
    conv and the scan. On one device (this class) the tokens are the whole sequence;
    context parallelism replaces it (``parallel.ssm_context_parallel.ContextParallelScan``:
    conv halos and scan states passed between the ranks' chunks). ``kernels``: use the
    optional CUDA kernels where they apply (models/mamba_kernels.py): ``"auto"`` where
    importable (which path runs is logged once), ``"cuda"`` required on CUDA tensors (a
    missing package raises), ``"torch"`` (or False) never."""

    def __init__(self, kernels: bool | str = False):
        self.kernels = {True: "auto", False: "torch"}.get(kernels, kernels)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        fn = mamba_kernels.conv_kernel(x, self.kernels) if self.kernels != "torch" else None
        if fn is not None:
            return mamba_kernels.kernel_conv(fn, x, weight, bias, doc_ids)
        return causal_conv1d(x, weight, bias, doc_ids)

    def scan(self, x, delta, A, B, C, D, doc_ids: Optional[torch.Tensor], chunk: int):
        use = self.kernels != "torch" and doc_ids is None
        fn = mamba_kernels.scan_kernel(x, self.kernels) if use else None
        if fn is not None:  # Mamba-1's kernel cannot reset the state at a document start
            return mamba_kernels.kernel_scan(fn, x, delta, A, B, C, D)
        reset = None if doc_ids is None else doc_ids != _shift(doc_ids, 1, -1)
        return selective_scan(x, delta, A, B, C, D, reset, chunk=chunk)



class MambaMixer(nn.Module):
    """The Mamba-1 mixer with modality-specific projections (Mixture-of-Mamba)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mc, d = cfg.mamba, cfg.hidden_size
        M = len(cfg.mot.modalities)
        self.d_inner, self.d_state, self.dt_rank = mc.expand * d, mc.d_state, dt_rank(cfg)
        self.chunk = mc.scan_chunk
        di, N, R = self.d_inner, self.d_state, self.dt_rank

        def num(name: str) -> int:
            return M if name in mc.untie else 1

        self.in_proj = ModalityLinear(num("in_proj"), d, 2 * di, out_parts=2)  # x, z
        self.x_proj = ModalityLinear(num("x_proj"), di, R + 2 * N)
        self.dt_proj = ModalityLinear(num("dt_proj"), R, di)
        self.dt_proj.init_by_parent = True  # uniform, not normal (init_params below)
        self.dt_bias = nn.Parameter(torch.empty(num("dt_proj"), di))
        self.out_proj = ModalityLinear(num("out_proj"), di, d, out_proj=True)
        self.conv_weight = nn.Parameter(torch.empty(di, mc.d_conv))  # shared
        self.conv_bias = nn.Parameter(torch.empty(di))
        self.A_log = nn.Parameter(torch.empty(di, N))
        self.D = nn.Parameter(torch.empty(di))
        self.dt_min, self.dt_max = mc.dt_min, mc.dt_max
        # seam for tensor parallelism: the local shard of the per-channel parameters
        self.local: Callable[[torch.Tensor], torch.Tensor] = _identity
        # seam for context parallelism
        self.seq = SequenceScan(kernels=mc.kernels)

    def _proj(self, lin: ModalityLinear, x_BTD: torch.Tensor, route: ModalityRoute):
        """Per-modality projection in sequence order (sorted rows only when split)."""
        return route.tokens(lin(route.rows(x_BTD, lin.split), route), lin.split)

    def forward(self, x_BTD: torch.Tensor, route: ModalityRoute,
                doc_ids_BT: Optional[torch.Tensor] = None, region: Region = SINGLE_DEVICE
                ) -> torch.Tensor:
        """``region``: tensor parallelism over d_inner (parallel/mamba_parallel.py): x/z,
        conv, dt and the scan are per channel (local); x_proj and out_proj are
        row-parallel, their partial sums reduced by ``region`` (under sequence parallelism
        ``enter`` gathers the sequence and ``exit`` scatters it again)."""
        N, R, loc = self.d_state, self.dt_rank, self.local
        xz = self._proj(self.in_proj, region.enter(x_BTD), route)
        x, z = xz.chunk(2, dim=-1)  # the local channels of x and of z
        x = F.silu(self.seq.conv(x, loc(self.conv_weight), loc(self.conv_bias), doc_ids_BT))
        dbc = region.all_reduce(self._proj(self.x_proj, x, route))
        dt, Bm, Cm = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
        dt_bias = loc(self.dt_bias)
        bias = dt_bias[0] if dt_bias.shape[0] == 1 else dt_bias[route.ids_BT]
        delta = F.softplus(self._proj(self.dt_proj, dt, route).float() + bias.float())
        A = -torch.exp(loc(self.A_log).float())
        y = self.seq.scan(x, delta, A, Bm, Cm, loc(self.D), doc_ids_BT, self.chunk)
        return region.exit(self._proj(self.out_proj, y * F.silu(z), route))

    def init_params(self, init: Initializer, prefix: str) -> None:
        N = self.d_state
        std = self.dt_rank ** -0.5  # dt_proj weight U(±dt_rank^-0.5)
        init.apply(self.dt_proj.weight, init.rows(
            lambda m: init.uniform(f"{prefix}.dt_proj.weight[{m}]", -std, std)))
        init.apply(self.dt_bias, init.rows(lambda m: self._dt_bias_fill(init, prefix, m)))
        bound = self.conv_weight.shape[1] ** -0.5  # torch's Conv1d default for groups=di
        init.uniform_(self.conv_weight, f"{prefix}.conv_weight", -bound, bound)
        init.uniform_(self.conv_bias, f"{prefix}.conv_bias", -bound, bound)

        def a_log(out: torch.Tensor, index, shape) -> None:
            # S4D-real: A = -(1, 2, ..., N) for every channel
            a = torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=out.device))
            out.copy_(a.expand(shape)[index])
        init.apply(self.A_log, a_log)
        init.constant_(self.D, 1.0)

    def _dt_bias_fill(self, init: Initializer, prefix: str, m: int):
        """dt log-uniform in [dt_min, dt_max] (``u`` drawn as ``dt_bias[m]``);
        bias = softplus^-1(dt)."""
        def fill(out: torch.Tensor, index, shape) -> None:
            u = torch.empty(shape, device=out.device)
            init.uniform(f"{prefix}.dt_bias[{m}]", 0.0, 1.0)(u, index, shape)
            dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min)).clamp(min=1e-4)
            out.copy_((dt + torch.log(-torch.expm1(-dt)))[index])
        return fill


class MambaBlock(nn.Module):
    """``out = x + mixer(RMSNorm(x))`` (the norm is shared by the modalities; under
    sequence parallelism it runs on the rank's tokens, its gradient summed over TP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = MambaMixer(cfg)
        self.region: Region = SINGLE_DEVICE

    def forward(self, x_BTD, route, position_ids_BT=None, doc_ids_BT=None, block_ids_BT=None):
        r = self.region
        return x_BTD + self.mixer(self.norm(x_BTD, r.shared_out), route, doc_ids_BT, r)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
