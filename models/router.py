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

Token groups (the seam tensor/context parallelism fill in, see ``TokenGroup``): when one
micro-batch's tokens are split over several ranks (TP with its MoE token split, CP), each
rank routes only its own tokens, but every statistic is the micro-batch's: expert counts,
the switch / per-sequence / z losses are summed over the group in one all-reduce, and
capacity drops are decided on the group's gathered expert ids, so the loss and the drops
are exactly those of one process holding the whole micro-batch (Megatron computes the
capacity per rank, which makes the drops depend on TP and CP). Exactly, given the same
scores: another layout rounds the scores differently in their last bit, and with
drop_policy="probs" two assignments whose scores are 1 ulp apart at an expert's capacity
boundary can swap (seen once in the parity runs: 0.53803802 against 0.53803796).

Null experts (AdaMoE, ``num_null_experts`` = n; docs/moe_features.md): the router has
E + n rows, top-k runs over all E + n, and a pick of a null expert (id >= E) becomes an
unused slot: ``expert_idx`` -1, ``kept`` False, weight 0, so no dispatcher moves or
computes anything for it, and it is not a capacity drop (capacity applies to real experts
only). As AdaMoE's released code, the real picks' weights are renormalised among
themselves (``norm_topk_prob``), so a token's output is a weighted mean of its real
experts (zero when all k picks are null). Counts and the load-balancing losses cover all
E + n entries (the null experts' use is steered like any expert's).

Global-batch balance (``aux_loss_scope=global_batch``): the switch loss's load fractions
f_i come from ``lb_counts``, a persistent buffer holding the previous step's assignment
counts over the whole global batch (set by ``parallel.moe_stats.MoEStats.pop`` from the
counts it reduces anyway); P_i stays this micro-batch's (differentiable). Before the first
step's counts exist (all zero) f is uniform: a constant loss, no balance gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.grouped_gemm import no_autocast
from models.layers import Initializer, keep_fp32_apply
from models.permute import count_ids


class TokenGroup:
    """The ranks that together hold one micro-batch's tokens; this base is one process
    holding them all (every method is the identity). ``parallel/`` subclasses it.

    Local tokens are ``[B, S_local]`` (sequence-major); the group's sequences are
    ``[B, S = size * S_local]`` in the single-process order.
    """

    size: int = 1

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group. Backward is the identity: what consumes the sum (an aux
        loss) is computed identically on every rank of the group, so each rank's local
        gradient is already the true one."""
        return x

    def gather_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        """``[B, S_local, ...]`` -> ``[B, S, ...]`` in sequence order (no autograd)."""
        return x_BS

    def local_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` -> this rank's ``[B, S_local, ...]``."""
        return x_BS

    def shared_param(self, w: torch.Tensor) -> torch.Tensor:
        """A weight replicated over the group but applied to different tokens on each rank:
        identity forward, gradient summed over the group in backward."""
        return w


SINGLE = TokenGroup()


@dataclass
class Routing:
    """What a dispatcher consumes: k assignments per token, sorted nowhere yet."""

    expert_idx_TK: torch.Tensor  # int64, global expert ids
    weights_TK: torch.Tensor  # fp32 combine weights, 0 where dropped (differentiable)
    num_experts: int
    kept_TK: Optional[torch.Tensor] = None  # bool; None = dropless (all kept)
    capacity: Optional[int] = None  # per-expert rows when capacity_factor is set
    pad_to_capacity: bool = False  # every expert gets exactly `capacity` rows
    # dropless, no null experts: this rank's assignments per expert (int64 [E]), which a
    # dispatcher need not count again; None: count them
    local_counts_E: Optional[torch.Tensor] = None


@dataclass
class RouterOutput:
    routing: Routing
    logits_TE: torch.Tensor  # fp32
    counts_E: torch.Tensor  # int64 assignments per expert (E real, then n null), before drops
    num_dropped: Optional[torch.Tensor]  # int64 scalar (real experts only); None: no capacity
    num_assignments: int  # T * k (counts_E, num_dropped, the losses: over the token group)
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
    counts = count_ids(expert_A, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(A, device=order.device) - starts[expert_A[order]]
    return ranks


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.moe = m
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.num_null = m.num_null_experts
        # one row per real expert, then one per null expert (AdaMoE gives each its own)
        self.weight = nn.Parameter(torch.empty(m.num_experts + self.num_null, cfg.hidden_size))
        if m.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        if m.aux_loss_scope == "global_batch":  # persistent: checkpoints carry it
            self.register_buffer("lb_counts", torch.zeros(self.weight.shape[0]))
        else:
            self.lb_counts = None

    def _apply(self, fn, recurse=True):
        return keep_fp32_apply(self, ("expert_bias", "lb_counts"), fn, recurse)

    def init_params(self, init: Initializer, prefix: str) -> None:
        init.normal_(self.weight, f"{prefix}.weight", init.std)
        with torch.no_grad():
            for buf in (self.expert_bias, self.lb_counts):
                if buf is not None:
                    buf.zero_()

    @torch.no_grad()
    def set_global_counts(self, counts: torch.Tensor) -> None:
        """The step's assignment counts over the global batch ([E + n], reduced over every
        rank): the next step's switch-loss load fractions (global_batch scope only)."""
        if self.lb_counts is not None:
            self.lb_counts.copy_(counts.to(self.lb_counts.device, torch.float32))

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

    def forward(
        self, x_TD: torch.Tensor, num_seqs: int = 1, group: TokenGroup = SINGLE
    ) -> RouterOutput:
        """x_TD: this rank's tokens, sequence-major (``num_seqs`` sequences of equal
        length, needed by the per-sequence aux loss and by token groups); ``group``: the
        ranks sharing the micro-batch (see the module docstring)."""
        with no_autocast(x_TD.device.type):
            return self._route(x_TD, num_seqs, group)

    def _route(self, x_TD: torch.Tensor, num_seqs: int, group: TokenGroup) -> RouterOutput:
        m, E, k = self.moe, self.num_experts, self.top_k
        En = E + self.num_null  # every router entry, null experts included
        B = num_seqs
        T = x_TD.shape[0] * group.size  # the micro-batch's tokens
        S = T // B
        logits = F.linear(x_TD.float(), group.shared_param(self.weight).float())
        real = None
        lean = (m.score_func == "softmax" and m.norm_topk_prob and self.expert_bias is None
                and m.num_groups == 0 and not self.num_null and m.capacity_factor is None)
        if lean:
            # Mixtral routing, the common case: top-k of the logits, weights = softmax over
            # those k (= the renormalised top-k probabilities); the [T, E] softmax is only
            # computed when an aux loss needs it.
            top_logits, idx = logits.topk(k, dim=-1)
            weights = top_logits.softmax(-1)
            aux = m.aux_loss_coeff > 0 or m.seq_aux_loss_coeff > 0
            scores = logits.softmax(-1) if aux else None
        else:
            scores = logits.softmax(-1) if m.score_func == "softmax" else logits.sigmoid()
            sel = logits if (m.score_func == "softmax" and m.norm_topk_prob) else scores
            if self.expert_bias is not None:
                sel = sel + self.expert_bias
            idx = self._topk(sel.detach())
            top_scores = scores.gather(1, idx)
            real = idx < E if self.num_null else None  # [T, k] picks of a real expert
            weights = top_scores if real is None else top_scores * real
            if real is not None and m.norm_topk_prob and m.score_func == "softmax":
                # renormalised over the real picks only; all-null tokens keep zero weights
                denom = weights.sum(-1, keepdim=True)
                weights = weights / torch.where(denom > 0, denom, 1.0)
            elif m.norm_topk_prob and m.score_func == "softmax":
                weights = top_scores / top_scores.sum(-1, keepdim=True)
            elif m.norm_topk_prob and k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if m.topk_scaling_factor != 1.0:
            weights = weights * m.topk_scaling_factor

        kept, capacity = None, None
        num_dropped = None  # None: nothing dropped (no capacity)
        if m.capacity_factor is not None:
            capacity = expert_capacity(T, E, k, m.capacity_factor, m.min_capacity)
            kept, num_dropped = self._capacity_mask(idx, top_scores.detach(), B, capacity, group)
            weights = weights * kept
        elif real is not None:
            kept = real

        # Statistics of the micro-batch: local sums, then one all-reduce over the group.
        stats: dict[str, torch.Tensor] = {"counts": count_ids(idx, En)}
        global_lb = m.aux_loss_scope == "global_batch"
        if m.aux_loss_coeff > 0 or m.seq_aux_loss_coeff > 0:
            aux_scores = scores
            if m.score_func == "sigmoid":
                aux_scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            plain = idx
            if self.expert_bias is not None or m.num_groups > 0:
                plain = aux_scores.detach().topk(k, dim=-1)[1]
            if m.aux_loss_coeff > 0:
                stats["scores_sum"] = aux_scores.sum(0)
                if plain is not idx and not global_lb:
                    stats["plain_counts"] = count_ids(plain, En)
            if m.seq_aux_loss_coeff > 0:
                S_l = plain.shape[0] // B
                seq_of = torch.arange(B, device=idx.device).repeat_interleave(S_l * k) * En
                seq_counts = count_ids(plain.flatten() + seq_of, B * En)
                stats["seq_counts"] = seq_counts.view(B, En)
                stats["seq_scores"] = aux_scores.view(B, S_l, En).sum(1)
        if m.z_loss_coeff > 0:
            stats["z_sum"] = torch.logsumexp(logits, dim=-1).square().sum()
        stats = _group_sum(stats, group)

        counts = stats["counts"]
        # this rank's assignments per expert, when they are the dispatcher's rows per expert
        local_counts = counts if (group.size == 1 and kept is None and real is None) else None
        if real is not None:  # a null pick is an unused slot for every dispatcher
            idx = torch.where(real, idx, -1)
        routing = Routing(idx, weights, E, kept, capacity, m.pad_to_capacity, local_counts)
        out = RouterOutput(routing, logits, counts, num_dropped, T * k)
        if m.aux_loss_coeff > 0 and global_lb:
            # f_i: the previous step's global-batch load fractions (uniform before any)
            g = self.lb_counts
            total = g.sum()
            f = torch.where(total > 0, g / total.clamp_min(1.0), torch.full_like(g, 1.0 / En))
            out.aux_loss = (stats["scores_sum"] * f).sum() * (En / T)
        elif m.aux_loss_coeff > 0:
            plain_counts = stats.get("plain_counts", counts)
            out.aux_loss = (stats["scores_sum"] * plain_counts).sum() * (En / (k * T * T))
        if m.seq_aux_loss_coeff > 0:
            per_seq = (stats["seq_scores"] * stats["seq_counts"]).sum(-1)
            out.seq_aux_loss = per_seq.mean() * (En / (k * S * S))
        if m.z_loss_coeff > 0:
            out.z_loss = stats["z_sum"] / T
        return out

    def _capacity_mask(
        self, idx_TK, key_TK, num_seqs: int, capacity: int, group: TokenGroup
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept [T_local, k], dropped count of the micro-batch): ranks within each expert
        are taken over the whole micro-batch in single-process token order. Null picks
        are not kept and not counted as dropped."""
        m, E = self.moe, self.num_experts
        En = E + self.num_null
        T_l, k = idx_TK.shape
        by_probs = m.drop_policy == "probs"
        idx_g = idx_TK
        key_g = key_TK if by_probs else None
        if group.size > 1:  # ids are exact in fp32 (< 2**24): one gather for both
            packed = torch.cat([idx_TK.float(), key_TK], 1).view(num_seqs, T_l // num_seqs, 2 * k)
            packed = group.gather_seq(packed).reshape(-1, 2 * k)
            idx_g, key_g = packed[:, :k].long(), packed[:, k:] if by_probs else None
        key_A = key_g.flatten() if key_g is not None else None
        kept_g = (rank_within_expert(idx_g.flatten(), En, key_A) < capacity).view(-1, k)
        real_g = idx_g < E  # capacity is for real experts; a null pick is never kept
        num_dropped = (real_g & ~kept_g).sum()
        kept_g = kept_g & real_g
        if group.size > 1:
            kept_g = group.local_seq(kept_g.view(num_seqs, -1, k)).reshape(T_l, k)
        return kept_g, num_dropped


def _group_sum(stats: dict[str, torch.Tensor], group: TokenGroup) -> dict[str, torch.Tensor]:
    """Sum every statistic over the token group in one collective (counts travel as fp32,
    exact below 2**24 per micro-batch and expert)."""
    if group.size == 1:
        return stats
    keys = list(stats)
    flat = group.all_sum(torch.cat([stats[n].float().reshape(-1) for n in keys]))
    out, i = {}, 0
    for n in keys:
        v = flat[i : i + stats[n].numel()].view(stats[n].shape)
        out[n] = v.round().long() if not stats[n].is_floating_point() else v
        i += stats[n].numel()
    return out
