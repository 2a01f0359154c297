"""The MoE layer: Router -> Dispatcher -> GroupedExperts -> combine (+ shared experts).

The dispatcher is the seam expert parallelism fills in: it turns the token-major routing
into expert-major rows for the local experts and back. ``LocalDispatcher`` (EP=1) uses a
stable argsort of the expert ids; its gathers have hand-written backwards that sum a
token's k contributions in a fixed order, so gradients are deterministic on every device
(no atomics, no index_add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.grouped_gemm import grouped_mm
from models.layers import FeedForward, Initializer, keep_fp32_apply
from models.router import SINGLE, Router, RouterOutput, Routing, TokenGroup

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
    x's dtype. ``bytes_sent`` / ``bytes_received``: what the last call moved between ranks.
    """

    bytes_sent: int = 0
    bytes_received: int = 0

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    def combine(self, y_ND: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LocalDispatchContext:
    """Index maps between the T*k assignments (token-major, a = t*k + j) and the rows."""

    top_k: int
    assign_N: torch.Tensor  # assignment feeding each row (arbitrary where not valid)
    valid_N: Optional[torch.Tensor]  # rows holding a real assignment; None = all
    src_A: torch.Tensor  # row holding each assignment (arbitrary where dropped)
    kept_A: Optional[torch.Tensor]  # None = dropless
    weights_TK: torch.Tensor  # fp32
    dtype: torch.dtype


def _rows_of_assignments(y_ND: torch.Tensor, c: LocalDispatchContext) -> torch.Tensor:
    y_A = y_ND[c.src_A]
    if c.kept_A is not None:
        y_A = y_A.masked_fill(~c.kept_A.unsqueeze(1), 0)
    return y_A


def _tokens_of_rows(x_TD: torch.Tensor, c: LocalDispatchContext) -> torch.Tensor:
    x_ND = x_TD[c.assign_N // c.top_k]
    if c.valid_N is not None:
        x_ND = x_ND.masked_fill(~c.valid_N.unsqueeze(1), 0)
    return x_ND


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, c: LocalDispatchContext) -> torch.Tensor:
        ctx.c = c
        return _tokens_of_rows(x_TD, c)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        c = ctx.c
        g_A = _rows_of_assignments(g_ND, c).float()
        return g_A.view(-1, c.top_k, g_A.shape[-1]).sum(1).to(g_ND.dtype), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, w_TK: torch.Tensor, c: LocalDispatchContext):
        ctx.c = c
        ctx.save_for_backward(y_ND, w_TK)
        y_TKD = _rows_of_assignments(y_ND, c).float().view(*w_TK.shape, y_ND.shape[-1])
        return torch.einsum("tkd,tk->td", y_TKD, w_TK).to(c.dtype)

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):
        c = ctx.c
        y_ND, w_TK = ctx.saved_tensors
        g = g_TD.float()
        g_y = g_w = None
        if ctx.needs_input_grad[0]:
            w_N = w_TK.flatten()[c.assign_N].unsqueeze(1)
            g_y = _tokens_of_rows(g, c) * w_N
            if c.valid_N is not None:
                g_y = g_y.masked_fill(~c.valid_N.unsqueeze(1), 0)
            g_y = g_y.to(y_ND.dtype)
        if ctx.needs_input_grad[1]:
            y_TKD = _rows_of_assignments(y_ND, c).float().view(*w_TK.shape, y_ND.shape[-1])
            g_w = torch.einsum("tkd,td->tk", y_TKD, g)
        return g_y, g_w, None


class LocalDispatcher(Dispatcher):
    """EP=1: every expert is local; nothing is sent."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        T, k = routing.expert_idx_TK.shape
        E, A = routing.num_experts, T * k
        dev = x_TD.device
        expert_A = routing.expert_idx_TK.flatten()
        kept_A = None if routing.kept_TK is None else routing.kept_TK.flatten()
        if kept_A is not None:  # dropped assignments sort after every expert
            expert_A = torch.where(kept_A, expert_A, E)
        order = torch.argsort(expert_A, stable=True)  # row -> assignment
        counts = torch.bincount(expert_A, minlength=E + 1)
        pos_A = torch.empty_like(order)
        pos_A[order] = torch.arange(A, device=dev)
        if routing.pad_to_capacity:
            C = routing.capacity
            starts = torch.cumsum(counts, 0) - counts
            rank_A = pos_A - starts[expert_A]
            src_A = expert_A.clamp(max=E - 1) * C + rank_A.clamp(max=C - 1)
            slot_C = torch.arange(C, device=dev)
            valid_N = (slot_C < counts[:E, None]).flatten()
            assign_N = order[(starts[:E, None] + slot_C).clamp(max=A - 1).flatten()]
            tokens_per_expert = torch.full((E,), C, dtype=torch.long, device=dev)
        else:
            assign_N, src_A = order, pos_A
            valid_N = None if kept_A is None else kept_A[order]
            tokens_per_expert = counts[:E]
        c = LocalDispatchContext(
            k, assign_N, valid_N, src_A, kept_A, routing.weights_TK, x_TD.dtype
        )
        return _Dispatch.apply(x_TD, c), tokens_per_expert, c

    def combine(self, y_ND: torch.Tensor, ctx: LocalDispatchContext) -> torch.Tensor:
        return _Combine.apply(y_ND, ctx.weights_TK, ctx)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three [E, ...] tensors; computes only the rows it is given.

    Expert parallelism shards dim 0 and sets ``expert_offset`` (the global id of local
    expert 0); expert tensor parallelism shards the FFN dim (``w1``/``w3`` columns, ``w2``
    rows: the output is then a partial sum) and sets ``ffn_offset`` / ``ffn_full``. Either
    way each local slice initialises exactly as in the unsharded model.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down
        self.expert_offset = 0
        self.ffn_offset, self.ffn_full = 0, hidden
        self.grouped_mm_impl = "auto"  # auto | fused | loop

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        impl = self.grouped_mm_impl
        h = F.silu(grouped_mm(x_ND, self.w1, tokens_per_expert_E, impl=impl))
        h = h * grouped_mm(x_ND, self.w3, tokens_per_expert_E, impl=impl)
        return grouped_mm(h, self.w2, tokens_per_expert_E, impl=impl)

    def init_params(self, init: Initializer, prefix: str) -> None:
        F_l, f0 = self.w1.shape[2], self.ffn_offset
        for e in range(self.w1.shape[0]):
            g = self.expert_offset + e
            for name, ffn_dim, std in (("w1", 1, init.std), ("w3", 1, init.std),
                                       ("w2", 0, init.out_std)):
                local = getattr(self, name)[e]
                if F_l == self.ffn_full or local.is_meta:
                    init.normal_(local, f"{prefix}.{name}[{g}]", std)
                    continue
                shape = list(local.shape)
                shape[ffn_dim] = self.ffn_full
                full = torch.empty(shape, dtype=local.dtype, device=local.device)
                init.normal_(full, f"{prefix}.{name}[{g}]", std)
                with torch.no_grad():
                    local.copy_(full.narrow(ffn_dim, f0, F_l))


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


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d = cfg.moe, cfg.hidden_size
        self.moe = m
        self.router = Router(cfg)
        self.experts = GroupedExperts(m.num_experts, d, m.expert_ffn_hidden_size)
        self.shared_experts = self.shared_gate = None
        if m.num_shared_experts > 0:
            width = m.shared_expert_ffn_hidden_size or m.expert_ffn_hidden_size
            self.shared_experts = FeedForward(d, m.num_shared_experts * width)
            if m.shared_expert_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False)
        self.dispatcher: Dispatcher = LocalDispatcher()
        # The ranks sharing this rank's micro-batch (TP token split, CP): parallel/ sets it.
        self.token_group: TokenGroup = SINGLE
        self.aux_loss_scale = 1.0
        # Statistics since the last pop_stats(); never synced to the host in forward.
        self.register_buffer("stat_counts", torch.zeros(m.num_experts, dtype=torch.long), False)
        self.register_buffer("stat_dropped", torch.zeros((), dtype=torch.long), False)
        self.register_buffer("stat_assignments", torch.zeros((), dtype=torch.long), False)
        for name in _STAT_LOSSES:
            self.register_buffer(f"stat_{name}", torch.zeros(()), persistent=False)

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(self, tuple(f"stat_{n}" for n in _STAT_LOSSES), fn, recurse)

    def init_params(self, init: Initializer, prefix: str) -> None:
        if self.shared_gate is not None:
            init.normal_(self.shared_gate.weight, f"{prefix}.shared_gate.weight", init.std)
        with torch.no_grad():
            for buf in self.buffers(recurse=False):
                buf.zero_()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        g = self.token_group
        r = self.router(x_TD, num_seqs=B, group=g)
        x_ND, tokens_per_expert, ctx = self.dispatcher.dispatch(x_TD, r.routing)
        y_TD = self.dispatcher.combine(self.experts(x_ND, tokens_per_expert), ctx)
        if self.shared_experts is not None:
            shared = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                gate_w = g.shared_param(self.shared_gate.weight)
                shared = shared * torch.sigmoid(F.linear(x_TD, gate_w))
            y_TD = y_TD + shared
        weighted = self._weighted_losses(r)
        if weighted and torch.is_grad_enabled():
            y_TD = _AuxLossGrad.apply(y_TD, sum(weighted.values()), self.aux_loss_scale)
        self._record(r, weighted)
        return y_TD.view(B, T, -1)

    def _weighted_losses(self, r: RouterOutput) -> dict[str, torch.Tensor]:
        m = self.moe
        coeffs = {
            "aux_loss": m.aux_loss_coeff,
            "seq_aux_loss": m.seq_aux_loss_coeff,
            "z_loss": m.z_loss_coeff,
        }
        return {n: c * getattr(r, n) for n, c in coeffs.items() if getattr(r, n) is not None}

    @torch.no_grad()
    def _record(self, r: RouterOutput, weighted: dict[str, torch.Tensor]) -> None:
        if _in_backward():  # activation-checkpoint recompute: already counted once
            return
        self.stat_counts += r.counts_E
        self.stat_dropped += r.num_dropped
        self.stat_assignments += r.num_assignments
        for name, value in weighted.items():
            getattr(self, f"stat_{name}").add_(value.detach() * self.aux_loss_scale)

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Statistics since the last pop (counts [E] before capacity drops; dropped and
        total assignments; aux losses as coeff * value * aux_loss_scale), then reset."""
        out = {
            "counts": self.stat_counts.float(),
            "dropped": self.stat_dropped.float(),
            "assignments": self.stat_assignments.float(),
        }
        out.update({n: getattr(self, f"stat_{n}").clone() for n in _STAT_LOSSES})
        with torch.no_grad():
            for buf in self.buffers(recurse=False):
                buf.zero_()
        return out

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: ``bias += rate * sign(mean(counts) - counts)`` (fp32).
        ``counts_E`` must be the globally reduced counts of the step."""
        bias = self.router.expert_bias
        if bias is None:
            return
        c = counts_E.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(c.mean() - c), alpha=self.moe.expert_bias_update_rate)


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """d(objective)/d(aux) for every MoE layer; the trainer sets 1/(micro-batches * dp)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = float(scale)
