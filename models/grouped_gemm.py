"""Grouped matmul over expert segments: rows of ``x_ND`` are grouped by expert, expert e
owning ``tokens_per_expert[e]`` consecutive rows. Rows past ``tokens_per_expert.sum()``
(dropped assignments a dispatcher parks at the end) belong to no expert: their output and
their input gradient are zero.

Three implementations, equal in values and gradients (tests/test_moe_layer.py):
- ``torch._grouped_mm`` (one kernel, no host sync) where it runs: CPU fp32/bf16/fp16 with
  16-byte aligned rows; CUDA bf16 on sm90+. (torch >= 2.10 also runs it on other CUDA
  devices and dtypes through a fallback that copies the offsets to the host on every
  call, 9 syncs per SwiGLU fwd+bwd: the loop below syncs once for all of them.)
- the segment loop (a loop over experts, never over tokens);
- the padded bmm (``pad_segments``: the segments padded to the longest, three ``bmm``;
  or, where a few segments are much longer than the rest, padded to a shorter main tier
  with the long ones' remaining rows in an overflow tier against their gathered weights:
  :class:`PadPlan`, :class:`TieredBmm`).
The last two need the counts on the host, i.e. one device->host sync per layer; the loop
fallback picks between them per call with :func:`padded_pays` (the padding FLOPs and the
tier's calls against the per-segment GEMMs it saves). On CPU in bf16/fp16, where the
grouped kernel pays a oneDNN set-up per segment shape, "auto" makes the same choice
between it and the padded bmm (the counts are in host memory there: no wait).

A layer of several GEMMs over the same segments (``models.moe.GroupedExperts``) computes
the offsets (or the host counts) once, handles the trailing rows once on entry and once
on exit (:func:`fed_rows`), and calls the ``*_unmasked`` kernels in between: a trailing
row's garbage is only ever read by the next grouped GEMM, which skips rows past the last
offset.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built tensor on ``device`` without waiting for the device's queue (a
    pageable copy would: a pinned, asynchronous one does not)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` if autocast is on there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type``: ``torch.autocast(enabled=False)``
    where autocast is on, else a no-op context (entering and leaving a real autocast
    context costs ~5 us of Python per call, paid on every MoE layer's hot path)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (after autocast casting)."""
    if x.dim() != 2 or w.dim() != 3:
        return False
    dtype = autocast_dtype(x.device.type) or x.dtype
    return _grouped_mm_runs(x.device, dtype, w.shape[1], w.shape[2])


@functools.lru_cache(maxsize=256)
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> bool:
    """Cached: asked once per MoE layer call (the CUDA capability query is not free)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # Every row of x, w[e] and the output must start on a 16-byte boundary.
    return (rows * dtype.itemsize) % 16 == 0 and (cols * dtype.itemsize) % 16 == 0


IMPLS = ("auto", "fused", "loop", "loop_segments", "loop_padded")


def use_fused(x: torch.Tensor, w: torch.Tensor, impl: str) -> bool:
    """impl (one of ``IMPLS``: "auto" = fused when available, else the loop; "loop" = the
    loop fallback, segments or padded chosen per call; the last two force one) -> whether
    to run fused."""
    if impl not in IMPLS:
        raise ValueError(f"grouped_mm impl={impl!r} is not one of {', '.join(IMPLS)}")
    return impl == "fused" or (impl == "auto" and grouped_mm_available(x, w))


# The choice between one GEMM per expert segment (the segment loop, or CPU's
# ``_grouped_mm``, which runs that loop in C++: 9 * E GEMMs per SwiGLU fwd+bwd) and one
# bmm over the segments padded to the longest (9 GEMMs, plus the padding rows' FLOPs):
# padded when its extra FLOPs cost less than the extra per-segment GEMMs. Rough figures per
# kind of device: a segment GEMM's fixed cost in seconds (Python + dispatch + launch; on CPU
# in bf16/fp16 a cached oneDNN kernel's set-up, ~15 us measured here) and the GEMM rate in
# FLOP/s. The choice only needs their order of magnitude.
CALL_COST_S = {"cpu": 3e-6, "cpu_lowp": 1.5e-5, "cuda": 1.5e-5}
FLOP_RATE = {"cpu": 1e11, "cpu_lowp": 2.4e11, "cuda": 1e14}
# The row multiple every GEMM's segment length is rounded up to (zero rows), per kind. On
# CPU in bf16/fp16 oneDNN builds a kernel for every GEMM shape it has not seen (0.5-3 ms
# measured at D 256-512), and in training the counts change every step: unrounded, nearly
# every segment GEMM is a new shape, more than oneDNN's kernel cache (1024) holds, and a
# layer fwd+bwd at (T, D, F, E, k) = (4096, 512, 1024, 64, 8) took 1.9 s with a fresh batch
# per step against 0.8 s with one batch repeated. Rounded to 32 rows, a few dozen shapes
# recur and stay cached: 0.83 s (docs/results.md, issue 19 seventh pass). MKL (fp32) and
# cuBLAS build nothing per shape: 1 (unrounded) there.
ROW_ALIGN = {"cpu": 1, "cpu_lowp": 32, "cuda": 1}


def round_up(n, multiple: int):
    """``n`` (an int or an integer array) rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def cost_kind(device_type: str, dtype: torch.dtype) -> str:
    """The ``CALL_COST_S`` / ``FLOP_RATE`` key of a device and compute dtype."""
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "cpu_lowp"
    return device_type if device_type in CALL_COST_S else "cpu"


@dataclass(frozen=True)
class PadPlan:
    """The padded bmm's layout for a set of segment lengths: a main tier of E blocks of
    ``C0`` rows (every expert's first ``C0`` rows, zeros after) and, for the experts in
    ``over`` (longer than ``C0``), an overflow tier of blocks of ``C1`` rows (their rows
    past ``C0``; ``C1`` = the longest segment - ``C0``) run against their gathered
    weights. No overflow tier (``over`` empty) is the plain padding to the longest.
    ``waste_s``: the estimated cost of the padding rows' FLOPs and the tier's calls."""

    C0: int
    over: tuple[int, ...]
    C1: int
    waste_s: float


# The overflow tier's fixed price in seconds per SwiGLU fwd+bwd: 9 more bmm, 3 weight
# gathers, 3 gradient index_add_ and three autograd Functions' Python; on CUDA, 15
# launches. On CPU (the trainer's allocator settings) the tier was measured slower than
# one tier at (T, D, F, E, k) = (256, 64, 64, 64, 8) with the router's counts (longest
# 52, shortest 18: 4.65-4.85 against 4.49-4.56 ms per layer fwd+bwd), the bmm's marginal
# padding rows costing less than FLOP_RATE says. In bf16 the tier's batch (its number of
# experts) changes from step to step, so its bmm are new oneDNN shapes (~1-3 ms each, see
# ROW_ALIGN): at (512, 256, 512, 64, 8), a fresh batch per step, the layer took 105-108 ms
# with the tier as priced at 1 ms against 100-102 without it. So on CPU it is priced to be
# taken only for a large saving.
TIER_COST_S = {"cpu": 1e-3, "cpu_lowp": 2e-2, "cuda": 15 * CALL_COST_S["cuda"]}


def pad_plan(counts: list[int], dim: int, hidden: int, kind: str) -> PadPlan:
    """The cheapest :class:`PadPlan` for these segment lengths (``kind``: see
    :func:`cost_kind`; both tiers' lengths rounded up to ``ROW_ALIGN[kind]``). O(E log E)
    host work: the main tier's length is taken among the (rounded) counts, longest first,
    each shorter one sending more experts to the overflow tier (at most half of them)."""
    E, total, m = len(counts), sum(counts), ROW_ALIGN[kind]
    longest = max(counts, default=0)
    per_row = 18 * dim * hidden / FLOP_RATE[kind]
    C = round_up(longest, m)
    best = PadPlan(C, (), 0, (E * C - total) * per_row)
    if best.waste_s <= TIER_COST_S[kind]:
        return best  # no overflow tier can pay
    order = sorted(range(E), key=counts.__getitem__, reverse=True)
    n_over = 0
    for C0 in sorted({round_up(c, m) for c in counts if round_up(c, m) < C}, reverse=True):
        while counts[order[n_over]] > C0:  # the experts before it in ``order`` overflow
            n_over += 1
        if n_over > E // 2:
            break
        C1 = round_up(longest - C0, m)
        waste = (E * C0 + n_over * C1 - total) * per_row + TIER_COST_S[kind]
        if waste < best.waste_s:
            best = PadPlan(C0, tuple(sorted(order[:n_over])), C1, waste)
    return best


def padded_pays(counts: list[int], dim: int, hidden: int, kind: str) -> PadPlan | None:
    """The padded bmm's plan when it beats per-segment GEMMs for a SwiGLU over these
    segments (its padding FLOPs and extra calls against the 9 * (E - 1) GEMM calls it
    saves and the per-segment path's own rounding rows), else None (``kind``: see
    :func:`cost_kind`)."""
    E = len(counts)
    if E == 0 or sum(counts) == 0:
        return None
    plan = pad_plan(counts, dim, hidden, kind)
    m = ROW_ALIGN[kind]
    rounding = sum(round_up(c, m) - c for c in counts) * 18 * dim * hidden / FLOP_RATE[kind]
    return plan if plan.waste_s < 9 * (E - 1) * CALL_COST_S[kind] + rounding else None


def _scatter_fed(x_ND: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows, D]`` zeros with the fed rows of ``x_ND`` (the first ``len(dest)``)
    copied to rows ``dest``."""
    total = dest.shape[0]
    fed = x_ND if total == x_ND.shape[0] else x_ND[:total]
    return x_ND.new_zeros(num_rows, x_ND.shape[1]).index_copy(0, dest, fed)


def _host_row_map(shift, counts) -> np.ndarray:
    """The padded row of every fed row, on the host: segment e's rows move by ``shift[e]``."""
    c = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.asarray(shift, dtype=np.int64), c) + np.arange(int(c.sum()),
                                                                       dtype=np.int64)


def pad_segments(
    x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, counts: list[int], plan: PadPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the padded rows ``[E * C0 + len(over) * C1, D]``: each expert's first ``C0`` rows
    in its main block, the rest in its overflow block, zeros after; ``dest``: the padded
    row of each fed row). Trailing rows are left out. Both directions are one-to-one
    copies (index_copy / index_select on unique rows), so the gradients are exact and
    deterministic."""
    E, total, C0, C1 = len(counts), sum(counts), plan.C0, plan.C1
    num_rows = E * C0 + len(plan.over) * C1
    if not plan.over:  # (a list: faster than numpy at small E)
        main, start = [], 0
        for e, c in enumerate(counts):
            main.append(e * C0 - start)
            start += c
        dev = x_ND.device
        if dev.type == "cpu":  # the host is the device: the row map in numpy, no aten ops
            dest = torch.from_numpy(_host_row_map(main, counts))
        else:  # E shifts travel, the device expands them
            dest = torch.arange(total, device=dev) + host_to(torch.tensor(main), dev) \
                .repeat_interleave(tokens_per_expert_E, output_size=total)
        return _scatter_fed(x_ND, dest, num_rows), dest
    # per expert, from the host counts: the shift of its rows below C0 to the main tier,
    # of its rows from C0 on to the overflow tier, and where its row C0 is (packed)
    # (numpy: ~4x faster than a list of tuples at E = 64)
    dev = x_ND.device
    c = np.asarray(counts, dtype=np.int64)
    start = np.cumsum(c) - c
    main = np.arange(E, dtype=np.int64) * C0 - start
    over = np.asarray(plan.over, dtype=np.int64)
    shift = main.copy()
    shift[over] = E * C0 + np.arange(len(over), dtype=np.int64) * C1 - C0 - start[over]
    table = host_to(torch.from_numpy(np.stack([main, shift, start + C0], axis=1)), dev)
    rows = torch.arange(total, device=dev)
    t = table.repeat_interleave(tokens_per_expert_E, dim=0, output_size=total)
    dest = rows + torch.where(rows < t[:, 2], t[:, 0], t[:, 1])
    return _scatter_fed(x_ND, dest, num_rows), dest


def align_segments(
    x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, counts: list[int], multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(the segments each padded with zero rows to a multiple of ``multiple`` rows, one
    after the other; ``dest``: the padded row of each fed row; the int32 offsets of the
    padded segments), or None when they are aligned already with no trailing rows. The
    grouped GEMM then sees only lengths that are multiples of ``multiple`` (ROW_ALIGN)."""
    c = np.asarray(counts, dtype=np.int64)
    rounded = round_up(c, multiple)
    ends = np.cumsum(rounded)
    padded, total = int(ends[-1]) if len(c) else 0, int(c.sum())
    if padded == total == x_ND.shape[0]:
        return None
    # built on the host, where the counts are (CPU bf16, the one user: no aten ops)
    shift = ends - rounded - (np.cumsum(c) - c)
    dest = _host_row_map(shift, c)
    dev = x_ND.device
    dest_t = host_to(torch.from_numpy(dest), dev)
    offs = host_to(torch.from_numpy(ends.astype(np.int32)), dev)
    return _scatter_fed(x_ND, dest_t, padded), dest_t, offs


def unpad_segments(y_RF: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The fed rows of a padded result back in segment order, then zero trailing rows."""
    y = y_RF.index_select(0, dest)
    if y.shape[0] < num_rows:
        y = torch.cat([y, y.new_zeros(num_rows - y.shape[0], y.shape[1])])
    return y


class TieredBmm(torch.autograd.Function):
    """``y = x @ w[e]`` per block of padded rows laid out by a :class:`PadPlan`: one
    ``bmm`` over the main tier's E blocks and one over the overflow tier's blocks against
    their experts' gathered weights. Outputs and gradients are written in place (no
    ``cat``); the weight gradient is the main tier's ``bmm`` plus an ``index_add_`` of the
    overflow's (no full-size zero-filled gradient, as an autograd ``index_select`` of the
    weights would make)."""

    @staticmethod
    def forward(ctx, x_RD, w_EDF, C0, over_O, C1):
        E = w_EDF.shape[0]
        w_ODF = w_EDF.index_select(0, over_O)
        y = x_RD.new_empty(x_RD.shape[0], w_EDF.shape[2])
        for x_bCD, w_bDF, y_bCF in zip(_tiers(x_RD, E, C0, C1), (w_EDF, w_ODF),
                                       _tiers(y, E, C0, C1)):
            torch.bmm(x_bCD, w_bDF, out=y_bCF)
        ctx.tiers = (C0, C1)
        ctx.save_for_backward(x_RD, w_EDF, over_O, w_ODF)
        return y

    @staticmethod
    def backward(ctx, g_RF):
        x_RD, w_EDF, over_O, w_ODF = ctx.saved_tensors
        C0, C1 = ctx.tiers
        E = w_EDF.shape[0]
        g_main, g_over = _tiers(g_RF.contiguous(), E, C0, C1)
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = g_RF.new_empty(x_RD.shape)
            for g_bCF, w_bDF, gx_bCD in zip((g_main, g_over), (w_EDF, w_ODF),
                                            _tiers(g_x, E, C0, C1)):
                torch.bmm(g_bCF, w_bDF.transpose(1, 2), out=gx_bCD)
        if ctx.needs_input_grad[1]:
            x_main, x_over = _tiers(x_RD, E, C0, C1)
            g_w = torch.bmm(x_main.transpose(1, 2), g_main)
            g_w.index_add_(0, over_O, torch.bmm(x_over.transpose(1, 2), g_over))
        return g_x, g_w, None, None, None


def _tiers(t_R: torch.Tensor, E: int, C0: int, C1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The main tier ``[E, C0, .]`` and overflow tier ``[O, C1, .]`` views of padded rows."""
    M, n = E * C0, t_R.shape[1]
    return t_R[:M].view(E, C0, n), t_R[M:].view((t_R.shape[0] - M) // C1, C1, n)


def padded_swiglu(x_RD: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  plan: PadPlan) -> torch.Tensor:
    """``[R, D]``: the SwiGLU of padded rows laid out by ``plan``, each block against its
    expert's weights: three ``bmm`` (one tier) or three :class:`TieredBmm`."""
    if not plan.over:
        E, n = w1.shape[0], x_RD.shape[0]
        x_ECD = x_RD.view(E, plan.C0, x_RD.shape[1])
        h = F.silu(torch.bmm(x_ECD, w1)) * torch.bmm(x_ECD, w3)
        return torch.bmm(h, w2).view(n, -1)
    over = host_to(torch.from_numpy(np.asarray(plan.over, dtype=np.int64)), x_RD.device)
    args = (plan.C0, over, plan.C1)
    h = F.silu(TieredBmm.apply(x_RD, w1, *args)) * TieredBmm.apply(x_RD, w3, *args)
    return TieredBmm.apply(h, w2, *args)


class _SegmentMM(torch.autograd.Function):
    """One ``mm`` per expert segment written into preallocated outputs (``out=``): no
    ``cat``/``stack`` of the pieces in either direction. An expert with no rows gets a
    zero weight gradient (a ``[D, 0] @ [0, F]`` product); trailing rows are zero."""

    @staticmethod
    def forward(ctx, x_ND, w_EDF, counts):
        ctx.counts = counts
        ctx.save_for_backward(x_ND, w_EDF)
        y = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])
        xs, ys = _segments(x_ND, counts), _segments(y, counts)
        for x_e, w_e, y_e in zip(xs, w_EDF.unbind(0), ys):
            torch.mm(x_e, w_e, out=y_e)
        ys[-1].zero_()
        return y

    @staticmethod
    def backward(ctx, g_NF):
        x_ND, w_EDF = ctx.saved_tensors
        counts = ctx.counts
        g_x = g_w = None
        gs = _segments(g_NF, counts)
        if ctx.needs_input_grad[0]:
            g_x = g_NF.new_empty(x_ND.shape)
            gxs = _segments(g_x, counts)
            for g_e, w_e, gx_e in zip(gs, w_EDF.unbind(0), gxs):
                torch.mm(g_e, w_e.t(), out=gx_e)
            gxs[-1].zero_()
        if ctx.needs_input_grad[1]:
            g_w = g_NF.new_empty(w_EDF.shape)
            for x_e, g_e, gw_e in zip(_segments(x_ND, counts), gs, g_w.unbind(0)):
                torch.mm(x_e.t(), g_e, out=gw_e)
        return g_x, g_w, None


def _segments(t_N: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, ...]:
    """Views of the E expert segments of ``t_N``, then the trailing rows (maybe empty)."""
    return t_N.split([*counts, t_N.shape[0] - sum(counts)])


def grouped_mm_loop_unmasked(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """One matmul per expert segment (``counts``: the host copy of tokens_per_expert).
    Trailing rows come back zero, and so does their gradient. Under autocast the
    operands are cast as autocast casts a matmul's."""
    dtype = autocast_dtype(x_ND.device.type)
    if dtype is not None:
        x_ND, w_EDF = x_ND.to(dtype), w_EDF.to(dtype)
    with no_autocast(x_ND.device.type):
        return _SegmentMM.apply(x_ND, w_EDF, counts)


def contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    """``y``, whose incoming gradient is made contiguous (the CPU ``_grouped_mm`` backward
    rejects strided gradients, and ``where``/elementwise backwards keep a caller's
    strides). A tensor hook rather than an identity autograd Function: that one returned
    a view of ``y``, which FSDP2 warns about ("returned a view tensor ... can produce
    wrong gradients") when ``y`` is an FSDP-wrapped module's output, as the experts' is.
    Python-only cost: ``contiguous()`` of a contiguous gradient launches nothing."""
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


def grouped_mm_fused_unmasked(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor
) -> torch.Tensor:
    """``torch._grouped_mm`` on operands already in the compute dtype; ``offs_E``: int32
    cumulative counts. Rows past ``offs_E[-1]`` of the output and of the input gradient
    are left uninitialised (the caller masks them). The incoming gradient must be
    contiguous (wrap the last GEMM's output in :func:`contiguous_grad`)."""
    return torch._grouped_mm(x_ND, w_EDF, offs=offs_E)


# On CPU the offsets live in host memory: reading the total is free, and cutting the
# trailing rows off (none, when every row is fed) beats two full-size where() masks. Tests
# switch it off to run the device path (masks, no read) on CPU.
READ_TOTAL_ON_CPU = True


def fed_rows(
    x_ND: torch.Tensor, offs_E: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(x_ND with its trailing rows cut off or zeroed, ``finish``): run the grouped GEMMs
    on the first, then ``finish(y)`` returns their N-row output with the trailing rows
    zero (and their input gradient is zero too). No host sync off CPU."""
    N = x_ND.shape[0]
    if x_ND.device.type == "cpu" and READ_TOTAL_ON_CPU:
        total = int(offs_E[-1]) if offs_E.numel() else 0
        if total == N:
            return x_ND, contiguous_grad

        def pad(y: torch.Tensor) -> torch.Tensor:
            return torch.cat([contiguous_grad(y), y.new_zeros(N - total, y.shape[1])])

        # a slice's backward zero-fills the gradient of the rows cut off
        return x_ND[:total], pad
    # where(), not a multiply: the uninitialised rows may hold NaN.
    valid_N1 = (torch.arange(N, device=offs_E.device) < offs_E[-1]).unsqueeze(1)
    return torch.where(valid_N1, x_ND, 0), lambda y: torch.where(valid_N1, contiguous_grad(y), 0)


def grouped_mm_loop(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """Reference: one matmul per expert segment (host sync for the counts)."""
    return grouped_mm_loop_unmasked(x_ND, w_EDF, tokens_per_expert_E.tolist())


def grouped_mm_fused(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """``torch._grouped_mm`` with the trailing-row contract enforced (no host sync)."""
    dtype = autocast_dtype(x_ND.device.type)
    if dtype is not None:  # _grouped_mm is not on the autocast lists
        x_ND, w_EDF = x_ND.to(dtype), w_EDF.to(dtype)
    offs = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    x_ND, finish = fed_rows(x_ND, offs)
    return finish(grouped_mm_fused_unmasked(x_ND, w_EDF, offs))


def grouped_mm(
    x_ND: torch.Tensor,
    w_EDF: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """y_NF[rows of expert e] = x_ND[rows of expert e] @ w_EDF[e].

    impl: "auto" (fused when available, else loop) | "fused" | "loop".
    """
    if use_fused(x_ND, w_EDF, impl):
        return grouped_mm_fused(x_ND, w_EDF, tokens_per_expert_E)
    return grouped_mm_loop(x_ND, w_EDF, tokens_per_expert_E)
