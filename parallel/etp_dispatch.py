"""Expert tensor parallelism (ETP): each routed expert's FFN split over the ``etp`` group.

Rank q of the ETP group holds columns ``q*F/etp .. (q+1)*F/etp`` of every local expert's
``w1``/``w3`` and the same rows of ``w2`` (parallel/expert_parallel.py slices them), so
``w2`` produces a partial sum of each row's output. ``ETPDispatcher`` wraps the EP
dispatcher (all-to-all, all-gather, or the local one when ep=1), as DESIGN.md §4 orders it:

1. the inner dispatcher delivers this rank's expert rows, grouped by local expert;
2. all-gather-v within ETP: every ETP rank receives every member's rows (an uneven
   ``all_to_all_single`` of this rank's rows repeated once per member), then one stable
   argsort makes them expert-major over the whole group ([member, expert] -> [expert,
   member]), so the grouped matmul sees each local expert's rows contiguously;
3. combine is the exact reverse: back to [member, expert] order, an uneven all-to-all
   returns each member its rows' partial outputs, summed over members in fixed order in
   fp32 (a reduce-scatter-v without atomics), then the inner dispatcher's combine.

Row counts of the other members come from an all-gather of the [E_local] counts; their
host copy rides in the inner EP dispatcher's one host sync (``host_counts``), so the layer
still syncs once; around the local dispatcher (ep=1) it is a sync of its own. With padding
every size is static. ``dispatch_steps`` / ``combine_steps`` pause where the inner
dispatcher's do (its all-to-all in flight: the shared experts, or the other micro-batch of
the two-batch overlap, run there; the ETP exchanges themselves are synchronous). Bytes: rows that left or
reached this rank in the ETP exchanges are added to the inner dispatcher's counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from models.moe import Dispatcher
from models.router import Routing
from models.steps import run
from parallel.collectives import all_gather, all_to_all_autograd

__all__ = ["ETPContext", "ETPDispatcher"]


@dataclass
class ETPContext:
    inner: Any
    inv_perm: torch.Tensor  # expert-major row -> member-major row
    n_rows: list[int]  # expert rows of each ETP member
    n_inner: int  # rows the inner dispatcher produced (its trailing rows may be padding)
    dtype: torch.dtype
    expert_counts: list[int]  # host copy of the returned tokens_per_expert (same sync)


class ETPDispatcher(Dispatcher):
    """Wraps ``inner`` (a dispatcher over the EP group) with the ETP gather/scatter."""

    def __init__(self, inner: Dispatcher, etp_group):
        self.inner, self.group = inner, etp_group
        self.etp = dist.get_world_size(etp_group)
        self.rank = dist.get_rank(etp_group)
        self._sent = self._received = 0

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent + self._sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received + self._received

    @property
    def meta_bytes_sent(self) -> int:
        return self.inner.meta_bytes_sent

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        return run(self.dispatch_steps(x_TD, routing))

    def combine(self, y_ND: torch.Tensor, ctx: ETPContext) -> torch.Tensor:
        return run(self.combine_steps(y_ND, ctx))

    def dispatch_steps(self, x_TD: torch.Tensor, routing: Routing):
        """The inner dispatch's steps (pausing where its rows travel), then the ETP
        exchange."""
        gathered: list[torch.Tensor] = []

        def host_counts(tpe_E: torch.Tensor) -> torch.Tensor:
            gathered.append(all_gather(tpe_E.view(1, -1), self.group))
            return torch.cat([gathered[0].sum(1), gathered[0].sum(0)])

        merged = hasattr(self.inner, "host_counts_supported") and not routing.pad_to_capacity
        kw = {"host_counts": host_counts} if merged else {}
        x_ND, tpe_E, inner_ctx = yield from self.inner.dispatch_steps(x_TD, routing, **kw)
        Q, El, n_inner = self.etp, tpe_E.numel(), x_ND.shape[0]
        dev = x_ND.device
        if routing.pad_to_capacity:  # static: every member has n_inner rows, evenly split
            counts_QE = torch.full((Q, El), n_inner // El, dtype=torch.long, device=dev)
            n_rows, expert_counts = [n_inner] * Q, [Q * (n_inner // El)] * El
        elif merged:  # fetched in the inner dispatcher's host sync
            counts_QE, host = gathered[0], inner_ctx.host
            n_rows, expert_counts = host[:Q], host[Q:]
        else:
            counts_QE = all_gather(tpe_E.view(1, El), self.group)
            # a second sync (local inner dispatcher)
            host = torch.cat([counts_QE.sum(1), counts_QE.sum(0)]).tolist()
            n_rows, expert_counts = host[:Q], host[Q:]
        n_own, N = n_rows[self.rank], sum(n_rows)
        x_ND = x_ND[:n_own]  # drop the inner dispatcher's padding rows, if any
        # Member-major rows -> expert-major rows (stable: members stay in rank order).
        member = torch.arange(Q, device=dev).repeat_interleave(
            counts_QE.sum(1), output_size=N
        )
        expert = torch.arange(El, device=dev).repeat(Q).repeat_interleave(
            counts_QE.flatten(), output_size=N
        )
        perm = torch.argsort(expert * Q + member, stable=True)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(N, device=dev)

        x_all = all_to_all_autograd(x_ND.repeat(Q, 1), n_rows, [n_own] * Q, self.group)
        row_bytes = x_ND.shape[1] * x_ND.element_size()
        self._sent = (Q - 1) * n_own * row_bytes
        self._received = (N - n_own) * row_bytes
        ctx = ETPContext(inner_ctx, inv_perm, n_rows, n_inner, x_ND.dtype, expert_counts)
        return x_all[perm], counts_QE.sum(0), ctx

    def combine_steps(self, y_ND: torch.Tensor, ctx: ETPContext):
        Q, n_own = self.etp, ctx.n_rows[self.rank]
        parts = all_to_all_autograd(y_ND[ctx.inv_perm], [n_own] * Q, ctx.n_rows, self.group)
        y_own = parts.view(Q, n_own, y_ND.shape[1]).float().sum(0).to(ctx.dtype)
        if ctx.n_inner > n_own:
            y_own = torch.cat([y_own, y_own.new_zeros(ctx.n_inner - n_own, y_own.shape[1])])
        row_bytes = y_ND.shape[1] * y_ND.element_size()
        self._sent += (sum(ctx.n_rows) - n_own) * row_bytes
        self._received += (Q - 1) * n_own * row_bytes
        return (yield from self.inner.combine_steps(y_own, ctx.inner))
