"""Expert parallelism: shard every MoE layer's routed experts over the EP group.

Rank ``r`` of the EP group keeps the contiguous global experts ``r*E_l .. r*E_l + E_l - 1``
(``E_l = E / ep``) — the same placement the dispatchers assume — and sets
``GroupedExperts.expert_offset`` so that ``init_weights()`` seeds each local expert by its
global name: a meta-device model sharded here and initialised later equals the slice of
the unsharded model. The router, shared experts and everything dense stay replicated.

Call it before building the optimizer (the expert tensors are replaced) and before
FSDP/DDP wrapping. Expert gradients then hold the contributions of every EP rank's tokens;
they are reduced over ``edp`` only (see DESIGN.md §3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.moe import MoELayer
from parallel.dims import ParallelDims
from parallel.dispatch import make_dispatcher
from trainer.errors import ConfigError

__all__ = ["apply_expert_parallel", "gather_expert_weights", "local_expert_range", "moe_layers"]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """``model.moe_layers()`` when the model has it, else every MoELayer it contains."""
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_expert_parallel(
    model: nn.Module, dims: ParallelDims, dispatcher: str = "alltoall", *, dedup: bool = True
) -> list[MoELayer]:
    """Slice each MoE layer's experts to this EP rank and install the EP dispatcher.

    ``dispatcher``: alltoall | allgather; ``dedup`` applies to alltoall. Works on an
    initialised model (the real weights are sliced and copied) and on a meta-device one.
    With ``dims.ep == 1`` nothing changes. Returns the layers it touched.
    """
    if dims.etp != 1:
        raise NotImplementedError(
            f"parallel.etp={dims.etp}: tensor-parallel experts (ETP > 1) are not implemented "
            "yet; use parallel.etp=1"
        )
    if dispatcher not in ("alltoall", "allgather"):
        raise ConfigError(
            f"parallel.dispatcher={dispatcher!r} is not valid (valid: alltoall, allgather)"
        )
    layers = moe_layers(model)
    ep = dims.ep
    for layer in layers:
        E = layer.experts.w1.shape[0]
        if getattr(layer.experts, "ep_size", 1) != 1 or E != layer.moe.num_experts:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
        if E % ep:
            valid = ", ".join(str(d) for d in range(1, E + 1) if E % d == 0)
            raise ConfigError(
                f"parallel.ep={ep} does not divide model.moe.num_experts={E} (valid ep: {valid})"
            )
    if ep == 1:
        return layers

    group = dims.group("ep")
    ep_rank = dims.coords()["ep"]
    if dist.get_rank(group) != ep_rank:  # local check: mesh order == rank math
        raise RuntimeError(f"ep group rank {dist.get_rank(group)} != ep coordinate {ep_rank}")
    for layer in layers:
        ex = layer.experts
        E = ex.w1.shape[0]
        ids = local_expert_range(E, ep, ep_rank)
        for name in ("w1", "w3", "w2"):
            p = getattr(ex, name)
            # clone: drop the reference to the full tensor so its memory can be freed.
            local = p.detach()[ids.start : ids.stop].clone()
            setattr(ex, name, nn.Parameter(local, requires_grad=p.requires_grad))
        ex.expert_offset = ids.start
        ex.ep_size = ep
        ex.num_global_experts = E
        layer.dispatcher = make_dispatcher(dispatcher, group, E, dedup=dedup)
    return layers


def local_expert_range(num_experts: int, ep: int, ep_rank: int) -> range:
    """Global ids of the experts EP rank ``ep_rank`` holds."""
    n_local = num_experts // ep
    return range(ep_rank * n_local, (ep_rank + 1) * n_local)


@torch.no_grad()
def gather_expert_weights(layer: MoELayer, group) -> dict[str, torch.Tensor]:
    """The full [E, ...] expert tensors of a sharded layer (all-gather over ``group``);
    for tests and export."""
    out = {}
    for name in ("w1", "w3", "w2"):
        p = getattr(layer.experts, name).detach().contiguous()
        parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, p, group=group)
        out[name] = torch.cat(parts)
    return out
