"""Expert parallelism: shard every MoE layer's routed experts over the EP and ETP groups.

Rank ``r`` of the EP group keeps the contiguous global experts ``r*E_l .. r*E_l + E_l - 1``
(``E_l = E / ep``) — the same placement the dispatchers assume — or, with a placement
(parallel/expert_placement.py), the experts of its slots, and sets
``GroupedExperts.expert_ids`` so that ``init_weights()`` seeds each local expert by its
global name: a meta-device model sharded here and initialised later equals the slice of
the unsharded model. With ``etp > 1`` rank q of the ETP group also keeps only the FFN
slice ``q*F/etp .. (q+1)*F/etp`` (``w1``/``w3`` columns, ``w2`` rows; ``ffn_offset``) and
the dispatcher is wrapped in ``ETPDispatcher``. The router, shared experts and everything
dense stay replicated.

Call it before building the optimizer (the expert tensors are replaced) and before
FSDP/DDP wrapping. Expert gradients then hold the contributions of every EP rank's tokens;
they are reduced over ``edp`` only (see DESIGN.md §3).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from models.moe import LocalDispatcher, MoELayer
from parallel.dims import ParallelDims, divisors
from parallel.dispatch import make_dispatcher
from parallel.etp_dispatch import ETPDispatcher
from parallel.expert_placement import PlacedDispatcher, Placement, moe_layer_names

__all__ = [
    "DISPATCHERS",
    "apply_expert_parallel",
    "check_expert_parallel",
    "gather_expert_weights",
    "local_expert_range",
    "moe_layers",
]

DISPATCHERS = ("alltoall", "allgather")


def check_expert_parallel(num_experts: int | list[int], expert_ffn: int, ep: int, etp: int,
                          dispatcher: str) -> None:
    """Raise ``ValueError`` (one line naming the keys) when the routed experts cannot be
    split ``ep`` ways (whole experts) and ``etp`` ways (the expert FFN dim).
    ``num_experts``: one count, or each layer's (``models.config.experts_per_layer``; 0 on
    dense layers): every MoE layer's count must divide by ``ep``."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"parallel.dispatcher={dispatcher!r} is not one of "
                         f"{', '.join(map(repr, DISPATCHERS))}")
    per_layer = not isinstance(num_experts, int)
    counts = list(num_experts) if per_layer else [num_experts]
    moe = [(i, E) for i, E in enumerate(counts) if E]
    if ep > 1 and not moe:
        raise ValueError(f"parallel.ep={ep} does not divide model.moe.num_experts=0")
    for i, E in moe:
        if ep > 1 and E % ep:
            key = f"model.moe.num_experts[{i}]" if per_layer else "model.moe.num_experts"
            raise ValueError(f"parallel.ep={ep} does not divide {key}={E} "
                             f"(valid: {divisors(E)})")
    if etp > 1 and (not moe or expert_ffn % etp):
        raise ValueError(
            f"parallel.etp={etp} does not divide model.moe.expert_ffn_hidden_size={expert_ffn}"
            + (f" (valid: {divisors(expert_ffn)})" if moe else
               " (the model has no experts)"))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """``model.moe_layers()`` when the model has it, else every MoELayer it contains."""
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_expert_parallel(
    model: nn.Module, dims: ParallelDims, dispatcher: str = "alltoall", *, dedup: bool = True,
    placement: Optional[Placement] = None,
) -> list[MoELayer]:
    """Slice each MoE layer's experts to this EP (and ETP) rank and install the dispatcher.

    ``dispatcher``: alltoall | allgather (over the EP group); ``dedup`` applies to
    alltoall. Works on an initialised model (the real weights are sliced and copied) and
    on a meta-device one. With ``ep == etp == 1`` nothing changes. Returns the layers.
    ``placement`` (parallel/expert_placement.py): which experts each EP rank holds;
    None = contiguous.
    The sizes must pass :func:`check_expert_parallel` (config validation runs it).
    """
    layers = moe_layers(model)
    ep, etp = dims.ep, dims.etp
    for layer in layers:
        if layer.experts.ep_size != 1 or layer.experts.w1.shape[0] != layer.moe.num_experts:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
    if ep == 1 and etp == 1:
        return layers

    coords = dims.coords()
    ep_rank, etp_rank = coords["ep"], coords["etp"]
    for kind, rank in (("ep", ep_rank), ("etp", etp_rank)):
        if dims.size(kind) > 1 and dist.get_rank(dims.group(kind)) != rank:
            raise RuntimeError(f"{kind} group rank != {kind} coordinate {rank}")
    named = moe_layer_names(model)
    names = {id(m): n for n, m in named.items()}
    if placement is not None and dims.pp == 1:  # a stage holds only some of the layers
        placement.check({n: m.experts.w1.shape[0] for n, m in named.items()},
                        placement.info.get("source", "the placement"))
    for layer in layers:
        ex = layer.experts
        E, F = ex.w1.shape[0], ex.w1.shape[2]
        slots = list(range(E))
        if placement is not None:  # each rank's experts ascending: local j = slot r*E_l + j
            raw, n = placement.slots(names[id(layer)], E), E // ep
            slots = [e for r in range(ep) for e in sorted(raw[r * n:(r + 1) * n])]
        ids = slots[ep_rank * (E // ep):(ep_rank + 1) * (E // ep)]
        F_l = F // etp
        f0 = etp_rank * F_l
        rows = torch.tensor(ids)
        for name, ffn_dim in (("w1", 2), ("w3", 2), ("w2", 1)):
            p = getattr(ex, name)
            local = p.detach().index_select(0, rows.to(p.device)).narrow(ffn_dim, f0, F_l)
            # clone: drop the reference to the full tensor so its memory can be freed.
            setattr(ex, name, nn.Parameter(local.clone(), requires_grad=p.requires_grad))
        ex.expert_offset = ids[0]
        ex.expert_ids = ids if slots != list(range(E)) else None  # None: the contiguous block
        ex.ffn_offset, ex.ffn_full = f0, F
        ex.ep_size, ex.etp_size = ep, etp
        ex.num_global_experts = E
        inner = (make_dispatcher(dispatcher, dims.group("ep"), E, dedup=dedup)
                 if ep > 1 else LocalDispatcher())
        layer.dispatcher = ETPDispatcher(inner, dims.group("etp")) if etp > 1 else inner
        if slots != list(range(E)):
            physical_of = torch.empty(E, dtype=torch.long)
            physical_of[torch.tensor(slots)] = torch.arange(E)
            layer.dispatcher = PlacedDispatcher(layer.dispatcher, physical_of)
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
