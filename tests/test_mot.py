"""Mixture-of-Transformers: the grouped-matmul model against a naive per-modality reference
written here (masks and scatter), and against the dense model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.config import DiffusionConfig, MoEConfig, MoTConfig
from models.modality import ModalityRoute


def _cfg(untie="all", modalities=("text", "image", "speech"), qk_norm=True, patch_dim=0,
         moe_modality=""):
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, layer_freq=[0, 1],
                    num_shared_experts=1, aux_loss_coeff=0.01) if moe_modality else MoEConfig()
    return ModelConfig(name="mot_test", arch="mot", vocab_size=96, hidden_size=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=64,
                       mot=MoTConfig(modalities=list(modalities), untie=untie, qk_norm=qk_norm,
                                     moe_modality=moe_modality),
                       diffusion=DiffusionConfig(patch_dim=patch_dim), moe=moe)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _per_modality(x, w, ids, fn):
    """sum_m [ids == m] * fn(x, w[m]) — every token through every modality's weight, then
    masked: the naive computation the grouped matmul must equal."""
    out = 0
    for m in range(w.shape[0]):
        sel = (ids == m) if w.shape[0] > 1 else torch.ones_like(ids, dtype=torch.bool)
        out = out + sel.unsqueeze(-1) * fn(x, w[m])
    return out


def _rope(x, pos, theta=10000.0):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(pos.double(), inv)
    ang = torch.cat([ang, ang], -1).float()
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_forward(model, tokens, ids):
    cfg = model.cfg
    B, T = tokens.shape
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
    x = model.tok_embeddings.weight[tokens]
    pos = torch.arange(T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in model.layers.values():
        a = blk.attention

        def proj(inp, lin):
            return _per_modality(inp, lin.weight, ids, lambda inp_, w: inp_ @ w)

        q = proj(x, a.wq).view(B, T, H, hd)
        k = proj(x, a.wk).view(B, T, Hkv, hd)
        v = proj(x, a.wv).view(B, T, Hkv, hd)
        if a.q_norm is not None:
            q = _per_modality(q, a.q_norm.weight, ids.unsqueeze(-1).expand(B, T, H), _rms)
            k = _per_modality(k, a.k_norm.weight, ids.unsqueeze(-1).expand(B, T, Hkv), _rms)
        q, k = _rope(q, pos), _rope(k, pos)
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, H * hd)
        h = x + _per_modality(proj(o, a.wo), blk.attention_norm.weight, ids, _rms)
        f = blk.ffn
        if f.moe is None:
            y = proj(F.silu(proj(h, f.w1)) * proj(h, f.w3), f.w2)
        else:  # MoT+MoE: dense weights index the other modalities; the MoE gets its tokens
            m = f.moe_modality
            dense_ids = torch.where(ids == m, -1, ids - (ids > m).long())

            def dproj(inp, lin, dense_ids=dense_ids):
                return _per_modality(inp, lin.weight, dense_ids, lambda inp_, w: inp_ @ w)

            y = dproj(F.silu(dproj(h, f.w1)) * dproj(h, f.w3), f.w2)
            sel = (ids == m).reshape(-1)
            y_moe = f.moe(h.reshape(-1, h.shape[-1])[sel].unsqueeze(0)).squeeze(0)
            y = y.reshape(-1, y.shape[-1]).index_put((sel.nonzero().squeeze(1),), y_moe)
            y = y.view(B, T, -1)
        x = h + _per_modality(y, blk.ffn_norm.weight, ids, _rms)
    return _rms(x, model.norm.weight) @ model.output.weight.T


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    # norms start at 1: perturb them so a wrong modality's norm is visible
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("untie, moe", [("none", ""), ("ffn", ""), ("ffn_qkv", ""), ("all", ""),
                                        ("all", "image"), ("ffn", "text")])
def test_mot_equals_naive_reference(untie, moe):
    """Outputs and every gradient; with ``moe``, MoT+MoE: that modality's FFN (layer 1)
    is a routed MoE layer fed with only its tokens."""
    model = _model(_cfg(untie, moe_modality=moe))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 24), generator=g)
    ids = torch.randint(0, 3, (2, 24), generator=g)
    ref_model = copy.deepcopy(model)
    out = model(tokens, modality_ids_BT=ids)
    ref = naive_forward(ref_model, tokens, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for (n, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_untie_options_set_which_weights_are_per_modality():
    def shapes(untie):
        m = build_model(_cfg(untie), device="meta")
        return {n: p.shape[0] for n, p in m.named_parameters() if n.startswith("layers.0.")}

    none, ffn, qkv, full = (shapes(u) for u in ("none", "ffn", "ffn_qkv", "all"))
    assert set(none.values()) == {1}
    assert {n for n, m in ffn.items() if m == 3} == {f"layers.0.ffn.w{i}.weight" for i in (1, 2, 3)}
    assert {n for n, m in qkv.items() if m == 3} == {
        n for n in qkv if ".ffn." in n or ".attention." in n}
    assert set(full.values()) == {3}


def test_single_modality_mot_equals_dense_model():
    """Every token of modality 0: the untied model's grouped path equals the dense
    baseline holding modality 0's weights; so does a MoT whose modalities all hold the
    same weights, on mixed ids."""
    mot = _model(_cfg("all", qk_norm=True))
    dense = build_model(_cfg("none", qk_norm=True))
    dense.load_state_dict({k: v[:1] if v.dim() and ".layers." in f".{k}" and
                           v.shape[0] == 3 else v for k, v in mot.state_dict().items()})
    tokens = torch.randint(0, 96, (2, 16))
    zeros = torch.zeros_like(tokens)
    torch.testing.assert_close(mot(tokens, modality_ids_BT=zeros), dense(tokens), rtol=1e-5,
                               atol=1e-6)
    tied = copy.deepcopy(mot)
    with torch.no_grad():
        for n, p in tied.named_parameters():
            if n.startswith("layers."):
                p.copy_(p[:1].expand_as(p))
    mixed = torch.randint(0, 3, tokens.shape)
    torch.testing.assert_close(tied(tokens, modality_ids_BT=mixed), dense(tokens), rtol=1e-5,
                               atol=1e-6)


def test_modality_route_is_a_stable_grouping():
    ids = torch.tensor([[2, 0, 1, 0], [1, 2, 0, 0]])
    r = ModalityRoute.build(ids, 3)
    assert r.counts_M.tolist() == [4, 2, 2]
    assert r.order_N.tolist() == [1, 3, 6, 7, 2, 4, 0, 5]
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(r.unsort(r.sort(x)), x)


def test_transfusion_inputs_replace_the_image_embeddings():
    model = _model(_cfg("all", modalities=("text", "image"), patch_dim=4))
    tokens = torch.randint(0, 96, (1, 12))
    ids = torch.zeros_like(tokens)
    ids[0, 4:8] = 1
    t = torch.full_like(tokens, -1)
    t[0, 4:8] = 500
    patches = torch.randn(1, 12, 4)
    logits, eps = model(tokens, modality_ids_BT=ids, patches_BTP=patches, timesteps_BT=t)
    assert eps.shape == (1, 12, 4)
    # the patch content reaches the outputs; tokens under the patches do not
    other = tokens.clone()
    other[0, 4:8] = (other[0, 4:8] + 1) % 96
    logits2, eps2 = model(other, modality_ids_BT=ids, patches_BTP=patches, timesteps_BT=t)
    torch.testing.assert_close(eps2, eps)
    patches2 = patches.clone()
    patches2[0, 5] += 1
    _, eps3 = model(tokens, modality_ids_BT=ids, patches_BTP=patches2, timesteps_BT=t)
    assert not torch.allclose(eps3[0, 5:], eps[0, 5:])
    torch.testing.assert_close(eps3[0, :4], eps[0, :4])  # causal: earlier tokens unchanged
