"""Give expert-parallel tensors their global shape for checkpoints (DCP resharding).

Under EP/ETP each rank holds a block of every routed-expert tensor as a plain tensor:
experts ``r*E_l ..`` (dim 0, over ``ep``) and, with ETP, an FFN slice (``w1``/``w3`` dim 2,
``w2`` dim 1, over ``etp``); with FSDP over ``edp`` that block is a DTensor sharded once
more along the hidden dim (``w1``/``w3`` dim 1, ``w2`` dim 2, see parallel/data_parallel.py),
so the three splits never share a dim. Saved as they are, DCP would treat the EP/ETP blocks
as replicas of one tensor and keep one. Before saving (and loading) we view each such
tensor as a DTensor on the expert mesh ``(edp, ep, etp)`` with its global shape
``[E, D, F]``, so any other layout can load it. The views share storage with the live
tensors, so DCP's in-place load writes straight into the parameters and optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from parallel.dims import ParallelDims
from parallel.expert_placement import placed_view


def _is_expert_key(key: str) -> bool:
    return ".experts." in key


def _ffn_dim(key: str) -> int:
    """The FFN (ETP-split) dim of an expert tensor named by ``key``: w1/w3 [E, D, F],
    w2 [E, F, D]."""
    return 1 if ".experts.w2" in key else 2


def _stride(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _expert_ids(key: str, placed: dict[str, list[int]]) -> list[int] | None:
    for prefix, ids in placed.items():
        if key.startswith(prefix + ".") or f".{prefix}." in key:
            return ids
    return None


def _global_view(t: torch.Tensor, key: str, dims: ParallelDims,
                 placed: dict[str, list[int]]) -> torch.Tensor:
    if t.ndim == 0:
        return t  # e.g. Adam's step counter
    ffn = _ffn_dim(key)
    edp_placement = Replicate()
    if isinstance(t, DTensor):  # FSDP over edp (see data_parallel)
        (edp_placement,) = t.placements
        assert edp_placement.is_shard() and edp_placement.dim not in (0, ffn), t.placements
    shape = list(t.shape)  # the edp-global shape of this rank's (ep, etp) block
    shape[0] *= dims.ep
    shape[ffn] *= dims.etp
    local = t.to_local() if isinstance(t, DTensor) else t
    mesh = dims.expert_mesh["edp", "ep", "etp"]
    placements = (edp_placement, Shard(0), Shard(ffn))
    view = DTensor.from_local(local, mesh, placements, run_check=False, shape=tuple(shape),
                              stride=_stride(shape))
    ids = _expert_ids(key, placed)
    return view if ids is None else placed_view(view, ids)


def _to_local(t: torch.Tensor, key: str, dims: ParallelDims) -> torch.Tensor:
    if not isinstance(t, DTensor) or t.device_mesh.mesh_dim_names != ("edp", "ep", "etp"):
        return t
    edp_placement = t.placements[0]
    if not edp_placement.is_shard():
        return _plain(t.to_local())
    shape = list(t.shape)  # back to the FSDP DTensor over edp
    shape[0] //= dims.ep
    shape[_ffn_dim(key)] //= dims.etp
    return DTensor.from_local(_plain(t.to_local()), dims.mesh("edp"), (edp_placement,),
                              run_check=False, shape=tuple(shape), stride=_stride(shape))


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor and not isinstance(
        t, torch.nn.Parameter) else t


def placed_expert_ids(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{experts module FQN: ids}`` for every expert block placed by an expert
    placement (``GroupedExperts.expert_ids``; not the contiguous block of its EP rank)."""
    out = {}
    for name, m in model.named_modules():
        ids = getattr(m, "expert_ids", None)
        if ids is not None:
            out[name.replace("_checkpoint_wrapped_module.", "")] = list(ids)
    return out


def _walk(obj: Any, fn, key: str | None = None) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            inner = key
            if inner is None and isinstance(k, str) and _is_expert_key(k):
                inner = k
            out[k] = _walk(v, fn, inner)
        return out
    if isinstance(obj, torch.Tensor) and key is not None:
        return fn(obj, key)
    return obj


def _sharded(dims: ParallelDims) -> bool:
    return dims.ep * dims.etp > 1


def expert_tensors_to_global(state: dict[str, Any], dims: ParallelDims,
                             placed: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Model/optimizer state dict (FQN-keyed) with expert tensors as global DTensors.
    ``placed``: ``{experts module FQN: logical ids}`` of layers whose experts are not
    a contiguous range (an expert placement, :func:`placed_expert_ids`)."""
    if not _sharded(dims):
        return state
    placed = placed or {}
    return _walk(state, lambda t, key: _global_view(t, key, dims, placed))


def expert_tensors_to_local(state: dict[str, Any], dims: ParallelDims) -> dict[str, Any]:
    """Undo :func:`expert_tensors_to_global` (for ``set_state_dict``)."""
    if not _sharded(dims):
        return state
    return _walk(state, lambda t, key: _to_local(t, key, dims))
