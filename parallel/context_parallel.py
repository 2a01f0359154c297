"""Context parallelism: the sequence split over ``cp`` ranks, attention exact over all of it.

Load balance. A sequence of ``T`` tokens is cut into ``2*cp`` chunks; CP rank ``r`` holds
chunk ``r`` and chunk ``2*cp-1-r`` (a head and a tail chunk), so under a causal mask every
rank has the same attention work — the split Megatron and torchtitan use. The trainer cuts
every micro-batch tensor (tokens, labels, loss mask, positions, document ids) with the same
index (:func:`cp_index`), so RoPE positions follow the sharding.

Attention: all-gather of K and V over the CP group (Llama 3's choice), put in sequence
order, then masked SDPA of each local chunk against its causal prefix of the keys (all
keys when bidirectional blocks may look ahead). The masks are built from *global* token
indices (and gathered document / block ids), so causal, packed-document and
block-bidirectional masks (models/layers.py ``mask_from_ids``) are exact with no per-mask
code. Why not ring
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
    then masked SDPA of the local query chunks against the keys they can see."""

    def __init__(self, group):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._idx: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask: tuple = ()  # (key, doc ids, block ids, additive mask): see _bias

    def _indices(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the local queries, and the permutation that puts the
        gathered keys (rank order) into sequence order (cached)."""
        key = (seq_len, str(device))
        if key not in self._idx:
            gathered = torch.cat([cp_index(seq_len, self.cp, r, device) for r in range(self.cp)])
            self._idx[key] = (cp_index(seq_len, self.cp, self.rank, device),
                              torch.argsort(gathered))
        return self._idx[key]

    def _masks(self, q, doc_ids_BT, block_ids_BT) -> list[tuple[int, torch.Tensor]]:
        """``(number of keys, additive mask)`` per query chunk, for this micro-batch.

        Without blocks each of the two local chunks (head, tail) attends only its causal
        prefix of the sequence-ordered keys: ``(2cp+1)/(4cp)`` of the all-keys work. With
        bidirectional blocks a query may look ahead inside its block, so one chunk of all
        local queries against all keys. Every layer sees the same positions and ids, so
        the masks are built once per micro-batch and the same tensors go to every layer's
        SDPA: autograd keeps one copy, not one per layer (at long sequence lengths the
        masks are a small model's largest activation)."""
        key = (q.shape[2], q.device, q.dtype)
        if self._mask and self._mask[0] == key and self._mask[1] is doc_ids_BT \
                and self._mask[2] is block_ids_BT:
            return self._mask[3]
        t_local = q.shape[2]
        seq_len = t_local * self.cp
        q_idx, order = self._indices(seq_len, q.device)
        k_doc = k_blk = None
        if doc_ids_BT is not None:
            k_doc = gather_seq(doc_ids_BT, self.group).index_select(1, order)
        if block_ids_BT is not None:
            k_blk = gather_seq(block_ids_BT, self.group).index_select(1, order)
            chunks = [(0, t_local, seq_len)]
        else:
            c = t_local // 2  # head chunk `rank`, tail chunk `2cp-1-rank` (cp_index)
            chunks = [(0, c, (self.rank + 1) * c), (c, t_local, (2 * self.cp - self.rank) * c)]
        masks = []
        for lo, hi, n_keys in chunks:
            q_doc = doc_ids_BT[:, lo:hi] if doc_ids_BT is not None else None
            q_blk = block_ids_BT[:, lo:hi] if block_ids_BT is not None else None
            allowed = mask_from_ids(
                q_idx[lo:hi], torch.arange(n_keys, device=q.device),
                q_doc, None if k_doc is None else k_doc[:, :n_keys],
                q_blk, None if k_blk is None else k_blk[:, :n_keys],
            )
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            masks.append((n_keys, bias.masked_fill_(~allowed, float("-inf"))))
        self._mask = (key, doc_ids_BT, block_ids_BT, masks)
        return masks

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
    ) -> torch.Tensor:
        masks = self._masks(q, doc_ids_BT, block_ids_BT)
        _, order = self._indices(q.shape[2] * self.cp, q.device)
        k_seq, v_seq = self._gather_kv(k, order), self._gather_kv(v, order)
        outs, lo = [], 0
        for n_keys, bias in masks:
            hi = lo + bias.shape[2]
            outs.append(F.scaled_dot_product_attention(
                q[:, :, lo:hi], k_seq[:, :, :n_keys], v_seq[:, :, :n_keys], attn_mask=bias,
                enable_gqa=k.shape[1] != q.shape[1]))
            lo = hi
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


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
