"""The MoE layer: Router -> Dispatcher -> GroupedExperts -> combine (+ shared experts).

The dispatcher is the seam expert parallelism fills in: it turns the token-major routing
into expert-major rows for the local experts and back. ``LocalDispatcher`` (EP=1) uses a
stable argsort of the expert ids; its gathers (models/permute.py, shared with the
expert-parallel dispatchers) have hand-written backwards that sum a token's k
contributions in a fixed order, so gradients are deterministic on every device (no
atomics, no index_add).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.grouped_gemm import (
    ROW_ALIGN,
    PadPlan,
    align_segments,
    autocast_dtype,
    cost_kind,
    fed_rows,
    grouped_mm_fused_unmasked,
    grouped_mm_loop_unmasked,
    host_to,
    no_autocast,
    pad_plan,
    pad_segments,
    padded_pays,
    padded_swiglu,
    round_up,
    unpad_segments,
    use_fused,
)
from models.layers import FeedForward, Initializer, in_backward, keep_fp32_apply, recompute
from models.permute import SlotMap, count_ids, gather_rows, group_rows, reduce_rows
from models.router import SINGLE, Router, RouterOutput, Routing, TokenGroup
from models.steps import Steps, run, start

__all__ = [
    "Dispatcher",
    "GroupedExperts",
    "LocalDispatchContext",
    "LocalDispatcher",
    "MoELayer",
    "Routing",
    "set_aux_loss_scale",
]


class Dispatcher:
    """Protocol (and base) of a token dispatcher.

    ``dispatch(x_TD, routing) -> (x_ND, tokens_per_expert_E, ctx)``: rows grouped by local
    expert (expert e owns ``tokens_per_expert[e]`` consecutive rows; rows past their sum
    are padding the experts must map to zero). ``combine(y_ND, ctx) -> y_TD``: the
    routing-weighted sum over each token's assignments, accumulated in fp32, returned in
    x's dtype.

    Steppable forms (models/steps.py): ``dispatch_steps(x_TD, routing)`` and
    ``combine_steps(y_ND, ctx)`` are generators that pause while their rows are in flight
    and return what ``dispatch`` / ``combine`` return. The base class has no such point
    (one plain call); the all-to-all dispatcher pauses between launching its exchange and
    waiting for it, and ``dispatch`` / ``combine`` are these generators run through.

    ``MoELayer.forward_steps`` runs its shared experts at the dispatch's pause, i.e. while
    the token rows are in flight; the backward overlaps the same way (the reverse exchange
    is launched before the shared experts' backward and waited for after it).

    Traffic of the last dispatch + combine (0 for a dispatcher that sends nothing):
    ``bytes_sent`` / ``bytes_received``: activation bytes (token rows) that crossed ranks;
    ``meta_bytes_sent``: the routing metadata sent alongside them (expert ids, weights).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    meta_bytes_sent: int = 0

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    def combine(self, y_ND: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def dispatch_steps(self, x_TD: torch.Tensor, routing: Routing, **kw: Any
                       ) -> Steps[tuple[torch.Tensor, torch.Tensor, Any]]:
        return self.dispatch(x_TD, routing, **kw)
        yield  # a generator with no pause

    def combine_steps(self, y_ND: torch.Tensor, ctx: Any) -> Steps[torch.Tensor]:
        return self.combine(y_ND, ctx)
        yield  # a generator with no pause


@dataclass
class LocalDispatchContext:
    """The [T, k] assignment slots <-> expert-major rows map, and what combine needs."""

    slot_map: SlotMap
    weights_TK: torch.Tensor  # fp32
    dtype: torch.dtype
    # every row is some assignment's (dropless): no trailing rows, and combine's backward
    # hands the experts a contiguous gradient (see GroupedExperts.forward)
    rows_fed: bool = False


class LocalDispatcher(Dispatcher):
    """EP=1: every expert is local; nothing is sent. ``models.permute`` with the T tokens
    as sources and their k assignments as slots: rows sorted by expert (stable argsort,
    so token-major within an expert), dropped assignments feed no row. Dropless or not,
    there are T*k rows (those past ``tokens_per_expert.sum()`` are zero padding: no host
    sync); ``pad_to_capacity``: the static [E, C] rows."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        idx, kept = routing.expert_idx_TK, routing.kept_TK
        E = routing.num_experts
        expert_TK = idx if kept is None else torch.where(kept, idx, -1)
        if routing.pad_to_capacity:
            C = routing.capacity
            m = group_rows(expert_TK, E, E * C, C, dense=False)
            tokens_per_expert = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        elif kept is None:  # dropless: the argsort is the whole map
            m = SlotMap.sorted_by(idx)
            tokens_per_expert = routing.local_counts_E
            if tokens_per_expert is None:
                tokens_per_expert = count_ids(idx, E)
        else:
            m = group_rows(expert_TK, E, idx.numel(), dense=False)
            key = torch.where(expert_TK >= 0, expert_TK, E)
            tokens_per_expert = count_ids(key, E + 1)[:E]
        c = LocalDispatchContext(m, routing.weights_TK, x_TD.dtype,
                                 rows_fed=kept is None and not routing.pad_to_capacity)
        return gather_rows(x_TD, m), tokens_per_expert, c

    def combine(self, y_ND: torch.Tensor, ctx: LocalDispatchContext) -> torch.Tensor:
        return reduce_rows(y_ND, ctx.weights_TK, ctx.slot_map, ctx.dtype)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three [E, ...] tensors; computes only the rows it is given.

    Expert parallelism shards dim 0 and sets ``expert_offset`` (the global id of local
    expert 0), ``ep_size`` and ``num_global_experts``; expert tensor parallelism shards the
    FFN dim (``w1``/``w3`` columns, ``w2`` rows: the output is then a partial sum) and sets
    ``ffn_offset`` / ``ffn_full`` and ``etp_size``. Either way each local slice initialises
    exactly as in the unsharded model.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down
        self.expert_offset = 0
        # Global (logical) ids of the local experts; None = expert_offset + 0 .. E_l - 1.
        # An expert placement (parallel/expert_placement.py) makes them non-contiguous.
        self.expert_ids: list[int] | None = None
        self.ffn_offset, self.ffn_full = 0, hidden
        # set by parallel/expert_parallel.py when it shards the experts
        self.ep_size, self.etp_size = 1, 1
        self.num_global_experts = num_experts
        self.grouped_mm_impl = "auto"  # models.grouped_gemm.IMPLS

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, rows_fed: bool = False,
        counts: list[int] | None = None,
    ) -> torch.Tensor:
        """``rows_fed``: the caller vouches that every row belongs to an expert
        (``tokens_per_expert_E`` sums to N) and that the output's incoming gradient is
        contiguous, so the trailing-row handling and the contiguity hook are skipped.
        ``counts``: ``tokens_per_expert_E`` already on the host (an EP dispatcher's one
        sync), so the loop paths do not read it back again (nor does a recompute)."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        impl = self.grouped_mm_impl
        dev = x_ND.device.type
        dtype = autocast_dtype(dev)
        kind = cost_kind(dev, dtype or x_ND.dtype)
        fused = use_fused(x_ND, w1, impl)
        align = 1  # ROW_ALIGN: CPU bf16/fp16 "auto" rounds the fused path's segments
        if not fused or (impl == "auto" and kind == "cpu_lowp"):
            # the loop's one host sync per layer (none when an EP dispatcher's sync
            # brought the counts); on CPU (auto, bf16/fp16: CPU's grouped GEMM pays a
            # oneDNN set-up per segment shape) a read of host memory
            if counts is None:
                counts = tokens_per_expert_E.tolist()
            D, F_ = w1.shape[1], w1.shape[2]
            plan = (pad_plan(counts, D, F_, kind) if impl == "loop_padded" else None
                    if impl == "loop_segments" else padded_pays(counts, D, F_, kind))
            if not (fused or plan):  # the segment loop casts as autocast would
                return self._segment_loop(x_ND, tokens_per_expert_E, counts, ROW_ALIGN[kind])
            if plan:
                return self._padded(x_ND, tokens_per_expert_E, counts, plan)
            align = ROW_ALIGN[kind]
        x_ND, w1, w3, w2 = self._in_compute_dtype(x_ND)
        aligned = align > 1 and align_segments(x_ND, tokens_per_expert_E, counts, align)
        finish = None
        if aligned:  # (recurring GEMM shapes: see ROW_ALIGN)
            N = x_ND.shape[0]
            x_ND, dest, offs = aligned
            finish = functools.partial(unpad_segments, dest=dest, num_rows=N)
        else:
            # Offsets once for the three GEMMs; trailing rows handled once on entry (their
            # input gradient) and once on exit (their output): in between, a trailing
            # row's garbage only reaches the next grouped GEMM, which skips it.
            offs = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
            if not rows_fed:
                x_ND, finish = fed_rows(x_ND, offs)
        h = F.silu(grouped_mm_fused_unmasked(x_ND, w1, offs))
        h = h * grouped_mm_fused_unmasked(x_ND, w3, offs)
        y = grouped_mm_fused_unmasked(h, w2, offs)
        return y if finish is None else finish(y)

    def _in_compute_dtype(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x and the three weights cast as autocast casts a matmul's (``_grouped_mm`` is
        not on autocast's lists, and the padded block runs with autocast off)."""
        ts = (x_ND, self.w1, self.w3, self.w2)
        dtype = autocast_dtype(x_ND.device.type)
        return ts if dtype is None else tuple(t.to(dtype) for t in ts)

    def _segment_loop(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                      counts: list[int], align: int) -> torch.Tensor:
        """The loop fallback as one GEMM per segment, the segments rounded up to ``align``
        rows (``ROW_ALIGN``) where that is more than one."""
        N = x_ND.shape[0]
        aligned = align > 1 and align_segments(x_ND, tokens_per_expert_E, counts, align)
        if aligned:
            x_ND, dest, _ = aligned
            counts = [round_up(c, align) for c in counts]
        h = F.silu(grouped_mm_loop_unmasked(x_ND, self.w1, counts))
        h = h * grouped_mm_loop_unmasked(x_ND, self.w3, counts)
        y = grouped_mm_loop_unmasked(h, self.w2, counts)
        return unpad_segments(y, dest, N) if aligned else y

    def _padded(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                counts: list[int], plan: PadPlan) -> torch.Tensor:
        """The loop fallback as bmm over the segments padded by ``plan`` (zero rows in,
        zero rows out: they add nothing to the weight gradients): three ``bmm``, or six
        with an overflow tier (models/grouped_gemm.py ``PadPlan``)."""
        x_ND, w1, w3, w2 = self._in_compute_dtype(x_ND)
        with no_autocast(x_ND.device.type):
            x_RD, dest = pad_segments(x_ND, tokens_per_expert_E, counts, plan)
            return unpad_segments(padded_swiglu(x_RD, w1, w3, w2, plan), dest, x_ND.shape[0])

    def init_params(self, init: Initializer, prefix: str) -> None:
        """Expert ``g`` (global id) of ``w1`` is drawn as ``{prefix}.w1[g]`` (its own
        generator), over the full FFN dim; an ETP rank keeps its FFN slice."""
        for name, ffn_dim, std in (("w1", 1, init.std), ("w3", 1, init.std),
                                   ("w2", 0, init.out_std)):
            def row(e: int, name: str = name, ffn_dim: int = ffn_dim, std: float = std):
                g = self.expert_ids[e] if self.expert_ids is not None else self.expert_offset + e
                expert = init.normal(f"{prefix}.{name}[{g}]", std)
                return init.narrowed(expert, ffn_dim, self.ffn_offset, self.ffn_full)
            init.apply(getattr(self, name), init.rows(row))


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the layer output; backward also feeds ``scale`` as d(objective)/d(aux),
    so the aux losses train the router without entering the reported loss."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, device=grad.device), None


_STAT_LOSSES = ("aux_loss", "seq_aux_loss", "z_loss")
# The columns of a layer's statistics row after its expert counts (``MoELayer.stat_row``).
STAT_COLUMNS = ("dropped", "assignments", "tokens", *_STAT_LOSSES)
_LOSS_COLUMN = {name: STAT_COLUMNS.index(name) for name in _STAT_LOSSES}
# The two of them counted on the host (``MoELayer.take_assignments``), in that order.
HOST_COLUMNS = slice(STAT_COLUMNS.index("assignments"), STAT_COLUMNS.index("tokens") + 1)


class MoELayer(nn.Module):
    """``cfg``: this layer's config, ``cfg.moe.num_experts`` an int (a pyramid model's
    blocks get ``models.config.moe_layer_config(model, i)``).

    Residual MoE (``moe.residual``) reuses the shared-expert path: the dense branch is
    ``shared_experts`` (one FFN, so tensor parallelism, memory and FLOP estimates treat
    it like a shared expert) and ``residual_coef`` (Linear(D, 2), no bias) mixes it with
    the routed output per token: ``softmax(coef)[0] * routed + softmax(coef)[1] * dense``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d = cfg.moe, cfg.hidden_size
        if not isinstance(m.num_experts, int):
            raise TypeError("MoELayer needs an int moe.num_experts: build it from "
                            "models.config.moe_layer_config(model, layer)")
        self.moe = m
        self.router = Router(cfg)
        self.experts = GroupedExperts(m.num_experts, d, m.expert_ffn_hidden_size)
        self.shared_experts = self.shared_gate = self.residual_coef = None
        width = m.shared_expert_ffn_hidden_size or m.expert_ffn_hidden_size
        if m.residual:
            self.shared_experts = FeedForward(d, width)
            self.residual_coef = nn.Linear(d, 2, bias=False)
        elif m.num_shared_experts > 0:
            self.shared_experts = FeedForward(d, m.num_shared_experts * width)
            if m.shared_expert_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False)
        self.dispatcher: Dispatcher = LocalDispatcher()
        # The ranks sharing this rank's micro-batch (TP token split, CP): parallel/ sets it.
        self.token_group: TokenGroup = SINGLE
        self.aux_loss_scale = 1.0
        # forward_steps recomputes the routed and shared experts in backward
        # (parallel/activation_checkpoint.py, under the two-batch overlap)
        self.recompute_in_steps = False
        # bytes this layer's dispatcher sent since the last take_dispatch_bytes() (host int)
        self.dispatch_bytes_sent = 0
        # Statistics since the last pop_stats(), one fp32 row (never synced to the host in
        # forward): the routed counts of the E + num_null_experts experts (the null
        # experts' picks are counted too: they are balanced), then ``STAT_COLUMNS``. One
        # row, so that the step's table of every layer is one ``stack`` (parallel/moe_stats).
        # fp32 counts are exact up to 2**24 routed tokens per expert and step on a rank.
        self.num_counts = m.num_experts + m.num_null_experts
        self.register_buffer("stat_row", torch.zeros(self.num_counts + len(STAT_COLUMNS)),
                             persistent=False)
        self.routed_assignments = 0  # host int (take_assignments)

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(self, ("stat_row",), fn, recurse)

    def init_params(self, init: Initializer, prefix: str) -> None:
        if self.shared_gate is not None:
            init.normal_(self.shared_gate.weight, f"{prefix}.shared_gate.weight", init.std)
        if self.residual_coef is not None:
            init.normal_(self.residual_coef.weight, f"{prefix}.residual_coef.weight", init.std)
        with torch.no_grad():
            for buf in self.buffers(recurse=False):
                buf.zero_()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return run(self.forward_steps(x_BTD))

    def stepped_units(self) -> list[nn.Module]:
        """The parameter-holding submodules :meth:`forward_steps` calls whole before its
        first pause: the router and the shared experts (the routed experts run after it
        and have their own sharding group). See ``TransformerBlock.stepped_units``."""
        return [m for m in (self.router, self.shared_experts)
                if m is not None and any(True for _ in m.parameters())]

    def forward_steps(self, x_BTD: torch.Tensor) -> Steps[torch.Tensor]:
        """The forward as steps (models/steps.py): pauses while the dispatch's rows are
        in flight (after the shared experts have run there) and while the combine's are.
        Run straight through (``forward``) the pauses cost nothing; the two-batch overlap
        runs another micro-batch's work at them."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        r = self.router(x_TD, num_seqs=B, group=self.token_group)
        d = self.dispatcher
        steps = d.dispatch_steps(x_TD, r.routing)
        paused, out = start(steps)
        rc = self.recompute_in_steps
        shared = None if self.shared_experts is None else recompute(rc, self._shared, x_TD)
        if paused:
            yield
            out = yield from steps
        x_ND, tokens_per_expert, ctx = out
        # The traffic counters are the dispatcher's, which the other micro-batch also
        # uses: read them in the stretch that set them (dispatch's end, combine's start).
        sent = d.bytes_sent
        y_ND = recompute(rc, self.experts, x_ND, tokens_per_expert,
                         getattr(ctx, "rows_fed", False), getattr(ctx, "expert_counts", None))
        before = d.bytes_sent
        steps = d.combine_steps(y_ND, ctx)
        paused, y_TD = start(steps)
        sent += d.bytes_sent - before
        if paused:
            yield
            y_TD = yield from steps
        if not in_backward():  # (an activation-checkpoint recompute counted them once)
            # Host ints, added here rather than in _finish: a compiled frame (_finish is
            # one under parallel.compile) guards on the module ints it reads, and these
            # change every call. (This generator's frame is left eager by dynamo.)
            self.dispatch_bytes_sent += sent
            self.routed_assignments += r.num_assignments
        return self._finish(r, x_TD, y_TD, shared).view(B, T, -1)

    def _finish(self, r: RouterOutput, x_TD: torch.Tensor, y_TD: torch.Tensor,
                shared: torch.Tensor | None) -> torch.Tensor:
        """After the combine: the shared / residual branch, the aux losses' gradient, the
        device statistics."""
        if shared is not None:
            if self.residual_coef is not None:  # residual MoE: learned per-token mix
                coef_w = self.token_group.shared_param(self.residual_coef.weight)
                y_TD = _residual_mix(y_TD, shared, x_TD, coef_w)
            else:
                y_TD = y_TD + shared
        weighted = self._weighted_losses(r)
        if weighted and torch.is_grad_enabled():
            y_TD = _AuxLossGrad.apply(y_TD, sum(weighted.values()), self.aux_loss_scale)
        self._record(r, weighted)
        return y_TD

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x_TD)
        if self.shared_gate is not None:
            gate_w = self.token_group.shared_param(self.shared_gate.weight)
            shared = shared * torch.sigmoid(F.linear(x_TD, gate_w))
        return shared

    def _weighted_losses(self, r: RouterOutput) -> dict[str, torch.Tensor]:
        m = self.moe
        coeffs = {
            "aux_loss": m.aux_loss_coeff,
            "seq_aux_loss": m.seq_aux_loss_coeff,
            "z_loss": m.z_loss_coeff,
        }
        return {n: c * getattr(r, n) for n, c in coeffs.items() if getattr(r, n) is not None}

    def _record(self, r: RouterOutput, weighted: dict[str, torch.Tensor]) -> None:
        """Adds the micro-batch's device statistics to ``stat_row`` (the host ones are
        added in ``forward_steps``). No no_grad() needed (and its ~8 us per call saved):
        counts are integers and the losses are detached."""
        if in_backward():  # activation-checkpoint recompute: already counted once
            return
        row, n = self.stat_row, self.num_counts
        row[:n].add_(r.counts_E)
        if r.num_dropped is not None:
            row[n].add_(r.num_dropped)
        for name, value in weighted.items():
            row[n + _LOSS_COLUMN[name]].add_(value.detach() * self.aux_loss_scale)

    def take_assignments(self) -> tuple[int, int]:
        """(assignments, tokens) routed since the last take (host ints); resets them.
        They belong in ``stat_row``'s "assignments" and "tokens" columns, which stay zero
        on the device."""
        a, self.routed_assignments = self.routed_assignments, 0
        return a, a // self.moe.top_k

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Statistics since the last pop (counts [E + num_null_experts] before capacity
        drops, real experts first; dropped and total assignments; tokens routed; aux
        losses as coeff * value * aux_loss_scale), then reset."""
        row, n = self.stat_row.clone(), self.num_counts
        host = torch.tensor(self.take_assignments(), dtype=row.dtype)
        row[n:][HOST_COLUMNS] += host_to(host, row.device)
        out = {"counts": row[:n], **dict(zip(STAT_COLUMNS, row[n:].unbind(0)))}
        with torch.no_grad():
            self.stat_row.zero_()
        return out

    def take_dispatch_bytes(self) -> int:
        """Activation bytes the dispatcher sent for this layer since the last take."""
        sent, self.dispatch_bytes_sent = self.dispatch_bytes_sent, 0
        return sent

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: ``bias += rate * sign(mean(counts) - counts)`` (fp32).
        ``counts_E`` must be the globally reduced counts of the step."""
        bias = self.router.expert_bias
        if bias is None:
            return
        c = counts_E.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(c.mean() - c), alpha=self.moe.expert_bias_update_rate)


def _residual_mix(routed_TD: torch.Tensor, dense_TD: torch.Tensor, x_TD: torch.Tensor,
                  coef_w: torch.Tensor) -> torch.Tensor:
    """Residual MoE's combine: softmax over the two branch logits (in fp32), per token."""
    coef_T2 = torch.softmax(F.linear(x_TD, coef_w).float(), dim=-1)
    out = coef_T2[:, :1] * routed_TD.float() + coef_T2[:, 1:] * dense_TD.float()
    return out.to(routed_TD.dtype)


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """d(objective)/d(aux) for every MoE layer; the trainer sets 1/(micro-batches * dp)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = float(scale)
