"""Context parallelism: the sequence split over ``cp`` ranks, attention exact over all of it.

Load balance. A sequence of ``T`` tokens is cut into ``2*cp`` chunks; CP rank ``r`` holds
chunk ``r`` and chunk ``2*cp-1-r`` (a head and a tail chunk), so under a causal mask every
rank has the same attention work — the split Megatron and torchtitan use. The trainer cuts
every micro-batch tensor (tokens, labels, loss mask, positions, document ids) with the same
index (:func:`cp_index`), so RoPE positions follow the sharding.

Attention: all-gather of K and V over the CP group (Llama 3's choice), put in sequence
order, then the blocked attention of models/attention.py: the local queries in blocks of
``BLOCK_Q``, each against the key range it can see (its causal prefix from its documents'
start, further ahead inside a bidirectional block), with a per-block mask built from
*global* token indices and the gathered document / block ids — so causal, packed-document
and block-bidirectional masks are exact with no per-mask code, and no ``[T/cp, T]`` mask
ever exists (mask memory O(BLOCK_Q * T) transient, O(T) kept). Why not ring
attention: with GQA the gathered K/V is ``2*Hkv/H`` of the activations the ring would pass
anyway, arbitrary masks need no chunk-pair bookkeeping, and the backward is a plain
reduce-scatter; the cost is O(T) K/V per rank, where a ring holds O(T/cp) (see
docs/parallelism.md for the measured memory). The gradient of the gathered K/V is
reduce-scattered back to its owners.

MoE layers: a CP rank's tokens are a non-contiguous part of every sequence, so the router's
token group is the attention ``tp_cp`` block with an explicit index map
(:class:`IndexedSeqGroup`): expert counts and aux/z losses are summed over it, capacity is
decided on its tokens gathered back into sequence order — as in one process. Dense
gradients are summed over ``dp_cp`` by the DP engine; experts over ``edp``, which folds the
CP ranks (e.g. attention CP2·DP2, experts EP4).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from models.attention import AttentionPlan, blocked_attention, plan_attention
from parallel.collectives import all_gather_autograd, sum_backward
from parallel.token_group import SeqChunkGroup, gather_seq

__all__ = [
    "IndexedSeqGroup",
    "apply_context_parallel",
    "check_context_parallel",
    "cp_index",
    "shard_batch",
]


def check_context_parallel(seq_len: int, cp: int, tp: int) -> None:
    """Raise ``ValueError`` when ``seq_len`` cannot be cut into the ``2*cp`` chunks of the
    load-balanced layout, each split again over the ``tp`` ranks."""
    if cp > 1 and seq_len % (2 * cp * tp):
        raise ValueError(
            f"trainer.seq_len={seq_len} must be a multiple of 2*parallel.cp*parallel.tp="
            f"{2 * cp * tp} (each CP rank holds a head and a tail chunk, split over TP)")


def cp_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions held by CP ``rank``: chunk ``rank`` then chunk ``2cp-1-rank`` of
    ``2cp`` equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"trainer.seq_len={seq_len} must be a multiple of 2*parallel.cp={2 * cp}")
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


def shard_batch(mb: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """This CP rank's part of every [B, T] tensor of a micro-batch."""
    seq_len = next(iter(mb.values())).shape[1]
    idx = cp_index(seq_len, cp, rank, device=next(iter(mb.values())).device)
    return {k: v.index_select(1, idx) for k, v in mb.items()}


class ContextParallelAttention:
    """``Attention.attn_fn`` under CP: all-gather K/V (and the mask ids) over the CP group,
    then blocked attention (models/attention.py) of the local queries against the keys
    they can see. ``scale``: softmax scale (default ``Dqk ** -0.5``); ``Dv != Dqk`` works
    (MLA)."""

    def __init__(self, group):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._idx: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached: tuple = ()  # (key, doc ids, block ids, AttentionPlan): see _plan

    def _indices(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the local queries, and the permutation that puts the
        gathered keys (rank order) into sequence order (cached)."""
        key = (seq_len, str(device))
        if key not in self._idx:
            gathered = torch.cat([cp_index(seq_len, self.cp, r, device) for r in range(self.cp)])
            self._idx[key] = (cp_index(seq_len, self.cp, self.rank, device),
                              torch.argsort(gathered))
        return self._idx[key]

    def _plan(self, q, doc_ids_BT, block_ids_BT) -> AttentionPlan:
        """The blocked-attention plan of this micro-batch: the local queries (global
        positions: head chunk ``rank``, tail chunk ``2cp-1-rank``) in blocks, each against
        the key range of the sequence-ordered gathered keys it can see — its causal prefix
        (from its documents' start), or further ahead inside a bidirectional block. The
        ids are gathered once (O(T)); no dense mask exists, each block builds its own
        ``[block, range]`` mask (models/attention.py). Every layer sees the same positions
        and ids, so the plan is built once per micro-batch."""
        key = (q.shape[2], q.device)
        c = self._cached
        if c and c[0] == key and c[1] is doc_ids_BT and c[2] is block_ids_BT:
            return c[3]
        seq_len = q.shape[2] * self.cp
        q_idx, order = self._indices(seq_len, q.device)
        k_doc = k_blk = None
        if doc_ids_BT is not None:
            k_doc = gather_seq(doc_ids_BT, self.group).index_select(1, order)
        if block_ids_BT is not None:
            k_blk = gather_seq(block_ids_BT, self.group).index_select(1, order)
        plan = plan_attention(q_idx, seq_len, doc_ids_BT, k_doc, block_ids_BT, k_blk)
        self._cached = (key, doc_ids_BT, block_ids_BT, plan)
        return plan

    def _gather_kv(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        # [B, H, T_l, Dh] -> [B, H, T, Dh] in sequence order; the gradient is
        # reduce-scattered back to the owners
        full = all_gather_autograd(x.movedim(2, 0).contiguous(), self.group).movedim(0, 2)
        return full.index_select(2, order)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        plan = self._plan(q, doc_ids_BT, block_ids_BT)
        _, order = self._indices(q.shape[2] * self.cp, q.device)
        k_seq, v_seq = self._gather_kv(k, order), self._gather_kv(v, order)
        return blocked_attention(q, k_seq, v_seq, plan, scale)


class IndexedSeqGroup(SeqChunkGroup):
    """Ranks of ``group`` each hold the sequence positions ``index[g]`` (the same for every
    sequence of the micro-batch); ``param_group``: the ranks whose replicated router /
    shared-gate weights must sum their gradients (the TP ranks; the DP engine sums over
    ``dp_cp``). Statistics are summed over ``group`` as in :class:`SeqChunkGroup`."""

    def __init__(self, group, index: list[torch.Tensor], param_group=None):
        super().__init__(group)
        self.param_group = param_group
        self.index = index[self.rank]
        self.order = torch.argsort(torch.cat(index))  # gathered order -> sequence order

    def gather_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        out = super().gather_seq(x_BS)
        return out.index_select(1, self.order.to(out.device))

    def local_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return x_BS.index_select(1, self.index.to(x_BS.device))

    def shared_param(self, w: torch.Tensor) -> torch.Tensor:
        if self.param_group is None or not w.requires_grad:
            return w
        return sum_backward(w, self.param_group)


def apply_context_parallel(model: nn.Module, dims, seq_len: int) -> None:
    """Swap every attention core for the CP one and give the MoE layers the ``tp_cp``
    token group. Apply after tensor parallelism (it replaces TP's token group)."""
    from models.layers import Attention
    from models.mamba import MambaMixer
    from models.mla import MultiHeadLatentAttention
    from models.moe import MoELayer
    from models.mot import MoTAttention
    from parallel.ssm_context_parallel import ContextParallelScan

    cp_group = dims.group("cp")
    attn = ContextParallelAttention(cp_group)
    tp, cp = dims.tp, dims.cp
    index = []
    for g in range(tp * cp):  # tp_cp group rank g = cp_rank * tp + tp_rank
        local = cp_index(seq_len, cp, g // tp)
        index.append(local.unflatten(0, (tp, -1))[g % tp])
    for m in model.modules():
        # MLA: the core all-gathers the up-projected K (nope + shared rope) and V; gathering
        # the compressed c_kv + k_rope and up-projecting locally would move less (not done)
        if isinstance(m, (Attention, MoTAttention, MultiHeadLatentAttention)):
            m.attn_fn = attn
        elif isinstance(m, MambaMixer):  # conv halos and scan states between chunks
            m.seq = ContextParallelScan(cp_group)
        elif isinstance(m, MoELayer):
            m.token_group = IndexedSeqGroup(dims.group("tp_cp"), index,
                                            dims.group("tp") if tp > 1 else None)
