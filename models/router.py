"""Top-k router (fp32): scores, (group-limited) selection, capacity, aux/z losses.

Semantics follow megatron-core 0.16 ``topk_routing_with_score_function`` (tested as an
oracle), with this mapping of our config:

- softmax, norm_topk_prob=True  <-> use_pre_softmax=False: select on the logits (the same
  experts as selecting on the softmax scores; with groups, a group's score is the sum of
  its best logits, as Megatron does), weights = softmax renormalised over the k chosen.
- softmax, norm_topk_prob=False <-> use_pre_softmax=True: select on softmax scores,
  weights = those scores.
- sigmoid <-> score_function="sigmoid": select on sigmoid(+bias), weights = sigmoid
  scores renormalised (denominator + 1e-20) when k > 1 and norm_topk_prob.

Deliberate differences (also exercised in tests/test_router_oracle.py):

- ``expert_bias`` also works with softmax (added to the selection tensor above); Megatron
  only allows it with sigmoid. The bias never enters the weights.
- Capacity follows DeepSpeed's ``_capacity``: ``ceil((T / E) * (capacity_factor * k))``
  computed in float32, floored at ``min_capacity`` (Megatron: float64, no floor).
- drop_policy="probs" ranks an expert's assignments by the router *score* (softmax/sigmoid
  probability before top-k renormalisation), as DeepSpeed's topkgating; Megatron ranks by
  the renormalised weight. The two agree when norm_topk_prob is False.
- A dropped assignment's weight is zeroed; the token's other weights are not renormalised
  (as Megatron; DeepSpeed renormalises over the surviving assignments).
- Load-balancing losses count each expert's load with a plain top-k of the scores, without
  bias or group limits (as Megatron and the DeepSeek-V3 paper), before capacity drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import Initializer, keep_fp32_apply


@dataclass
class Routing:
    """What a dispatcher consumes: k assignments per token, sorted nowhere yet."""

    expert_idx_TK: torch.Tensor  # int64, global expert ids
    weights_TK: torch.Tensor  # fp32 combine weights, 0 where dropped (differentiable)
    num_experts: int
    kept_TK: Optional[torch.Tensor] = None  # bool; None = dropless (all kept)
    capacity: Optional[int] = None  # per-expert rows when capacity_factor is set
    pad_to_capacity: bool = False  # every expert gets exactly `capacity` rows


@dataclass
class RouterOutput:
    routing: Routing
    logits_TE: torch.Tensor  # fp32
    counts_E: torch.Tensor  # int64 assignments per expert, before capacity drops
    num_dropped: torch.Tensor  # int64 scalar
    aux_loss: Optional[torch.Tensor] = None  # unweighted switch loss (coeff > 0 only)
    seq_aux_loss: Optional[torch.Tensor] = None  # unweighted per-sequence loss
    z_loss: Optional[torch.Tensor] = None  # unweighted z-loss


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """Rows per expert: DeepSpeed's formula, float32 arithmetic (host-only, no sync)."""
    cap = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(cap.item()), min_capacity)


def rank_within_expert(expert_A: torch.Tensor, num_experts: int, key_A=None) -> torch.Tensor:
    """Rank of each assignment among those of its expert: by position, or by ``key_A``
    descending (ties by position). Two stable sorts, no loop over tokens."""
    A = expert_A.numel()
    order = torch.arange(A, device=expert_A.device)
    if key_A is not None:
        order = torch.argsort(-key_A, stable=True)
    order = order[torch.argsort(expert_A[order], stable=True)]
    counts = torch.bincount(expert_A, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(A, device=order.device) - starts[expert_A[order]]
    return ranks


def switch_aux_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """E/(k T) * sum_e counts_e * mean_t(scores_te) (Switch/GShard, Megatron, DeepSpeed)."""
    T, E = scores_TE.shape
    return (scores_TE.sum(0) * counts_E).sum() * (E / (top_k * T * T))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.moe = m
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.weight = nn.Parameter(torch.empty(m.num_experts, cfg.hidden_size))
        if m.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(self, ("expert_bias",), fn, recurse)

    def init_params(self, init: Initializer, prefix: str) -> None:
        init.normal_(self.weight, f"{prefix}.weight", init.std)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    def _topk(self, sel_TE: torch.Tensor) -> torch.Tensor:
        m, T, E, k = self.moe, sel_TE.shape[0], self.num_experts, self.top_k
        if m.num_groups > 0:
            # Group score = sum of its best k/group_topk entries; keep the best group_topk.
            group_scores = sel_TE.view(T, m.num_groups, -1).topk(k // m.group_topk, dim=-1)[0]
            group_idx = group_scores.sum(-1).topk(m.group_topk, dim=-1)[1]
            group_mask = torch.zeros(T, m.num_groups, dtype=torch.bool, device=sel_TE.device)
            group_mask.scatter_(1, group_idx, True)
            expert_mask = group_mask.repeat_interleave(E // m.num_groups, dim=1)
            sel_TE = sel_TE.masked_fill(~expert_mask, float("-inf"))
        return sel_TE.topk(k, dim=-1)[1]

    def forward(self, x_TD: torch.Tensor, num_seqs: int = 1) -> RouterOutput:
        """x_TD: the micro-batch's tokens, sequence-major (``num_seqs`` sequences of equal
        length, needed only by the per-sequence aux loss)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route(x_TD, num_seqs)

    def _route(self, x_TD: torch.Tensor, num_seqs: int) -> RouterOutput:
        m, E, k = self.moe, self.num_experts, self.top_k
        T = x_TD.shape[0]
        logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.softmax(-1) if m.score_func == "softmax" else logits.sigmoid()
        sel = logits if (m.score_func == "softmax" and m.norm_topk_prob) else scores
        if self.expert_bias is not None:
            sel = sel + self.expert_bias
        idx = self._topk(sel.detach())
        top_scores = scores.gather(1, idx)
        weights = top_scores
        if m.norm_topk_prob and m.score_func == "softmax":
            weights = top_scores / top_scores.sum(-1, keepdim=True)
        elif m.norm_topk_prob and k > 1:
            weights = top_scores / (top_scores.sum(-1, keepdim=True) + 1e-20)
        if m.topk_scaling_factor != 1.0:
            weights = weights * m.topk_scaling_factor

        counts = torch.bincount(idx.flatten(), minlength=E)
        kept, capacity = None, None
        num_dropped = torch.zeros((), dtype=torch.long, device=idx.device)
        if m.capacity_factor is not None:
            capacity = expert_capacity(T, E, k, m.capacity_factor, m.min_capacity)
            key = top_scores.detach().flatten() if m.drop_policy == "probs" else None
            kept = (rank_within_expert(idx.flatten(), E, key) < capacity).view(T, k)
            weights = weights * kept
            num_dropped = (~kept).sum()
        routing = Routing(idx, weights, E, kept, capacity, m.pad_to_capacity)
        out = RouterOutput(routing, logits, counts, num_dropped)

        if m.aux_loss_coeff > 0 or m.seq_aux_loss_coeff > 0:
            aux_scores = scores
            if m.score_func == "sigmoid":
                aux_scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            plain = idx
            if self.expert_bias is not None or m.num_groups > 0:
                plain = aux_scores.detach().topk(k, dim=-1)[1]
            if m.aux_loss_coeff > 0:
                plain_counts = (
                    counts if plain is idx else torch.bincount(plain.flatten(), minlength=E)
                )
                out.aux_loss = switch_aux_loss(aux_scores, plain_counts, k)
            if m.seq_aux_loss_coeff > 0:
                B, S = num_seqs, T // num_seqs
                seq_of = torch.arange(B, device=idx.device).repeat_interleave(S * k) * E
                seq_counts = torch.bincount(plain.flatten() + seq_of, minlength=B * E).view(B, E)
                per_seq = (aux_scores.view(B, S, E).sum(1) * seq_counts).sum(-1)
                out.seq_aux_loss = per_seq.mean() * (E / (k * S * S))
        if m.z_loss_coeff > 0:
            out.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return out
