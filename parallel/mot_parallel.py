"""Tensor (and sequence) parallelism for Mixture-of-Transformers blocks (models/mot.py).

Each modality's projections are split like the dense ones (Megatron TP): ``wq``/``wk``/
``wv`` and ``w1``/``w3`` column-parallel (``[M, in, out]`` weights sharded on ``out``:
whole heads, whole FFN columns), ``wo`` and ``w2`` row-parallel (sharded on ``in``). The
weights are DTensors (``Shard(2)`` / ``Shard(1)`` on the tp mesh), so checkpoints reshard
and FSDP2 composes on top; the grouped matmul runs on the local shard
(``ModalityLinear.weight_fn``). The block's communication is the seam
``MoTBlock.region``:

- plain TP: the block-part input is the replicated stream (``enter``: identity forward,
  all-reduce of the input gradient), the partial output is all-reduced (``exit``);
- SP: the stream is sharded on the sequence dim; ``enter`` all-gathers it (reduce-scatter
  backward), ``exit`` reduce-scatters the partial output (all-gather backward), and the
  branch norms run on the rank's sequence chunk with its modality ids.

Replicated weights that see only part of the data have their gradients summed over TP:
the per-head QK-norms always (each rank holds other heads), the branch norms under SP
(each rank holds other tokens). The embedding, final norm and head use the dense plan
(parallel/tensor_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from models.modality import ModalityLinear, Region
from models.mot import MoTBlock
from parallel.collectives import (
    all_gather_autograd,
    reduce_scatter_autograd,
    sum_backward,
    sum_forward,
)

__all__ = ["TPRegion", "apply_mot_tensor_parallel", "shard_parameter", "to_local"]

_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "ffn.w1", "ffn.w3")
_ROW = ("attention.wo", "ffn.w2")


def _seq_first(fn, x: torch.Tensor, group) -> torch.Tensor:
    """Apply a dim-0 collective to the sequence dim (1) of ``x [B, T, ...]``."""
    return fn(x.movedim(1, 0), group).movedim(0, 1)


class TPRegion(Region):
    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sp = group, sequence_parallel
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:
            return _seq_first(all_gather_autograd, x, self.group)
        return sum_backward(x, self.group)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        if self.sp:
            return _seq_first(reduce_scatter_autograd, y, self.group)
        return sum_forward(y, self.group)

    def local(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if not self.sp:
            return ids_BT
        return ids_BT.unflatten(1, (self.size, -1))[:, self.rank]

    def shared_out(self, w: torch.Tensor) -> torch.Tensor:
        return self.shared_in(w) if self.sp else w

    def shared_in(self, w: torch.Tensor) -> torch.Tensor:
        return sum_backward(w, self.group) if w.requires_grad else w

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        return sum_backward(sum_forward(y, self.group), self.group)


def to_local(w: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor parameter (``ModalityLinear.weight_fn``, Mamba's
    ``local``)."""
    return w.to_local()


def shard_parameter(module: nn.Module, name: str, tp_mesh: DeviceMesh, dim: int) -> None:
    """Replace parameter ``name`` (dotted, under ``module``) by a ``Shard(dim)`` DTensor cut
    from the full tensor every rank holds (no communication), or a meta one (parallelize:
    sharded initialisation fills the shard afterwards)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    p = getattr(owner, attr)
    w = distribute_tensor(p.detach(), tp_mesh, [Shard(dim)], src_data_rank=None)
    setattr(owner, attr, nn.Parameter(w, requires_grad=p.requires_grad))


def apply_mot_tensor_parallel(block: MoTBlock, tp_mesh: DeviceMesh, *,
                              sequence_parallel: bool) -> None:
    """Shard one MoT block over the 1-D ``tp_mesh`` in place."""
    for names, dim in ((_COLUMN, 2), (_ROW, 1)):
        for name in names:
            shard_parameter(block, f"{name}.weight", tp_mesh, dim)
            lin: ModalityLinear = block.get_submodule(name)
            lin.weight_fn = to_local
    block.region = TPRegion(tp_mesh.get_group(), sequence_parallel)
