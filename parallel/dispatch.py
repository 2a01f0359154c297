"""Expert-parallel token dispatchers: ``AllToAllDispatcher`` and ``AllGatherDispatcher``.

Both fill the ``Dispatcher`` seam of models/moe.py for a layer whose experts are sharded
over an EP group of P ranks (rank p owns global experts ``p*E_l .. p*E_l + E_l - 1``).

All-to-all, one *unit* = one token row sent to one rank:

1. Source: a stable argsort of the units by destination rank (ties: token, then slot).
   ``dedup=True``: a token whose kept top-k experts include several on one rank sends one
   unit there, carrying the local expert ids and the fp32 routing weights of all those
   assignments (metadata, ``min(k, E_l)`` slots). ``dedup=False``: one unit per kept
   assignment (metadata: its local expert id), as Megatron's alltoall dispatcher.
   Dropped assignments are never sent.
2. Counts: one ``all_to_all_single`` of a [P, 1 + E_l] int tensor (units and assignments
   per local expert, for each destination). Then the only host sync of the layer: one
   ``.tolist()`` of the splits, placed after every size-independent device op (argsorts,
   index maps) so the GPU has work queued while the host waits; an ETP wrapper adds its
   own counts to that same transfer (``host_counts``). Counting is a scatter-add, not
   ``bincount`` (whose CUDA kernel reads the maximum back to the host). ``combine``
   reuses the splits and is sync-free. With ``pad_to_capacity`` there is no count
   exchange (the static rows' grouping may still count once: models/permute.py).
3. Token rows and metadata: ``all_to_all_single`` with uneven splits, inside autograd
   Functions whose backward is the reverse all-to-all. With ``overlap`` (default) the
   exchange is asynchronous: ``dispatch_steps`` pauses between launch and wait
   (models/steps.py), where the MoE layer runs its shared experts and the two-batch
   overlap the other micro-batch's work; in backward
   the reverse exchange is launched
   where the rows' gradient is ready and waited for only where the sent rows' gradient
   is needed, so the shared experts' backward (and any other independent node autograd
   schedules in between) runs while it travels. Rows travel in the autocast dtype when
   autocast is on (the residual stream is fp32); combine still sums in fp32.
4. Destination: the received (unit, slot) assignments are stably sorted by (local expert,
   source rank), i.e. the chunks [source, expert] become [expert, source], and fanned out
   into rows grouped by local expert.
5. ``combine`` is the exact reverse (``combine_steps`` pauses while the rows travel,
   with ``overlap``). dedup: each destination sums ``w * y`` over a unit's
   slots in fp32 and returns one row per unit (in y's dtype); the source sums its units.
   plain: destinations return the expert rows unweighted and the source computes
   ``sum_k w * y`` in fp32 exactly as ``LocalDispatcher`` (same reduce_rows, same order).

Padding (``pad_to_capacity``; capacity C comes from the router on the *local* tokens, so
every EP rank must hold the same number of tokens T): shapes are static. Expert rows are
[E_l, P, C]: each local expert gets exactly ``P * C`` rows, a block of C per source rank
(Megatron's drop-and-pad layout); the wire carries exactly U units per rank pair, U =
``E_l * C`` (plain) or ``min(T, E_l * C)`` (dedup); unused rows are zeros.

Gathers and sums go through ``models.permute`` (``SlotMap``, ``gather_rows``,
``reduce_rows``), the same code as ``LocalDispatcher``: every gather has a hand-written
backward that sums a source's slots in a fixed order in fp32 (no atomics, no index_add),
so gradients are deterministic on every device.

``bytes_sent`` / ``bytes_received``: activation bytes (token rows) that crossed ranks in
the last dispatch + combine; rows a rank sends to itself are not counted, padding rows are.
``meta_bytes_sent``: the metadata of the same units (not the [P, 1 + E_l] counts). The
backward pass moves the same amounts again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from models.moe import Dispatcher
from models.permute import SlotMap, count_ids, gather_rows, group_rows, reduce_rows
from models.router import Routing
from models.steps import run
from parallel.collectives import (
    all_gather_autograd,
    all_to_all,
    all_to_all_autograd,
    reduce_scatter_autograd,
)

__all__ = [
    "AllGatherContext",
    "AllGatherDispatcher",
    "AllToAllContext",
    "AllToAllDispatcher",
    "make_dispatcher",
    "set_dispatch_overlap",
]


# ---------------------------------------------------------------- helpers
def _wire(x: torch.Tensor) -> torch.Tensor:
    """Rows as they travel: the autocast compute dtype when autocast is on (the fp32
    residual stream would otherwise double the bytes); the experts compute in it anyway."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.is_floating_point() and x.dtype != dt:
            return x.to(dt)
    return x


@dataclass(eq=False)
class _InFlight:
    """One asynchronous all-to-all and its reverse (see :func:`_a2a_start`)."""

    out_splits: Optional[list[int]]
    in_splits: Optional[list[int]]
    group: Any
    owner: Any  # the dispatcher: counts exchanges in flight (``in_flight``)
    work: Any = None
    keep: list = field(default_factory=list)  # buffers gloo/NCCL reads until the wait
    bwd_work: Any = None
    bwd_out: Optional[torch.Tensor] = None


def _launch(x: torch.Tensor, out_splits, in_splits, group, keep: list):
    n = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((n, *x.shape[1:]))
    x = x.contiguous()
    keep.append(x)
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return out, work


class _A2AStart(torch.autograd.Function):
    """Forward: launch the exchange, return its (still filling) output. Backward: wait for
    the reverse exchange that ``_A2AWait``'s backward launched."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: _InFlight) -> torch.Tensor:
        ctx.f = f
        out, f.work = _launch(x, f.out_splits, f.in_splits, f.group, f.keep)
        f.owner.in_flight += 1
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        f = ctx.f
        if f.bwd_work is None:  # not launched early (cannot happen in one graph; safe)
            return all_to_all(g, f.in_splits, f.out_splits, f.group), None
        f.bwd_work.wait()
        f.owner.in_flight -= 1
        out, f.bwd_work, f.bwd_out, f.keep = f.bwd_out, None, None, []
        return out, None


class _A2AWait(torch.autograd.Function):
    """Forward: wait for the exchange (the output is the same tensor). Backward: launch
    the reverse exchange of the gradient and pass a placeholder on to ``_A2AStart``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, f: _InFlight) -> torch.Tensor:
        ctx.f = f
        f.work.wait()
        f.owner.in_flight -= 1
        f.work, f.keep = None, []
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        f = ctx.f
        f.bwd_out, f.bwd_work = _launch(g, f.in_splits, f.out_splits, f.group, f.keep)
        f.owner.in_flight += 1
        return g, None


def _a2a_start(x, out_splits, in_splits, group, owner) -> tuple[torch.Tensor, _InFlight]:
    """An asynchronous :func:`all_to_all_autograd`: ``_a2a_wait(out, f)`` before reading
    ``out``. Start and wait are two autograd nodes, so the reverse exchange also overlaps
    whatever autograd runs between them in backward."""
    f = _InFlight(out_splits, in_splits, group, owner)
    return _A2AStart.apply(x, f), f


def _a2a_wait(out: torch.Tensor, f: _InFlight) -> torch.Tensor:
    return _A2AWait.apply(out, f)


# ---------------------------------------------------------------- expert-major rows
def _expert_rows(
    lid_US: torch.Tensor, src_U: torch.Tensor, ep: int, n_local: int, capacity, num_rows: int
) -> SlotMap:
    """Map received (unit, slot) assignments (local expert id, -1 = none) to expert-major
    rows ordered [local expert, source rank, arrival]; with ``capacity`` C, rows are the
    static [E_l, P, C] layout."""
    group_US = torch.where(lid_US >= 0, lid_US * ep + src_U.unsqueeze(1), -1)
    return group_rows(group_US, n_local * ep, num_rows, capacity, dense=capacity is None)


def _check(routing: Routing, num_experts: int, ep: int) -> None:
    if routing.num_experts != num_experts:
        raise ValueError(f"routing has {routing.num_experts} experts, dispatcher {num_experts}")
    if routing.pad_to_capacity and routing.capacity is None:
        raise ValueError("pad_to_capacity needs routing.capacity")


# ---------------------------------------------------------------- all-to-all
@dataclass
class AllToAllContext:
    src_map: SlotMap  # [T, k] slots -> sent unit rows
    dst_map: SlotMap  # received [units, S] slots -> expert rows
    send_splits: Optional[list[int]]  # None = equal (padded) splits
    recv_splits: Optional[list[int]]
    host: list[int]  # the values of the caller's ``host_counts`` (same sync)
    weights: torch.Tensor  # dedup: received w_US; plain: the source's weights_TK
    dtype: torch.dtype
    off_send: int  # units sent to / received from other ranks
    off_recv: int
    # host copy of the returned tokens_per_expert (same sync): the experts' loop path
    # reads it instead of syncing again (models.moe.GroupedExperts ``counts``)
    expert_counts: Optional[list[int]] = None


class AllToAllDispatcher(Dispatcher):
    """Uneven all-to-all over ``ep_group`` (see the module docstring)."""

    def __init__(self, ep_group, num_experts: int, dedup: bool = True):
        self.group, self.num_experts, self.dedup = ep_group, num_experts, dedup
        self.ep = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)
        self.n_local = num_experts // self.ep
        self.meta_bytes_sent = 0
        self.overlap = True  # asynchronous row exchange (parallel.overlap)
        self.in_flight = 0  # row exchanges launched and not yet waited for (fwd and bwd)

    host_counts_supported = True  # dispatch_steps takes ``host_counts`` (ETP)

    def _plan(self, routing: Routing):
        """Per source slot: its destination, the unit row carrying it, its index in the unit."""
        idx, P = routing.expert_idx_TK, self.ep
        T, k = idx.shape
        kept = routing.kept_TK
        if kept is None:
            kept = torch.ones_like(idx, dtype=torch.bool)
        dest = idx // self.n_local
        j = torch.arange(k, device=idx.device)
        if self.dedup:  # same[t, j, j']: slot j' is kept and goes where slot j goes
            same = (dest.unsqueeze(2) == dest.unsqueeze(1)) & kept.unsqueeze(1)
            first = same.to(torch.int32).argmax(-1)  # the unit's slot (first kept, same rank)
            is_unit = kept & (first == j)
            member = (same & (j.view(1, 1, k) < j.view(1, k, 1))).sum(-1)
        else:
            first, is_unit, member = j.expand(T, k), kept, torch.zeros_like(idx)
        key = torch.where(is_unit, dest, P).flatten()
        order = torch.argsort(key, stable=True)  # units by (destination, token, slot)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(T * k, device=idx.device)
        counts = count_ids(key, P + 1)[:P]
        return kept, dest, first, is_unit, member, pos.view(T, k), counts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        return run(self.dispatch_steps(x_TD, routing))

    def combine(self, y_ND: torch.Tensor, ctx: AllToAllContext) -> torch.Tensor:
        return run(self.combine_steps(y_ND, ctx))

    def dispatch_steps(
        self, x_TD: torch.Tensor, routing: Routing,
        host_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        """Steps 1-4 of the module docstring; pauses while the rows travel (with
        ``overlap``; models/steps.py). ``host_counts(tokens_per_expert_E) -> int tensor``:
        more values the caller needs on the host, fetched in this layer's one sync
        (``ctx.host``; not with padding).

        One function (over 60 lines) on purpose: the layer's only host sync must come
        after every size-independent device op, and that order is only visible when the
        steps stand together."""
        _check(routing, self.num_experts, self.ep)
        P, El, E = self.ep, self.n_local, self.num_experts
        idx = routing.expert_idx_TK
        T, k = idx.shape
        dev = idx.device
        S = min(k, El) if self.dedup else 1
        kept, dest, first, is_unit, member, pos, counts = self._plan(routing)
        pad, C = routing.pad_to_capacity, routing.capacity
        if pad:
            U = El * C if not self.dedup else min(T, El * C)
            starts = torch.cumsum(counts, 0) - counts
            pos = dest * U + (pos - starts[dest]).clamp(max=U - 1)
        row_TK = torch.where(is_unit, pos, -1)  # the sent row of every unit slot
        unit_row_TK = row_TK.gather(1, first)  # the row carrying every kept slot
        if pad:
            send_splits = recv_splits = None
            host = []
            n_send, n_recv, n_rows = P * U, P * U, El * P * C
            tokens_per_expert = torch.full((El,), P * C, dtype=torch.long, device=dev)
            expert_counts = [P * C] * El
            off_send = off_recv = (P - 1) * U
        else:
            per_expert = count_ids(torch.where(kept, idx, E), E + 1)
            send_c = torch.cat([counts.unsqueeze(1), per_expert[:E].view(P, El)], 1)
            recv_c = all_to_all(send_c, None, None, self.group)  # row p: from source p
            tokens_per_expert = recv_c[:, 1:].sum(0)
            # The one device->host sync: everything above is already queued.
            extra = [] if host_counts is None else [host_counts(tokens_per_expert).flatten()]
            host = torch.cat([send_c[:, 0], recv_c[:, 0], tokens_per_expert,
                              *extra]).tolist()
            send_splits, recv_splits = host[:P], host[P : 2 * P]
            expert_counts = host[2 * P : 2 * P + El]
            n_rows, host = sum(expert_counts), host[2 * P + El:]
            n_send, n_recv = sum(send_splits), sum(recv_splits)
            off_send = n_send - send_splits[self.rank]
            off_recv = n_recv - recv_splits[self.rank]
        src_map = SlotMap.build(row_TK, n_send, dense=not pad)

        # Metadata cell (unit row, member) of every kept slot; others write a trash cell.
        cell = torch.where(kept, unit_row_TK * S + member, n_send * S).flatten()
        lid = (idx - dest * El).flatten().float()  # exact: ids < 2**24
        meta = torch.full((n_send * S + 1,), -1.0, device=dev).index_put((cell,), lid)
        meta = meta[:-1].view(n_send, S)
        if self.dedup:
            w = torch.zeros(n_send * S + 1, device=dev, dtype=torch.float32)
            w = w.index_put((cell,), routing.weights_TK.flatten().float())[:-1]
            meta = torch.cat([meta, w.view(n_send, S)], 1)

        x_send = _wire(gather_rows(x_TD, src_map))
        if self.overlap:
            x_recv, fx = _a2a_start(x_send, recv_splits, send_splits, self.group, self)
            meta_recv, fm = _a2a_start(meta, recv_splits, send_splits, self.group, self)
            yield
            meta_recv, x_recv = _a2a_wait(meta_recv, fm), _a2a_wait(x_recv, fx)
        else:
            x_recv = all_to_all_autograd(x_send, recv_splits, send_splits, self.group)
            meta_recv = all_to_all_autograd(meta, recv_splits, send_splits, self.group)

        if pad:
            src_U = torch.arange(n_recv, device=dev) // U
        else:
            src_U = torch.arange(P, device=dev).repeat_interleave(recv_c[:, 0], output_size=n_recv)
        lid_US = meta_recv[:, :S].long()
        dst_map = _expert_rows(lid_US, src_U, P, El, C if pad else None, n_rows)
        x_ND = gather_rows(x_recv, dst_map)

        row_bytes = x_send.shape[1] * x_send.element_size()
        self.bytes_sent, self.bytes_received = off_send * row_bytes, off_recv * row_bytes
        self.meta_bytes_sent = off_send * meta.shape[1] * meta.element_size()
        weights = meta_recv[:, S:] if self.dedup else routing.weights_TK
        ctx = AllToAllContext(src_map, dst_map, send_splits, recv_splits, host, weights,
                              x_TD.dtype, off_send, off_recv, expert_counts)
        return x_ND, tokens_per_expert, ctx

    def combine_steps(self, y_ND: torch.Tensor, ctx: AllToAllContext):
        """Step 5: partial sums back to their tokens' ranks; pauses while they travel
        (with ``overlap``). The traffic is counted before the pause."""
        w_dst = ctx.weights if self.dedup else None
        part = reduce_rows(y_ND, w_dst, ctx.dst_map, y_ND.dtype)
        row_bytes = y_ND.shape[1] * y_ND.element_size()
        self.bytes_sent += ctx.off_recv * row_bytes
        self.bytes_received += ctx.off_send * row_bytes
        if self.overlap:
            back, f = _a2a_start(part, ctx.send_splits, ctx.recv_splits, self.group, self)
            yield
            back = _a2a_wait(back, f)
        else:
            back = all_to_all_autograd(part, ctx.send_splits, ctx.recv_splits, self.group)
        w_src = None if self.dedup else ctx.weights
        return reduce_rows(back, w_src, ctx.src_map, ctx.dtype)


# ---------------------------------------------------------------- all-gather
@dataclass
class AllGatherContext:
    dst_map: SlotMap
    weights_UK: torch.Tensor  # all ranks' routing weights
    dtype: torch.dtype
    host: list[int]  # the values of the caller's ``host_counts`` (same sync)
    expert_counts: Optional[list[int]] = None  # as AllToAllContext's


class AllGatherDispatcher(Dispatcher):
    """All-gather tokens and routing over ``ep_group``; each rank runs its local experts on
    every gathered token and a reduce-scatter returns each rank's weighted sums. Every EP
    rank must hold the same number of tokens. Bytes are the algorithm's logical traffic:
    (P - 1) * T rows sent and received by each of the two collectives. Needs one host sync
    (the number of local assignments; an ETP wrapper's counts ride along) unless
    ``pad_to_capacity``. Its collectives are synchronous: its steps never pause (the
    shared experts run after the gathers)."""

    def __init__(self, ep_group, num_experts: int):
        self.group, self.num_experts = ep_group, num_experts
        self.ep = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)
        self.n_local = num_experts // self.ep
        self.meta_bytes_sent = 0

    host_counts_supported = True  # dispatch_steps takes ``host_counts`` (ETP)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, host_counts=None):
        """``host_counts`` as in :meth:`AllToAllDispatcher.dispatch_steps` (``ctx.host``)."""
        _check(routing, self.num_experts, self.ep)
        P, El = self.ep, self.n_local
        idx = routing.expert_idx_TK
        T, k = idx.shape
        dev = idx.device
        gid = idx if routing.kept_TK is None else torch.where(routing.kept_TK, idx, -1)
        meta = torch.cat([gid.float(), routing.weights_TK.float()], 1)
        x_all = all_gather_autograd(_wire(x_TD), self.group)
        meta_all = all_gather_autograd(meta, self.group)
        gid_all = meta_all[:, :k].long()
        lid = gid_all - self.rank * El
        lid = torch.where((gid_all >= 0) & (lid >= 0) & (lid < El), lid, -1)
        src_U = torch.arange(P * T, device=dev) // T
        if routing.pad_to_capacity:
            C = routing.capacity
            n_rows, tokens_per_expert = El * P * C, torch.full((El,), P * C, device=dev)
            host, expert_counts = [], [P * C] * El
        else:
            C = None
            tokens_per_expert = count_ids(torch.where(lid >= 0, lid, El), El + 1)[:El]
            extra = [] if host_counts is None else [host_counts(tokens_per_expert).flatten()]
            host = torch.cat([tokens_per_expert, *extra]).tolist()  # the sync
            expert_counts, host = host[:El], host[El:]
            n_rows = sum(expert_counts)
        dst_map = _expert_rows(lid, src_U, P, El, C, n_rows)
        x_ND = gather_rows(x_all, dst_map)
        row_bytes = x_all.shape[1] * x_all.element_size()
        self.bytes_sent = self.bytes_received = (P - 1) * T * row_bytes
        self.meta_bytes_sent = (P - 1) * meta.numel() * meta.element_size()
        ctx = AllGatherContext(dst_map, meta_all[:, k:], x_TD.dtype, host, expert_counts)
        return x_ND, tokens_per_expert, ctx

    def combine(self, y_ND: torch.Tensor, ctx: AllGatherContext) -> torch.Tensor:
        part = reduce_rows(y_ND, ctx.weights_UK, ctx.dst_map, y_ND.dtype)
        out = reduce_scatter_autograd(part, self.group)
        T = out.shape[0]
        row_bytes = y_ND.shape[1] * y_ND.element_size()
        self.bytes_sent += (self.ep - 1) * T * row_bytes
        self.bytes_received += (self.ep - 1) * T * row_bytes
        return out.to(ctx.dtype)


def make_dispatcher(kind: str, ep_group, num_experts: int, dedup: bool = True) -> Dispatcher:
    """``kind``: alltoall | allgather (``parallel.expert_parallel.DISPATCHERS``); the EP
    group size must divide ``num_experts`` (``check_expert_parallel``)."""
    if kind == "allgather":
        return AllGatherDispatcher(ep_group, num_experts)
    return AllToAllDispatcher(ep_group, num_experts, dedup=dedup)


def set_dispatch_overlap(model: torch.nn.Module, on: bool) -> None:
    """``parallel.overlap`` for every expert-parallel dispatcher of ``model`` (also inside
    an ETP wrapper): asynchronous row exchange with the shared experts in flight, or not
    (the before/after of scripts/bench_overlap.py)."""
    for module in model.modules():
        d = getattr(module, "dispatcher", None)
        while hasattr(d, "inner"):  # ETP / placement wrappers
            d = d.inner
        if isinstance(d, AllToAllDispatcher):
            d.overlap = on
