"""Give expert-parallel tensors their global shape for checkpoints (DCP resharding).

Under EP each rank holds a contiguous slice of the experts (``w1[E_local, D, F]``) as a
plain tensor, or, with FSDP over ``edp``, a DTensor sharded along dim 1 of that slice.
Saved as they are, DCP would treat the EP slices as replicas of one tensor and keep one.
Before saving (and loading) we view each such tensor as a DTensor on the expert mesh:
``Shard(0)`` over ``ep`` (and ``Shard(1)`` over ``edp`` when FSDP shards it), so the
checkpoint holds the full ``[E, D, F]`` tensor and any other layout can load it.
The views share storage with the live tensors, so DCP's in-place load writes straight
into the parameters and optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from parallel.dims import ParallelDims


def _is_expert_key(key: str) -> bool:
    return ".experts." in key


def _global_view(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    if t.ndim == 0:
        return t  # e.g. Adam's step counter
    if isinstance(t, DTensor):  # FSDP over edp, sharded on dim 1 (see data_parallel)
        local, edp_placement = t.to_local(), t.placements[0]
        assert edp_placement == Shard(1), f"unexpected FSDP placement {t.placements}"
        shape = (t.shape[0] * dims.ep, *t.shape[1:])
        mesh = dims.expert_mesh["edp", "ep"]
        placements = (Shard(1), Shard(0))
    else:
        local = t
        shape = (t.shape[0] * dims.ep, *t.shape[1:])
        mesh = dims.mesh("ep")
        placements = (Shard(0),)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=stride)


def _walk(obj: Any, fn, under_expert: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _walk(v, fn, under_expert or (isinstance(k, str) and _is_expert_key(k)))
                for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) and under_expert:
        return fn(obj)
    return obj


def expert_tensors_to_global(state: dict[str, Any], dims: ParallelDims) -> dict[str, Any]:
    """Model/optimizer state dict (FQN-keyed) with expert tensors as global DTensors."""
    if dims.ep == 1:
        return state
    return _walk(state, lambda t: _global_view(t, dims))


def expert_tensors_to_local(state: dict[str, Any], dims: ParallelDims) -> dict[str, Any]:
    """Undo :func:`expert_tensors_to_global` (for ``set_state_dict``)."""
    if dims.ep == 1:
        return state

    def local(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor) or t.device_mesh.ndim == 1 and "ep" not in (
            t.device_mesh.mesh_dim_names or ()
        ):
            return t
        if t.device_mesh.ndim == 2:  # back to the FSDP DTensor over edp
            edp_mesh = dims.mesh("edp")
            shape = (t.shape[0] // dims.ep, *t.shape[1:])
            return DTensor.from_local(t.to_local(), edp_mesh, (Shard(1),), run_check=False,
                                      shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())
        return t.to_local()

    return _walk(state, local)
