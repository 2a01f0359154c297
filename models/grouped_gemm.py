"""Grouped matmul over expert segments: rows of ``x_ND`` are grouped by expert, expert e
owning ``tokens_per_expert[e]`` consecutive rows. Rows past ``tokens_per_expert.sum()``
(dropped assignments a dispatcher parks at the end) belong to no expert: their output and
their input gradient are zero.

Two implementations, equal in values and gradients (tests/test_moe_layer.py):
- ``torch._grouped_mm`` (one kernel, no host sync) where it runs: CPU fp32/bf16/fp16 with
  16-byte aligned rows; CUDA bf16 on sm90+.
- the reference segment loop (a loop over experts, never over tokens). It needs the
  counts on the host, i.e. one device->host sync.

A layer of several GEMMs over the same segments (``models.moe.GroupedExperts``) computes
the offsets (or the host counts) once, handles the trailing rows once on entry and once
on exit (:func:`fed_rows`), and calls the ``*_unmasked`` kernels in between: a trailing
row's garbage is only ever read by the next grouped GEMM, which skips rows past the last
offset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` if autocast is on there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (after autocast casting)."""
    if not hasattr(torch, "_grouped_mm") or x.dim() != 2 or w.dim() != 3:
        return False
    dtype = autocast_dtype(x.device.type) or x.dtype
    if x.device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    itemsize = dtype.itemsize
    # Every row of x, w[e] and the output must start on a 16-byte boundary.
    return (w.shape[1] * itemsize) % 16 == 0 and (w.shape[2] * itemsize) % 16 == 0


def use_fused(x: torch.Tensor, w: torch.Tensor, impl: str) -> bool:
    """impl "auto" (fused when available) | "fused" | "loop" -> whether to run fused."""
    if impl not in ("auto", "fused", "loop"):
        raise ValueError(f"grouped_mm impl={impl!r} is not one of 'auto', 'fused', 'loop'")
    return impl == "fused" or (impl == "auto" and grouped_mm_available(x, w))


def grouped_mm_loop_unmasked(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """One matmul per expert segment (``counts``: the host copy of tokens_per_expert).
    Trailing rows come back zero, and so does their gradient (a slice's backward)."""
    total = sum(counts)
    # unbind, not w_EDF[e]: each indexing's backward would zero-fill a whole [E, D, F]
    # gradient (54% of the layer's time in fill_ at E=64); unbind's backward stacks once.
    w_D_F = w_EDF.unbind(0)
    outs = [seg @ w_D_F[e] for e, seg in enumerate(x_ND[:total].split(counts))]
    y = torch.cat(outs) if outs else x_ND[:0] @ w_EDF.sum(0)
    if total < x_ND.shape[0]:
        y = torch.cat([y, y.new_zeros(x_ND.shape[0] - total, y.shape[1])])
    return y


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
