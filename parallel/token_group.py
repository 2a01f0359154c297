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
from parallel.collectives import all_gather, sum_backward, sum_forward

__all__ = ["SeqChunkGroup", "gather_seq"]


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather along ``dim`` in group-rank order, no autograd."""
    return all_gather(x.detach().movedim(dim, 0), group).movedim(0, dim)


class SeqChunkGroup(TokenGroup):
    """Rank r of ``group`` holds positions ``r*S/size .. (r+1)*S/size`` of every sequence
    (the TP/SP token split)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return sum_forward(x, self.group)

    def gather_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return gather_seq(x_BS, self.group)

    def local_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return x_BS.unflatten(1, (self.size, -1))[:, self.rank]

    def shared_param(self, w: torch.Tensor) -> torch.Tensor:
        if not w.requires_grad:
            return w
        return sum_backward(w, self.group)
