"""Context parallelism: the sequence split over ``cp`` ranks, attention exact over all of it.

Load balance. A sequence of ``T`` tokens is cut into ``2*cp`` chunks; CP rank ``r`` holds
chunk ``r`` and chunk ``2*cp-1-r`` (a head and a tail chunk), so under a causal mask every
rank has the same attention work — the split Megatron and torchtitan use. The trainer cuts
every micro-batch tensor (tokens, labels, loss mask, positions, document ids) with the same
index (:func:`cp_index`), so RoPE positions follow the sharding.

Attention: all-gather of K and V over the CP group (Llama 3's choice), then one masked
SDPA of the local queries against all keys. The mask is built from *global* token indices
(and gathered document / block ids), so causal, packed-document and block-bidirectional
masks (models/layers.py ``mask_from_ids``) are exact with no per-mask code. Why not ring
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
import torch.nn.functional as F
from torch import nn

from models.layers import mask_from_ids
from models.router import TokenGroup
from parallel.dispatch import _all_gather, _AllGather
from parallel.token_group import _SumBackward, _SumForward

__all__ = ["IndexedSeqGroup", "apply_context_parallel", "cp_index", "shard_batch"]


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


def _gather_seq(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather along ``dim`` in group-rank order, no autograd."""
    x = x.movedim(dim, 0)
    return _all_gather(x, group).movedim(0, dim)


class ContextParallelAttention:
    """``Attention.attn_fn`` under CP: all-gather K/V (and the mask ids) over the CP group,
    then masked SDPA of the local queries against every key."""

    def __init__(self, group):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._idx: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask: tuple = ()  # (key, doc ids, block ids, additive mask): see _bias

    def _indices(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the local queries and of the gathered keys (cached)."""
        key = (seq_len, str(device))
        if key not in self._idx:
            self._idx[key] = (
                cp_index(seq_len, self.cp, self.rank, device),
                torch.cat([cp_index(seq_len, self.cp, r, device) for r in range(self.cp)]),
            )
        return self._idx[key]

    def _bias(self, q, doc_ids_BT, block_ids_BT) -> torch.Tensor:
        """The additive mask (0 / -inf, in the query dtype) for this micro-batch. Every
        layer sees the same positions and ids, so the mask is built once and the same
        tensor is passed to every layer's SDPA: autograd then saves one copy for the
        backward instead of one per layer (a dense [T/cp, T] mask is the largest
        activation of a small model at long sequence lengths)."""
        key = (q.shape[2], q.device, q.dtype)
        if self._mask and self._mask[0] == key and self._mask[1] is doc_ids_BT \
                and self._mask[2] is block_ids_BT:
            return self._mask[3]
        q_idx, k_idx = self._indices(q.shape[2] * self.cp, q.device)
        k_doc = k_blk = None
        if doc_ids_BT is not None:
            k_doc = _gather_seq(doc_ids_BT, self.group, 1)
        if block_ids_BT is not None:
            k_blk = _gather_seq(block_ids_BT, self.group, 1)
        allowed = mask_from_ids(q_idx, k_idx, doc_ids_BT, k_doc, block_ids_BT, k_blk)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
        self._mask = (key, doc_ids_BT, block_ids_BT, bias)
        return bias

    def _gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        # [B, H, T_l, Dh] -> [B, H, cp*T_l, Dh], gradient reduce-scattered to the owners
        return _AllGather.apply(x.movedim(2, 0).contiguous(), self.group).movedim(0, 2)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        k_all, v_all = self._gather_kv(k), self._gather_kv(v)
        return F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=self._bias(q, doc_ids_BT, block_ids_BT),
            enable_gqa=k.shape[1] != q.shape[1]
        )


class IndexedSeqGroup(TokenGroup):
    """Ranks of ``group`` each hold the sequence positions ``index[g]`` (the same for every
    sequence of the micro-batch); ``param_group``: the ranks whose replicated router /
    shared-gate weights must sum their gradients (the TP ranks; the DP engine sums over
    ``dp_cp``)."""

    def __init__(self, group, index: list[torch.Tensor], param_group=None):
        self.group, self.param_group = group, param_group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.index = index[self.rank]
        self.order = torch.argsort(torch.cat(index))  # gathered order -> sequence order

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumForward.apply(x, self.group)

    def gather_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        out = _gather_seq(x_BS.detach(), self.group, 1)
        return out.index_select(1, self.order.to(out.device))

    def local_seq(self, x_BS: torch.Tensor) -> torch.Tensor:
        return x_BS.index_select(1, self.index.to(x_BS.device))

    def shared_param(self, w: torch.Tensor) -> torch.Tensor:
        if self.param_group is None or not w.requires_grad:
            return w
        return _SumBackward.apply(w, self.param_group)


def apply_context_parallel(model: nn.Module, dims, seq_len: int) -> None:
    """Swap every attention core for the CP one and give the MoE layers the ``tp_cp``
    token group. Apply after tensor parallelism (it replaces TP's token group)."""
    from models.layers import Attention
    from models.moe import MoELayer

    cp_group = dims.group("cp")
    attn = ContextParallelAttention(cp_group)
    tp, cp = dims.tp, dims.cp
    index = []
    for g in range(tp * cp):  # tp_cp group rank g = cp_rank * tp + tp_rank
        local = cp_index(seq_len, cp, g // tp)
        index.append(local.unflatten(0, (tp, -1))[g % tp])
    for m in model.modules():
        if isinstance(m, Attention):
            m.attn_fn = attn
        elif isinstance(m, MoELayer):
            m.token_group = IndexedSeqGroup(dims.group("tp_cp"), index,
                                            dims.group("tp") if tp > 1 else None)
