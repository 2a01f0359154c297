"""The attention core (models/attention.py) equals one dense-mask SDPA (forward and
q/k/v gradients) for causal, packed-document and block-bidirectional masks, with GQA,
``Dv != Dqk`` and fp32 / bf16 autocast; and its masked path never materialises a
``T x T`` tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import causal_attention, mask_from_ids, plan_attention

B, H, HKV, T, DQK = 2, 4, 2, 40, 8


def _ids():
    # row 0: documents 0 | 1 | 0 again (an id reused later must not join the first
    # document's range); row 1: two documents. One bidirectional block per row, one of
    # them crossing nothing, the other starting a document.
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 13:25], doc[0, 25:] = 1, 7
    doc[1, 21:] = 1
    blk = torch.zeros(B, T, dtype=torch.long)
    blk[0, 3:10] = 1
    blk[1, 21:30] = 5
    return doc, blk


MASKS = {"causal": (False, False), "documents": (True, False), "doc_reused_id": (True, False),
         "bidirectional": (True, True), "blocks_only": (False, True)}


def _case(mask: str, dv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, DQK, generator=g)
    k = torch.randn(B, HKV, T, DQK, generator=g)
    v = torch.randn(B, HKV, T, dv, generator=g)
    dy = torch.randn(B, H, T, dv, generator=g)
    doc, blk = _ids()
    if mask == "doc_reused_id":
        doc[0, 25:] = 0  # document 0 again after document 1
    use_doc, use_blk = MASKS[mask]
    return q, k, v, dy, doc if use_doc else None, blk if use_blk else None


def _dense(q, k, v, doc, blk, scale):
    idx = torch.arange(q.shape[2])
    mask = mask_from_ids(idx, idx, doc, doc, blk, blk)
    rep = q.shape[1] // k.shape[1]  # the plain math reference: no GQA / head-dim tricks
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    return (s.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)) @ v


def _grads(fn, q, k, v, dy, dtype):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = fn(q, k, v)
    assert out.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else q.dtype)
    out.backward(dy.to(out.dtype))
    return out.float(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dv", [DQK, 4, 12])
@pytest.mark.parametrize("mask", list(MASKS))
def test_core_equals_dense_mask(monkeypatch, mask, dv, dtype):
    """fp32 / bf16 autocast take the CPU flash block; fp64 the checkpointed fallback (the
    path other devices take)."""
    monkeypatch.setattr("models.attention.BLOCK_Q", 7)  # several blocks, ragged last
    q, k, v, dy, doc, blk = _case(mask, dv)
    if dtype == torch.float64:
        q, k, v, dy = (t.double() for t in (q, k, v, dy))
    scale = 0.3 if dv == 12 else DQK ** -0.5  # an explicit scale (MLA) on one shape
    kw = {"scale": 0.3} if dv == 12 else {}
    got = _grads(lambda a, b, c: causal_attention(a, b, c, doc, blk, **kw), q, k, v, dy, dtype)
    want = _grads(lambda a, b, c: _dense(a, b, c, doc, blk, scale), q, k, v, dy,
                  torch.float32)
    tol = {"atol": 6e-2, "rtol": 6e-2} if dtype == torch.bfloat16 else \
        {"atol": 2e-5, "rtol": 2e-5}
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(g.to(w.dtype), w, **tol,
                                   msg=lambda m, n=what: f"{n}: {m}")


def test_plan_skips_masked_keys():
    """Key ranges: causal prefix, from the document start, ahead to a block's end."""
    doc, blk = _ids()
    idx = torch.arange(T)
    plan = plan_attention(idx, T, block_q=8)
    assert plan.blocks[:2] == [(0, 8, 0, 8), (8, 16, 0, 16)]
    assert plan.unmasked[:2] == [0, 8]  # keys before the block need no mask
    # document 0 again after document 1: its keys start at 0, but not unbroken
    reused = torch.tensor([[0] * 13 + [1] * 12 + [0] * 15])
    plan = plan_attention(idx[32:], T, reused[:, 32:], reused, block_q=8)
    assert plan.blocks == [(0, 8, 0, 40)] and plan.unmasked == [0]
    plan = plan_attention(idx[32:], T, doc[:1, 32:], doc[:1], block_q=8)
    assert plan.blocks == [(0, 8, 25, 40)] and plan.unmasked == [32]
    plan = plan_attention(idx[21:25], T, doc[1:, 21:25], doc[1:], blk[1:, 21:25], blk[1:],
                          block_q=8)
    assert plan.blocks == [(0, 4, 21, 30)]  # doc 1 starts at 21, block 5 ends at 29
    # non-consecutive positions (a CP rank's head and tail chunk) start a new block
    plan = plan_attention(torch.cat([idx[0:4], idx[36:40]]), T, block_q=8)
    assert plan.blocks == [(0, 4, 0, 4), (4, 8, 0, 40)]


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("case", ["documents", "bidirectional", "mla_dv", "fallback_fp64"])
def test_masked_path_has_no_t_by_t_tensor(case):
    """At T=4096 with document (and block) ids, fwd+bwd never creates a tensor of
    ``T*T/4`` elements or more (a dense mask or score matrix is ``T*T`` per head); the
    dense reference does, so the probe can see one. fp64 takes the checkpointed
    fallback (whose SDPA is the unfused math kernel: scores per block only)."""
    t, dv = 4096, 8 if case == "mla_dv" else 16
    dtype = torch.float64 if case == "fallback_fp64" else torch.float32
    q = torch.randn(1, 2, t, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 1, t, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 1, t, dv, dtype=dtype, requires_grad=True)
    doc = (torch.arange(t) >= 1000).long()[None] + (torch.arange(t) >= 3000).long()[None]
    blk = None
    if case == "bidirectional":
        blk = torch.zeros(1, t, dtype=torch.long)
        blk[0, 100:400] = 1
    with _LargestTensor() as probe:
        causal_attention(q, k, v, doc, blk).sum().backward()
    assert probe.largest < t * t // 4, (probe.largest, probe.op)
    if case != "documents":
        return
    with _LargestTensor() as dense:
        idx = torch.arange(t)
        F.scaled_dot_product_attention(q.detach(), k.detach(), k.detach(),
                                       attn_mask=mask_from_ids(idx, idx, doc, doc),
                                       enable_gqa=True)
    assert dense.largest >= t * t


def test_no_grad(monkeypatch):
    """Without autograd the blocks are plain SDPA calls (no Function, no checkpoint)."""
    monkeypatch.setattr("models.attention.BLOCK_Q", 5)
    q, k, v, _, doc, blk = _case("bidirectional", DQK)
    with torch.no_grad():
        got = causal_attention(q, k, v, doc, blk)
    torch.testing.assert_close(got, _dense(q, k, v, doc, blk, DQK ** -0.5),
                               atol=2e-5, rtol=2e-5)
