"""The one attention core: causal / packed-document / block-bidirectional masks in O(T)
mask memory.

Every attention module (``Attention``, ``MoTAttention``, the context-parallel core, MLA)
ends here. Two paths:

* No document or block ids, queries and keys the same positions: SDPA with
  ``is_causal`` — the fused kernels, no mask at all.
* Otherwise (ids, or CP's local queries against the gathered keys): *blocked* attention.
  The queries are cut into blocks of ``BLOCK_Q`` consecutive positions; each block gets
  one SDPA call over the one key range its queries can see (from the document start of
  its first document to its last query, or to the end of a bidirectional block that looks
  ahead), with a boolean ``[block, range]`` mask built from global positions and ids
  (:func:`mask_from_ids`). Fully masked key ranges are skipped; the mask exists for one
  block at a time and is never saved for the backward, which rebuilds it: the masks cost
  ``O(BLOCK_Q * T)`` transient memory instead of ``O(T^2)`` kept until the backward.
  On CPU (fp32, bf16) each block is an autograd Function around the fused CPU flash
  kernel: the keys before the block's first query that all its queries may see (the
  plan's ``unmasked`` prefix) run with no mask, the rest with the block's mask, the two
  merged by logsumexp; it keeps the output and logsumexp (O(block)) and calls the
  kernel's backward directly (no recomputation). Pure causal CP blocks thus only build a
  ``[BLOCK_Q, BLOCK_Q]`` mask. Elsewhere (CUDA, fp64) each block runs SDPA under non-reentrant
  activation checkpointing (its forward recomputed once in the backward). On CUDA a mask
  with GQA has no fused SDPA kernel, so :func:`sdpa` repeats K/V to H heads for the block
  (the memory-efficient kernel then applies). The CUDA path is untested here (no GPU).

Why not ``flex_attention`` + ``BlockMask``: in torch 2.13 flex_attention raises
``NotImplementedError`` for backward on CPU ("FlexAttention does not support backward on
CPU"), and this core must train on CPU (gloo parity tests, benchmarks) as it does on GPUs.

Head dims: q/k have ``Dqk``, v has ``Dv`` (MLA: ``Dv != Dqk`` is allowed). SDPA's fused
CPU kernel needs equal dims, so the narrower side is zero-padded (zero q/k columns add
nothing to the scores; zero v columns are sliced off) and the scale is passed explicitly
(default ``Dqk ** -0.5``; a caller such as MLA may pass its own ``scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "BLOCK_Q",
    "AttentionPlan",
    "blocked_attention",
    "causal_attention",
    "mask_from_ids",
    "plan_attention",
    "sdpa",
]

BLOCK_Q = 256
"""Queries per block of the blocked path: the transient mask is ``[B, 1, BLOCK_Q, keys]``."""


def mask_from_ids(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    q_blk: Optional[torch.Tensor] = None,
    k_blk: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean attention mask [B or 1, 1, Tq, Tk] (True = may attend) from token indices in
    the sequence (``*_idx`` [Tq] / [Tk]), optional document ids [B, T] (packed sequences:
    no attention across documents) and block ids [B, T] (tokens sharing a block id > 0
    see each other both ways, e.g. an image's patches; causal otherwise). The indices are
    global, so the same mask serves a context-parallel shard that holds any subset of
    the query positions and all keys. The dense reference; the blocked path builds it for
    one query block and one key range at a time."""
    allowed = k_idx[None, None, :] <= q_idx[None, :, None]
    if q_blk is not None:
        same = q_blk[:, :, None] == k_blk[:, None, :]
        allowed = allowed | (same & (q_blk[:, :, None] > 0))
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed.unsqueeze(1)


def _pad_dims(q, k, v, scale):
    """Equal head dims for the fused kernels (module docstring): (q, k, v, scale, Dv)."""
    dqk, dv = q.shape[-1], v.shape[-1]
    scale = dqk ** -0.5 if scale is None else scale
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    elif dv > dqk:
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    return q, k, v, scale, dv


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with GQA (``H % Hkv == 0``) and ``Dv != Dqk``
    kept on the fused kernels (module docstring). q [B, H, Tq, Dqk], k [B, Hkv, Tk, Dqk],
    v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv]. On CUDA a mask with GQA has no fused kernel
    (flash takes no mask, memory-efficient no GQA with a mask), so there K/V are repeated
    to H heads (for one block of the blocked path: O(block keys) extra)."""
    q, k, v, scale, dv = _pad_dims(q, k, v, scale)
    gqa = k.shape[1] != q.shape[1]
    if gqa and attn_mask is not None and q.device.type == "cuda":
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=gqa)
    return out[..., :dv]


@dataclass
class AttentionPlan:
    """Which keys each query block sees, for one micro-batch (shared by every layer).

    ``blocks``: ``(q_lo, q_hi, k_lo, k_hi)`` per block, local query rows ``q_lo:q_hi``
    against keys ``k_lo:k_hi``; ``unmasked[i]``: block i's queries may all attend every
    key in ``k_lo:unmasked[i]`` (no mask needed there; ``== k_lo`` when none). ``q_idx``
    [Tq]: global sequence positions of the queries; the keys are positions ``0 .. Tk-1``
    (sequence order). Ids are [B, Tq] / [B, Tk] or None."""

    blocks: list[tuple[int, int, int, int]]
    unmasked: list[int]
    q_idx: torch.Tensor
    q_doc: Optional[torch.Tensor]
    k_doc: Optional[torch.Tensor]
    q_blk: Optional[torch.Tensor]
    k_blk: Optional[torch.Tensor]

    def mask(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> torch.Tensor:
        """The boolean mask of one block: [B or 1, 1, q_hi-q_lo, k_hi-k_lo]."""
        def rows(t, lo, hi):
            return None if t is None else t[:, lo:hi]
        k_idx = torch.arange(k_lo, k_hi, device=self.q_idx.device)
        return mask_from_ids(self.q_idx[q_lo:q_hi], k_idx,
                             rows(self.q_doc, q_lo, q_hi), rows(self.k_doc, k_lo, k_hi),
                             rows(self.q_blk, q_lo, q_hi), rows(self.k_blk, k_lo, k_hi))


def _first_last(q_ids: torch.Tensor, k_ids: torch.Tensor, last: bool) -> torch.Tensor:
    """For each query (b, i): the first (``last``: last) key position j with
    ``k_ids[b, j] == q_ids[b, i]``; ``Tk`` (``last``: -1) when there is none. O(T)."""
    B, tk = k_ids.shape
    uniq, inv = torch.unique(torch.cat([k_ids, q_ids], dim=1), return_inverse=True)
    flat = inv + torch.arange(B, device=inv.device)[:, None] * uniq.numel()
    k_flat, q_flat = flat[:, :tk].reshape(-1), flat[:, tk:].reshape(-1)
    pos = torch.arange(tk, device=k_ids.device).expand(B, tk).reshape(-1)
    fill = -1 if last else tk
    out = torch.full((B * uniq.numel(),), fill, dtype=pos.dtype, device=pos.device)
    out = out.scatter_reduce(0, k_flat, pos, "amax" if last else "amin")
    return out[q_flat].view(q_ids.shape)


def plan_attention(
    q_idx: torch.Tensor,
    num_keys: int,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    q_blk: Optional[torch.Tensor] = None,
    k_blk: Optional[torch.Tensor] = None,
    block_q: Optional[int] = None,
) -> AttentionPlan:
    """Cut the queries (global positions ``q_idx``, [Tq]) into blocks of at most
    ``block_q`` consecutive positions and find each block's key range among keys
    ``0 .. num_keys-1``: from the first key of the earliest document any of its queries
    is in (0 without documents) to its last query, or further to the last key of a
    bidirectional block (id > 0) one of its queries is in. The keys from that start up
    to the block's first query need no mask when, in every row, each query's document
    runs unbroken from there to the query (``unmasked``). O(T) work and memory, one host
    sync (the ranges are Python ints). The queries must be a subset of the key positions
    (self-attention; CP's local queries among the gathered keys). ``block_q``: default
    :data:`BLOCK_Q`."""
    block_q = block_q or BLOCK_Q
    tq = q_idx.shape[0]
    lo_q = torch.zeros_like(q_idx)
    run_q = torch.zeros_like(q_idx)  # where each query's unbroken document run starts
    if q_doc is not None:
        lo_q = _first_last(q_doc, k_doc, last=False).amin(0)  # [Tq], over the batch
        pos = torch.arange(num_keys, device=k_doc.device).expand_as(k_doc)
        new_run = torch.ones_like(k_doc, dtype=torch.bool)
        new_run[:, 1:] = k_doc[:, 1:] != k_doc[:, :-1]
        run_start = torch.where(new_run, pos, 0).cummax(1).values  # [B, Tk]
        run_q = run_start.index_select(1, q_idx).amax(0)
    hi_q = q_idx.clone()
    if q_blk is not None:
        blk_end = _first_last(q_blk, k_blk, last=True).masked_fill(q_blk <= 0, -1)
        hi_q = torch.maximum(hi_q, blk_end.amax(0))
    # block starts: every block_q rows, and wherever the positions stop being consecutive
    # (CP: the head and the tail chunk)
    step = torch.ones(tq, dtype=torch.bool, device=q_idx.device)
    step[1:] = q_idx[1:] != q_idx[:-1] + 1
    starts = torch.nonzero(step).flatten().tolist() + [tq]
    cuts = []
    for a, b in zip(starts[:-1], starts[1:]):
        cuts += [(lo, min(lo + block_q, b)) for lo in range(a, b, block_q)]
    ranges = torch.stack([
        torch.stack([lo_q[lo:hi].min(), hi_q[lo:hi].max() + 1, run_q[lo:hi].max(), q_idx[lo]])
        for lo, hi in cuts
    ]).clamp(0, num_keys).tolist()
    blocks, unmasked = [], []
    for (lo, hi), (kl, kh, run, first) in zip(cuts, ranges):
        blocks.append((lo, hi, int(kl), int(kh)))
        unmasked.append(int(first) if run <= kl else int(kl))
    return AttentionPlan(blocks, unmasked, q_idx, q_doc, k_doc, q_blk, k_blk)


def _block(plan: AttentionPlan, blk: tuple[int, int, int, int], scale: Optional[float],
           q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sdpa(q, k, v, attn_mask=plan.mask(*blk), scale=scale)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CpuFlashBlock(torch.autograd.Function):
    """One block on the fused CPU flash kernel: its keys ``[:split]`` with no mask, the
    rest with the block's mask, the two partial softmaxes merged by their logsumexps.
    Keeps the output and logsumexp (O(block)) for the backward, which runs the kernel's
    backward on each part with the merged output and logsumexp (exact: each part's
    probabilities are its scores minus the global logsumexp) and rebuilds the mask: no
    forward recomputation, no saved mask. Inputs already padded to equal head dims and
    cast to the compute dtype."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttentionPlan, blk, split: int, scale: float):
        q_lo, q_hi, k_lo, k_hi = blk
        bias = _additive(plan.mask(q_lo, q_hi, k_lo + split, k_hi), q.dtype)
        out, lse = _flash_cpu(q, k[:, :, split:], v[:, :, split:], 0.0, False,
                              attn_mask=bias, scale=scale)
        if split:
            out0, lse0 = _flash_cpu(q, k[:, :, :split], v[:, :, :split], 0.0, False,
                                    scale=scale)
            total = torch.logaddexp(lse0, lse)
            out = (out0.float() * (lse0 - total).exp()[..., None]
                   + out.float() * (lse - total).exp()[..., None]).to(q.dtype)
            lse = total
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.blk, ctx.split, ctx.scale = plan, blk, split, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        q_lo, q_hi, k_lo, k_hi = ctx.blk
        split, dout = ctx.split, dout.contiguous()
        bias = _additive(ctx.plan.mask(q_lo, q_hi, k_lo + split, k_hi), q.dtype)
        dq, dk, dv = _flash_cpu_bwd(dout, q, k[:, :, split:], v[:, :, split:], out, lse,
                                    0.0, False, attn_mask=bias, scale=ctx.scale)
        if split:
            dq0, dk0, dv0 = _flash_cpu_bwd(dout, q, k[:, :, :split], v[:, :, :split], out,
                                           lse, 0.0, False, scale=ctx.scale)
            dq, dk, dv = dq + dq0, torch.cat([dk0, dk], 2), torch.cat([dv0, dv], 2)
        return dq, dk, dv, None, None, None, None


def _cpu_flash_block(plan, blk, split, scale, q, k, v) -> torch.Tensor:
    q, k, v, scale, dv = _pad_dims(q, k, v, scale)
    if torch.is_autocast_enabled("cpu"):  # SDPA's autocast rule: run in the autocast dtype
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention inputs must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    with torch.autocast("cpu", enabled=False):
        out = _CpuFlashBlock.apply(q, k, v, plan, blk, split, scale)
    return out[..., :dv]


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Masked attention of q [B, H, Tq, Dqk] against k [B, Hkv, Tk, Dqk], v [B, Hkv, Tk,
    Dv] in the blocks of ``plan`` (module docstring) -> [B, H, Tq, Dv]. With autograd: on
    CPU (fp32/bf16) each block is a :class:`_CpuFlashBlock` (mask rebuilt in the
    backward); elsewhere each block runs under non-reentrant checkpointing (the mask and
    the block's forward are recomputed in the backward)."""
    outs = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    cpu_flash = grad and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
    for blk, unmasked in zip(plan.blocks, plan.unmasked):
        q_lo, q_hi, k_lo, k_hi = blk
        args = (q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi])
        if cpu_flash:
            outs.append(_cpu_flash_block(plan, blk, unmasked - k_lo, scale, *args))
        elif grad:
            outs.append(checkpoint(_block, plan, blk, scale, *args, use_reentrant=False))
        else:
            outs.append(_block(plan, blk, scale, *args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


_plan_cache: list = []  # [(key, doc ids, block ids, plan)]: the last micro-batch's plan


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids_BT: Optional[torch.Tensor] = None,
    block_ids_BT: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Default attention core. q [B, H, T, Dqk]; k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]
    (GQA: H % Hkv == 0) -> [B, H, T, Dv]. Causal; with ``doc_ids_BT`` also within
    documents, with ``block_ids_BT`` bidirectional inside each block (:func:`mask_from_ids`).
    ``scale``: softmax scale, default ``Dqk ** -0.5``. No ids: fused causal SDPA; ids:
    blocked attention (module docstring), its plan built once per micro-batch (every layer
    is handed the same id tensors, so the last plan is reused while they are)."""
    if doc_ids_BT is None and block_ids_BT is None:
        return sdpa(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    key = (T, str(q.device))
    if _plan_cache and _plan_cache[0][0] == key and _plan_cache[0][1] is doc_ids_BT \
            and _plan_cache[0][2] is block_ids_BT:
        plan = _plan_cache[0][3]
    else:
        idx = torch.arange(T, device=q.device)
        plan = plan_attention(idx, T, doc_ids_BT, doc_ids_BT, block_ids_BT, block_ids_BT)
        _plan_cache[:] = [(key, doc_ids_BT, block_ids_BT, plan)]
    return blocked_attention(q, k, v, plan, scale)
