"""Transformer: shapes, causality, tying, deterministic (layout-independent) init, preset
sizes against published parameter counts, FLOPs convention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model, param_counts, training_flops_per_token
from models.config import ModelConfig, MoEConfig, moe_layer_pattern

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    path = next(p for p in PRESETS if p.stem == name)
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    )


def tiny(**kw) -> ModelConfig:
    moe = kw.pop(
        "moe",
        dict(
            num_experts=4,
            top_k=2,
            expert_ffn_hidden_size=16,
            layer_freq=[0, 1, 1],
            num_shared_experts=1,
            aux_loss_coeff=0.01,
        ),
    )
    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        max_seq_len=64,
    )
    base.update(kw)
    return ModelConfig(moe=MoEConfig(**moe), **base)


def seeded(cfg: ModelConfig, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    return build_model(cfg, device)


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_forward_shapes_layers_and_position_ids():
    cfg = tiny()
    model = seeded(cfg)
    assert list(model.layers.keys()) == ["0", "1", "2"]
    assert [type(m).__name__ for m in model.moe_layers()] == ["MoELayer", "MoELayer"]
    assert model.moe_layers()[0] is model.layers["1"].ffn
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == torch.float32
    pos = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(tokens, pos), logits)
    packed = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)  # two documents
    assert not torch.allclose(model(tokens, packed)[:, 5:], logits[:, 5:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens).dtype == torch.bfloat16


def test_causal():
    cfg = tiny()
    model = seeded(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % cfg.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_tied_embeddings():
    cfg = tiny(tie_embeddings=True)
    model = seeded(cfg)
    assert model.output is None
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    logits = model(tokens)
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h)
    torch.testing.assert_close(logits, model.norm(h) @ model.tok_embeddings.weight.t())
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)[0]


def test_seeded_builds_identical_and_meta_path_equal():
    cfg = tiny(
        moe=dict(
            num_experts=4,
            top_k=2,
            expert_ffn_hidden_size=16,
            expert_bias=True,
            score_func="sigmoid",
        )
    )
    a, b = seeded(cfg, 3), seeded(cfg, 3)
    assert same_params(a, b)
    assert not same_params(a, seeded(cfg, 4))
    meta = seeded(cfg, 3, "meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    assert same_params(a, meta)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    torch.testing.assert_close(a(tokens), meta(tokens), rtol=0, atol=0)  # rope buffers too


def test_init_is_layout_independent_and_scaled():
    cfg = tiny(num_layers=4, moe=dict(num_experts=4, top_k=2, expert_ffn_hidden_size=64))
    full = seeded(cfg, 7)
    # A pipeline stage: built on meta, keeps layers 2..3 and the head only.
    stage = seeded(cfg, 7, "meta")
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    stage.to_empty(device="cpu")
    torch.manual_seed(7)
    stage.init_weights()
    ref = full.state_dict()
    for name, t in stage.state_dict().items():
        assert torch.equal(t, ref[name]), name
    std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
    layer = full.layers["1"]
    assert abs(layer.attention.wq.weight.std() / std - 1) < 0.1
    assert abs(layer.attention.wo.weight.std() / out_std - 1) < 0.1
    assert abs(layer.ffn.experts.w2.std() / out_std - 1) < 0.1
    assert abs(layer.ffn.experts.w1.std() / std - 1) < 0.1
    assert torch.all(layer.attention_norm.weight == 1) and torch.all(full.norm.weight == 1)


def test_moe_layer_pattern():
    cfg = tiny(
        num_layers=6,
        moe=dict(num_experts=4, expert_ffn_hidden_size=8, layer_freq=2, first_k_dense=1),
    )
    assert moe_layer_pattern(cfg) == [False, False, True, False, True, False]
    cfg.moe.layer_freq = [1, 0]
    with pytest.raises(ValueError, match="layer_freq"):
        moe_layer_pattern(cfg)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_on_meta_and_matches_param_counts(path):
    cfg = load_preset(path.stem)
    model = build_model(cfg, "meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)[0]
    assert len(model.moe_layers()) == sum(moe_layer_pattern(cfg))


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("mixtral_8x7b", 46.7e9, 12.9e9),
        ("deepseek_moe_16b", 16.4e9, 2.8e9),
        ("qwen2_moe_a2_7b", 14.3e9, 2.7e9),
    ],
)
def test_preset_anchor_sizes(name, total, active):
    got_total, got_active = param_counts(load_preset(name))
    assert abs(got_total / total - 1) < 0.03, got_total
    assert abs(got_active / active - 1) < 0.03, got_active


def test_flops_dense_tiny():
    cfg = load_preset("dense_tiny")
    model = build_model(cfg, "meta")
    matmul = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "norm" not in n and not n.startswith("tok_embeddings")
    )
    hd = cfg.hidden_size // cfg.num_heads
    attention = 12 * cfg.num_layers * cfg.num_heads * hd * 256
    assert training_flops_per_token(cfg, 256) == 6 * matmul + attention


def test_flops_moe_counts_active_experts_only():
    cfg = load_preset("moe_tiny")
    dense_equiv = training_flops_per_token(cfg, 64)
    cfg.moe.top_k += 1  # one more active expert per MoE layer
    extra = 6 * 3 * cfg.hidden_size * cfg.moe.expert_ffn_hidden_size * cfg.num_layers
    assert training_flops_per_token(cfg, 64) - dense_equiv == extra
