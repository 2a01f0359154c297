"""``TokenGroup`` implementations: ranks that split one micro-batch's tokens.

Under tensor parallelism every MoE layer routes only a 1/tp slice of each sequence per TP
rank (sequence parallelism hands it that slice already; plain TP cuts it from the
replicated stream), so the router's statistics and capacity decisions are reduced over the
TP group (models/router.py explains what is summed and why the result equals one process).
Context parallelism's group, whose chunks are not contiguous, is
``parallel.context_parallel.IndexedSeqGroup``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.router import TokenGroup
from parallel.dispatch import _all_gather

__all__ = ["SeqChunkGroup", "gather_seq"]


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather along ``dim`` in group-rank order, no autograd."""
    return _all_gather(x.detach().movedim(dim, 0), group).movedim(0, dim)


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


class SeqChunkGroup(TokenGroup):
    """Rank r of ``group`` holds positions ``r*S/size .. (r+1)*S/size`` of every sequence
    (the TP/SP token split)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumForward.apply(x, self.group)

    def gather_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return gather_seq(x_BS, self.group)

    def local_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return x_BS.unflatten(1, (self.size, -1))[:, self.rank]

    def shared_param(self, w: torch.Tensor) -> torch.Tensor:
        if not w.requires_grad:
            return w
        return _SumBackward.apply(w, self.group)
