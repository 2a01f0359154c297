"""Optional CUDA kernels for the Mamba mixer (``pip install moefold[mamba]``):
``mamba_ssm``'s ``selective_scan_fn`` and ``causal_conv1d``'s ``causal_conv1d_fn``.

``model.mamba.kernels``: ``auto`` uses them for CUDA tensors when importable (the first
CUDA call logs once which path runs and, if the import failed, why); ``cuda`` requires them
for CUDA tensors (a failed import raises, naming the package); ``torch`` never uses them.
The pure-PyTorch reference (models/mamba.py) runs otherwise, and always on CPU.

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
import logging
from collections.abc import Callable
from typing import Optional

import torch

log = logging.getLogger(__name__)

PACKAGES = {"scan": "mamba_ssm", "conv": "causal_conv1d"}


@functools.cache
def load(name: str) -> tuple[Optional[Callable], str]:
    """``(kernel, "")`` for ``scan`` / ``conv`` if its package imports, else ``(None,
    reason)``; tried once per process."""
    try:
        if name == "scan":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return selective_scan_fn, ""
        from causal_conv1d import causal_conv1d_fn
        return causal_conv1d_fn, ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


@functools.cache
def _announce(name: str, mode: str) -> None:
    """Log once which path a CUDA Mamba ``scan`` / ``conv`` takes (model.mamba.kernels)."""
    fn, why = load(name)
    if fn is not None:
        log.info("mamba %s: CUDA kernel from %s", name, PACKAGES[name])
    else:
        log.warning("mamba %s: pure-PyTorch reference on CUDA (model.mamba.kernels=%s; "
                    "%s not importable: %s)", name, mode, PACKAGES[name], why)


def _kernel(name: str, x: torch.Tensor, mode: str) -> Optional[Callable]:
    if mode == "torch" or not x.is_cuda:
        return None
    fn, why = load(name)
    if fn is None and mode == "cuda":
        raise RuntimeError(f"model.mamba.kernels=cuda but {PACKAGES[name]} is not importable "
                           f"({why}); install moefold[mamba] or set model.mamba.kernels=auto")
    _announce(name, mode)
    return fn


def scan_kernel(x: torch.Tensor, mode: str = "auto") -> Optional[Callable]:
    """``selective_scan_fn`` where it applies to ``x`` (a CUDA tensor), else None."""
    return _kernel("scan", x, mode)


def conv_kernel(x: torch.Tensor, mode: str = "auto") -> Optional[Callable]:
    """``causal_conv1d_fn`` where it applies to ``x`` (a CUDA tensor whose channel count is
    a multiple of 8, as its channel-last layout needs; config validation enforces that for
    ``cuda``), else None."""
    if mode == "auto" and x.shape[-1] % 8:
        return None
    return _kernel("conv", x, mode)


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
