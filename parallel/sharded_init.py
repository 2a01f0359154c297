"""Sharded initialisation: materialise only this rank's shards and give them the values
of the single-process model.

``parallelize()`` applies every layout transform (PP stage, EP/ETP, TP/SP, CP, AC, the
PP chunks, FSDP2) to the meta-device model, then calls :func:`materialize_and_init`:

1. ``to_empty`` allocates the local storage only — a DTensor parameter allocates its local
   shard (FSDP2 re-pads its sharded storage in its ``_apply`` hook, so every FSDP root is
   materialised through its own ``to_empty``);
2. ``model.init_weights(locate=dtensor_locate)`` runs the model's name-keyed initialiser
   (models/layers.py ``Initializer``) with a ``locate`` that maps each DTensor to its local
   shard and that shard's index in the global tensor (from the placements:
   ``compute_local_shape_and_global_offset``; FSDP2's ``_StridedShard`` over a TP
   ``Shard`` is a contiguous block too). The initialiser then fills the shard: random
   tensors are drawn whole from their own generator into one temporary and the shard is
   copied out (experts and modalities are drawn one row at a time and only the held rows),
   constants and computed values (norm weights, Mamba ``A_log``/``D``) are written to the
   shard directly.

Peak memory per rank: its shards plus the largest single tensor (or expert row) drawn.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.layers import Index, locate_whole

__all__ = ["dtensor_locate", "materialize_and_init"]


def dtensor_locate(t: torch.Tensor) -> Optional[tuple[torch.Tensor, Index, tuple[int, ...]]]:
    """``models.layers.Locate`` for DTensors: (the local shard, its index in the global
    tensor, the global shape); plain tensors are held whole; meta ones are skipped."""
    if not isinstance(t, DTensor):
        return locate_whole(t)
    local = t.to_local()
    if local.is_meta:
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"DTensor local shard {tuple(local.shape)} != computed {shape} "
                           f"({t.placements})")
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return local, index, tuple(t.shape)


def materialize_and_init(model: nn.Module, roots: list[nn.Module], device: torch.device,
                         seed: int) -> None:
    """Allocate ``model``'s local storage on ``device`` and initialise it from ``seed``
    exactly as the single-process model (``torch.manual_seed(seed); init_weights()``)."""
    model.to_empty(device=device)
    for root in roots:
        if root is not model:  # PP chunks: FSDP roots that share model's submodules
            root.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(locate=dtensor_locate)
