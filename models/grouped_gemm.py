"""Grouped matmul over expert segments: rows of ``x_ND`` are grouped by expert, expert e
owning ``tokens_per_expert[e]`` consecutive rows. Rows past ``tokens_per_expert.sum()``
(dropped assignments a dispatcher parks at the end) belong to no expert: their output and
their input gradient are zero.

Two implementations, equal in values and gradients (tests/test_moe_layer.py):
- ``torch._grouped_mm`` (one kernel, no host sync) where it runs: CPU fp32/bf16/fp16 with
  16-byte aligned rows; CUDA bf16 on sm90+.
- the reference segment loop (a loop over experts, never over tokens). It needs the
  counts on the host, i.e. one device->host sync.
"""

from __future__ import annotations

import torch


def _contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    """``y``, whose incoming gradient is made contiguous (the CPU ``_grouped_mm`` backward
    rejects strided gradients). A tensor hook rather than an identity autograd Function:
    that one returned a view of ``y``, which FSDP2 warns about ("returned a view tensor
    ... can produce wrong gradients") when ``y`` is an FSDP-wrapped module's output, as
    the experts' is."""
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (after autocast casting)."""
    if not hasattr(torch, "_grouped_mm") or x.dim() != 2 or w.dim() != 3:
        return False
    dtype = _autocast_dtype(x.device.type) or x.dtype
    if x.device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    itemsize = dtype.itemsize
    # Every row of x, w[e] and the output must start on a 16-byte boundary.
    return (w.shape[1] * itemsize) % 16 == 0 and (w.shape[2] * itemsize) % 16 == 0


def grouped_mm_loop(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """Reference: one matmul per expert segment (host sync for the counts)."""
    counts = tokens_per_expert_E.tolist()
    total = sum(counts)
    # unbind, not w_EDF[e]: each indexing's backward would zero-fill a whole [E, D, F]
    # gradient (54% of the layer's time in fill_ at E=64); unbind's backward stacks once.
    w_D_F = w_EDF.unbind(0)
    outs = [seg @ w_D_F[e] for e, seg in enumerate(x_ND[:total].split(counts))]
    y = torch.cat(outs) if outs else x_ND[:0] @ w_EDF.sum(0)
    if total < x_ND.shape[0]:
        y = torch.cat([y, y.new_zeros(x_ND.shape[0] - total, y.shape[1])])
    return y


def grouped_mm_fused(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """``torch._grouped_mm`` with the trailing-row contract enforced (no host sync)."""
    dtype = _autocast_dtype(x_ND.device.type)
    if dtype is not None:  # _grouped_mm is not on the autocast lists
        x_ND, w_EDF = x_ND.to(dtype), w_EDF.to(dtype)
    offs = torch.cumsum(tokens_per_expert_E, 0)
    # Rows past the last offset come back uninitialised, and so does their gradient:
    # mask both with where() (NaN-safe, unlike a multiply). On CPU, reading the total is
    # free (no device), so the masks are skipped when every row belongs to an expert.
    if x_ND.device.type == "cpu" and int(offs[-1]) == x_ND.shape[0]:
        y = torch._grouped_mm(x_ND.contiguous(), w_EDF, offs=offs.to(torch.int32))
        return _contiguous_grad(y)
    valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs[-1]).unsqueeze(1)
    x_ND = torch.where(valid_N1, x_ND, 0).contiguous()
    y = torch._grouped_mm(x_ND, w_EDF, offs=offs.to(torch.int32))
    return torch.where(valid_N1, _contiguous_grad(y), 0)


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
    if impl == "loop" or (impl == "auto" and not grouped_mm_available(x_ND, w_EDF)):
        return grouped_mm_loop(x_ND, w_EDF, tokens_per_expert_E)
    if impl not in ("auto", "fused"):
        raise ValueError(f"grouped_mm impl={impl!r} is not one of 'auto', 'fused', 'loop'")
    return grouped_mm_fused(x_ND, w_EDF, tokens_per_expert_E)
