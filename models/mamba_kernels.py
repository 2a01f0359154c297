"""Optional CUDA kernels for the Mamba mixer (``pip install moefold[mamba]``):
``mamba_ssm``'s ``selective_scan_fn`` and ``causal_conv1d``'s ``causal_conv1d_fn``.

They are used for CUDA tensors when importable and ``model.mamba.kernels=auto``; the
pure-PyTorch reference (models/mamba.py) runs otherwise, and always on CPU.

- conv: the kernel's channel-last layout, with the document ids as ``seq_idx``, so a tap
  never reads another document (as the reference).
- scan: Mamba-1's kernel has no state reset, so a micro-batch that carries document ids
  (packed documents) uses the reference scan; one without them uses the kernel. Δ is
  passed already computed (softplus of the per-modality ``dt_proj`` plus its bias), so the
  kernel's own ``delta_bias`` / ``delta_softplus`` are off.

The adapters below only change layouts (ours ``[B, T, C]``, the kernels' ``[B, C, T]``) and
dtypes (the kernels want u, Δ, B, C in one input dtype, A and D in fp32). Their contract is
checked on CPU against stand-ins that implement the kernels' documented semantics, and on
CUDA against the reference where the packages are installed (tests/test_mamba.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch


@functools.cache
def _load(name: str) -> Optional[Callable]:
    """The kernel ``scan`` or ``conv`` if its package imports, else None (tried once)."""
    try:
        if name == "scan":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return selective_scan_fn
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn
    except ImportError:
        return None


def scan_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``selective_scan_fn`` where it applies to ``x`` (a CUDA tensor), else None."""
    return _load("scan") if x.is_cuda else None


def conv_kernel(x: torch.Tensor) -> Optional[Callable]:
    """``causal_conv1d_fn`` where it applies to ``x`` (a CUDA tensor), else None."""
    return _load("conv") if x.is_cuda else None


def kernel_scan(fn: Callable, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """As ``models.mamba.selective_scan`` without resets: u, delta [Bt, T, Dn]; B, C
    [Bt, T, N] -> y [Bt, T, Dn] in u's dtype."""
    dt = u.dtype

    def channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt).transpose(1, 2).contiguous()

    y = fn(channels_first(u), channels_first(delta), A.float().contiguous(),
           channels_first(B), channels_first(C), D.float().contiguous(),
           z=None, delta_bias=None, delta_softplus=False)
    return y.transpose(1, 2)


def kernel_conv(fn: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """As ``models.mamba.causal_conv1d``: x [B, T, Dn] -> [B, T, Dn]. The kernel reads
    ``x`` channel-last (``[B, Dn, T]`` with channel stride 1), the layout in which it
    accepts ``seq_idx``."""
    xt = x.contiguous().transpose(1, 2)
    seq_idx = None if doc_ids is None else doc_ids.to(torch.int32).contiguous()
    out = fn(xt, weight.to(x.dtype), bias.to(x.dtype), seq_idx=seq_idx, activation=None)
    return out.transpose(1, 2)
