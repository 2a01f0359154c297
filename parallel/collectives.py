"""The collectives parallel/ runs over a process group, in one place.

Plain (no autograd; dim 0 is the one gathered / scattered / exchanged):

- ``all_to_all(x, out_splits, in_splits, group)``: ``all_to_all_single`` with optional
  uneven splits (None: equal);
- ``all_gather(x, group)``: the group's tensors concatenated in group-rank order;
- ``reduce_scatter(x, group)``: the sum over the group, rank r keeping chunk r;
- ``all_reduce_sum(x, group)``: the sum over the group as a new tensor (``x`` is never
  modified); with one rank (or without torch.distributed) ``x`` itself.

With autograd (the backward is the adjoint collective):

- ``all_to_all_autograd``: backward is the reverse all-to-all;
- ``all_gather_autograd``: backward reduce-scatters the gradient;
- ``reduce_scatter_autograd``: backward all-gathers the gradient;
- ``sum_forward(x, group)``: all-reduce (sum) forward, identity backward;
- ``sum_backward(x, group)``: identity forward, all-reduce (sum) of the gradient backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_autograd",
    "all_reduce_sum",
    "all_to_all",
    "all_to_all_autograd",
    "reduce_scatter",
    "reduce_scatter_autograd",
    "sum_backward",
    "sum_forward",
]

# torch 2.13 renamed the tensor-in/tensor-out collectives (the old names warn).
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------- plain collectives
def all_to_all(
    x: torch.Tensor, out_splits: Optional[list[int]], in_splits: Optional[list[int]], group
) -> torch.Tensor:
    """Rows ``in_splits[p]`` of ``x`` go to rank p; ``out_splits[p]`` rows arrive from it."""
    n = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((n, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    _GATHER(out, x.contiguous(), group=group)
    return out


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    _SCATTER(out, x.contiguous(), group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over ``group`` in a new tensor; ``x`` itself when there is nothing to
    sum (one rank, or torch.distributed not initialised). No autograd (see
    :func:`sum_forward`)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


# ---------------------------------------------------------------- with autograd
class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.args = (in_splits, out_splits, group)
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        return all_to_all(g, *ctx.args), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group), None


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward (see ``TokenGroup.all_sum``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class _SumBackward(torch.autograd.Function):
    """Identity in forward, all-reduce (sum) of the gradient in backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_to_all_autograd(
    x: torch.Tensor, out_splits: Optional[list[int]], in_splits: Optional[list[int]], group
) -> torch.Tensor:
    """:func:`all_to_all`; the gradient takes the reverse exchange."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_gather_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`all_gather`; the gradient is reduce-scattered."""
    return _AllGather.apply(x, group)


def reduce_scatter_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`reduce_scatter`; the gradient is all-gathered."""
    return _ReduceScatter.apply(x, group)


def sum_forward(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward: a partial result every rank then
    uses whole, whose gradient each rank already holds in full."""
    return _SumForward.apply(x, group)


def sum_backward(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, gradient summed over ``group`` backward: a replicated tensor each
    rank applies to a different part of the data."""
    return _SumBackward.apply(x, group)
