"""Context-parallel attention equals full dense-mask attention (outputs and q/k/v
gradients) for causal, packed-document and block-bidirectional masks, on CP2 and CP4 gloo
ranks (blocked attention with small query blocks); and the
load-balanced sharding and mask construction, in one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models.attention
from models.attention import mask_from_ids
from parallel.context_parallel import ContextParallelAttention, IndexedSeqGroup, cp_index
from tests.distributed_utils import spawn

B, H, HKV, T, DH = 2, 4, 2, 32, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, DH, generator=g)
    k = torch.randn(B, HKV, T, DH, generator=g)
    v = torch.randn(B, HKV, T, DH, generator=g)
    dy = torch.randn(B, H, T, DH, generator=g)
    # two packed documents per row at different cut points; one 6-token block in each
    doc = torch.stack([(torch.arange(T) >= 11).long(), (torch.arange(T) >= 20).long()])
    blk = torch.zeros(B, T, dtype=torch.long)
    blk[0, 3:9] = 1
    blk[1, 22:28] = 2
    return q, k, v, dy, doc, blk


MASKS = {"causal": (False, False), "documents": (True, False), "bidirectional": (True, True)}


def _full(mask: str):
    q, k, v, dy, doc, blk = _inputs()
    use_doc, use_blk = MASKS[mask]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # the dense-mask reference (one SDPA over the whole [T, T] mask)
    idx = torch.arange(T)
    mask = mask_from_ids(idx, idx, doc if use_doc else None, doc if use_doc else None,
                         blk if use_blk else None, blk if use_blk else None)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.backward(dy)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank: int, world: int):
    models.attention.BLOCK_Q = 3  # several query blocks per chunk, one straddling a cut
    cp_group = dist.new_group(list(range(world)))
    attn = ContextParallelAttention(cp_group)
    idx = cp_index(T, world, rank)
    for mask, (use_doc, use_blk) in MASKS.items():
        q, k, v, dy, doc, blk = _inputs()
        ql, kl, vl = (t.index_select(2, idx).clone().requires_grad_() for t in (q, k, v))
        out = attn(ql, kl, vl, doc.index_select(1, idx) if use_doc else None,
                   blk.index_select(1, idx) if use_blk else None)
        out.backward(dy.index_select(2, idx))
        want_out, want_dq, want_dk, want_dv = _full(mask)
        for got, want, what in [(out, want_out, "out"), (ql.grad, want_dq, "dq"),
                                (kl.grad, want_dk, "dk"), (vl.grad, want_dv, "dv")]:
            torch.testing.assert_close(got, want.index_select(2, idx), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, w=what, n=mask: f"cp{world} {n} {w}: {m}")
    # the MoE token group puts gathered tokens back in sequence order
    index = [cp_index(T, world, r) for r in range(world)]
    group = IndexedSeqGroup(cp_group, index)
    x = torch.arange(B * T).view(B, T)
    torch.testing.assert_close(group.gather_seq(group.local_seq(x)), x)
    return rank


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_equals_full_attention(world):
    assert spawn(_worker, world) == list(range(world))


def test_cp_index_balances_causal_work():
    """Each rank holds a head and a tail chunk; together they tile the sequence, and the
    causal work (sum of key counts over its queries) is equal on every rank."""
    cp, seq = 4, 32
    parts = [cp_index(seq, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(seq))
    assert parts[1].tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1
    with pytest.raises(ValueError, match="multiple of 2\\*parallel.cp=8"):
        cp_index(36, 4, 0)


def test_mask_from_ids():
    idx = torch.arange(6)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    blk = torch.tensor([[0, 1, 1, 0, 2, 2]])
    m = mask_from_ids(idx, idx, doc, doc, blk, blk)[0, 0]
    causal = torch.ones(6, 6).tril().bool()
    assert m[1, 2] and m[4, 5]  # inside a block: both ways
    assert not m[3, 0] and not m[3, 2]  # no attention across documents
    assert torch.equal(m & ~causal, torch.zeros(6, 6, dtype=torch.bool).index_put_(
        (torch.tensor([1, 4]), torch.tensor([2, 5])), torch.tensor(True)))
    # plain causal equals SDPA's is_causal
    q = torch.randn(1, 2, 6, 4)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask_from_ids(idx, idx)),
        F.scaled_dot_product_attention(q, q, q, is_causal=True))
