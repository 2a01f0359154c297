"""Multi-head latent attention (models/mla.py): forward and backward against a naive
reference written from the DeepSeek-V2/V3 equations (explicit softmax(QK^T/sqrt(d))V with a
causal mask, RoPE from its angles, no SDPA), the config keys' validation, and the model
built with it."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model
from models.config import ModelConfig
from models.flops import param_counts
from models.mla import MultiHeadLatentAttention
from tests.helpers import compose_config
from trainer.config import ConfigError, validate


def tiny_cfg(q_lora_rank: int = 12, **mla) -> ModelConfig:
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=4, max_seq_len=64,
                      attention="mla", norm_eps=1e-6)
    cfg.mla.q_lora_rank = q_lora_rank
    cfg.mla.kv_lora_rank, cfg.mla.qk_nope_head_dim = 10, 6
    cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim = 4, 5  # Dv != Dqk
    for k, v in mla.items():
        setattr(cfg.mla, k, v)
    return cfg


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    """Rotate channel pairs (i, i + n/2) by pos * theta^(-2i/n); x [B, T, H, n], pos [B, T]."""
    n = x.shape[-1]
    half = n // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / n)
    ang = (pos.to(torch.float64)[..., None] * freq)[:, :, None, :]  # [B, T, 1, n/2]
    c, s = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def naive_mla(m: MultiHeadLatentAttention, cfg: ModelConfig, x, pos, doc=None):
    a, H = cfg.mla, cfg.num_heads
    B, T, _ = x.shape
    nope, rope, dv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    if a.q_lora_rank:
        cq = _rms(x @ m.q_a_proj.weight.T, m.q_a_layernorm.weight, cfg.norm_eps)
        q = cq @ m.q_b_proj.weight.T
    else:
        q = x @ m.q_proj.weight.T
    q = q.reshape(B, T, H, nope + rope)
    kva = x @ m.kv_a_proj_with_mqa.weight.T
    ckv = _rms(kva[..., :a.kv_lora_rank], m.kv_a_layernorm.weight, cfg.norm_eps)
    kr = _rope(kva[..., a.kv_lora_rank:].reshape(B, T, 1, rope), pos, cfg.rope_theta)
    kv = (ckv @ m.kv_b_proj.weight.T).reshape(B, T, H, nope + dv)
    qn, qr = q[..., :nope], _rope(q[..., nope:], pos, cfg.rope_theta)
    out = torch.zeros(B, T, H, dv, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            # scores = q_nope . k_nope + q_rope . k_rope (the decoupled RoPE key)
            s = (qn[b, :, h] @ kv[b, :, h, :nope].T + qr[b, :, h] @ kr[b, :, 0].T)
            s = s / math.sqrt(nope + rope)
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
            if doc is not None:
                allowed &= doc[b][:, None] == doc[b][None, :]
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.exp(s - s.max(-1, keepdim=True).values)
            out[b, :, h] = (p / p.sum(-1, keepdim=True)) @ kv[b, :, h, nope:]
    return out.reshape(B, T, H * dv) @ m.o_proj.weight.T


def _module(cfg: ModelConfig, seed: int = 0) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("q_lora_rank, pad_v", [(12, False), (0, False), (12, True)],
                         ids=["q_lora", "q_proj", "q_lora_pad_v"])
def test_forward_backward_match_naive_reference(q_lora_rank, pad_v):
    cfg = tiny_cfg(q_lora_rank, pad_v=pad_v)
    m = _module(cfg)
    B, T = 2, 7
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    pos = torch.stack([torch.arange(T), torch.arange(T) + 3])  # per-sequence offsets
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    for docs in (None, doc):
        out = m(x, pos, docs)
        ref = naive_mla(m, cfg, x, pos, docs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *m.parameters()], g)
        want = torch.autograd.grad(ref, [x, *m.parameters()], g)
        for name, a, b in zip(["x", *(n for n, _ in m.named_parameters())], got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_absorbed_form_equals_module():
    """DeepSeek-V2's inference form: W_uk absorbed into the query and W_uv applied after
    attending over the compressed latent c_kv (one [T, kv_lora_rank] "head" instead of H
    up-projected keys and values) gives the module's output."""
    cfg = tiny_cfg()
    m = _module(cfg)
    a, H = cfg.mla, cfg.num_heads
    nope, rope, dv, r = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    x = torch.randn(2, 6, cfg.hidden_size)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        q = m.query(x).view(2, 6, H, nope + rope)
        kva = m.kv_a_proj_with_mqa(x)
        c = m.kv_a_layernorm(kva[..., :r])  # [B, T, r]
        k_rope = _rope(kva[..., r:].unsqueeze(2), pos, cfg.rope_theta)[:, :, 0]
        w = m.kv_b_proj.weight.view(H, nope + dv, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, r], [H, dv, r]
        q_lat = torch.einsum("bthn,hnr->bthr", q[..., :nope], w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_lat, c)
                  + torch.einsum("bthd,bsd->bhts", _rope(q[..., nope:], pos, cfg.rope_theta),
                                 k_rope)) / math.sqrt(nope + rope)
        scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
        o_lat = torch.einsum("bhts,bsr->bthr", scores.softmax(-1), c)
        out = m.o_proj(torch.einsum("bthr,hvr->bthv", o_lat, w_uv).flatten(2))
        torch.testing.assert_close(out, m(x, pos), rtol=1e-4, atol=1e-5)


def test_rope_is_shared_across_heads_and_values_have_their_own_width():
    """The key's RoPE channels are one head broadcast to all: the core sees equal k_rope
    slices in every head, and v of width v_head_dim != the q/k width."""
    cfg = tiny_cfg()
    m = _module(cfg)
    seen = {}

    def core(q, k, v, doc, blk):
        seen.update(q=q, k=k, v=v)
        return torch.zeros(*q.shape[:3], v.shape[-1])

    m.attn_fn = core
    m(torch.randn(1, 5, cfg.hidden_size))
    nope = cfg.mla.qk_nope_head_dim
    assert seen["q"].shape == seen["k"].shape == (1, 4, 5, 10)
    assert seen["v"].shape == (1, 4, 5, 5)
    k_rope = seen["k"][..., nope:]
    assert torch.equal(k_rope, k_rope[:, :1].expand_as(k_rope))
    assert not torch.equal(seen["k"][:, 0, :, :nope], seen["k"][:, 1, :, :nope])


def test_mla_tiny_model_builds_trains_and_counts():
    """The mla_tiny preset: the built model's parameters equal the analytic count, every
    layer uses MLA, and a few SGD steps on a fixed batch lower the loss."""
    cfg = OmegaConf.to_object(compose_config(["model=mla_tiny"]).model)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(isinstance(b.attention, MultiHeadLatentAttention) for b in model.layers.values())
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)[0]
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_init_is_seeded_by_name():
    """Same seed -> same MLA weights (layout independence keys on the names)."""
    cfg = OmegaConf.to_object(compose_config(["model=mla_tiny"]).model)
    a, b = (torch.manual_seed(3) and build_model(cfg) for _ in range(2))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert a.layers["0"].attention.kv_b_proj.weight.std() > 0


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_activation_estimate_matches_saved_tensors(q_lora_rank):
    """parallel/memory.py's MLA term against the bytes autograd saves (the harness and
    10% tolerance of tests/test_memory.py), with pad_v so the CPU runs a fused kernel."""
    from tests.test_memory import TOL, measure

    got, est = measure(0, 1, ["model=mla_tiny", "model.mla.pad_v=true",
                              f"model.mla.q_lora_rank={q_lora_rank}"])
    assert abs(est - got) <= TOL * got, (est, got)


@pytest.mark.parametrize("override, message", [
    ("model.attention=mha", "model.attention='mha' is not one of"),
    ("model.mla.kv_lora_rank=0", "model.mla.kv_lora_rank=0 must be > 0"),
    ("model.mla.qk_rope_head_dim=5", "model.mla.qk_rope_head_dim=5 must be even"),
    ("model.mla.q_lora_rank=-1", "model.mla.q_lora_rank=-1 must be >= 0"),
])
def test_bad_mla_config_is_a_one_line_error(override, message):
    cfg = compose_config(["model=mla_tiny", override])
    with pytest.raises(ConfigError, match=message) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_mla_tp_needs_heads_divisible_not_kv_heads():
    """Under MLA only the query heads are split (num_kv_heads is unused)."""
    validate(compose_config(["model=mla_tiny", "model.num_kv_heads=1", "parallel.tp=4"]),
             world_size=4)
    with pytest.raises(ConfigError, match="parallel.tp=8 does not divide model.num_heads=4"):
        validate(compose_config(["model=mla_tiny", "parallel.tp=8"]), world_size=8)


# -- Hugging Face DeepseekV3 interop (models/hf_map.py, parallel/hf_load.py) ----------
def _ds_cfg(q_lora_rank: int = 12) -> ModelConfig:
    from models.config import MoEConfig

    cfg = tiny_cfg(q_lora_rank)
    cfg.vocab_size, cfg.num_layers, cfg.ffn_hidden_size, cfg.rope_theta = 96, 3, 48, 5e5
    cfg.moe = MoEConfig(num_experts=8, top_k=4, expert_ffn_hidden_size=16, first_k_dense=1,
                        score_func="sigmoid", norm_topk_prob=True, topk_scaling_factor=2.5,
                        num_groups=4, group_topk=2, expert_bias=True, num_shared_experts=1,
                        shared_expert_ffn_hidden_size=16)
    return cfg


def _save(cfg: ModelConfig, root, bias: float):
    """A checkpoint of a seeded model with norms away from 1 and a nonzero expert bias."""
    from dataclasses import asdict

    from trainer import checkpoint as ckpt

    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(bias * torch.randn(cfg.moe.num_experts, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = {"model": asdict(cfg), "config": {"model": asdict(cfg)}, "world_size": 1}
    return model, ckpt.save(root, model=model, optimizer=opt, scheduler=sched,
                            train_state=ckpt.TrainState(step=1), meta=meta)


@pytest.mark.parametrize("q_lora_rank", [12, 0], ids=["q_lora", "q_proj"])
def test_hf_deepseek_v3_import_and_export_match_logits(q_lora_rank, tmp_path):
    """A random tiny transformers DeepseekV3ForCausalLM (interleaved RoPE, nonzero
    selection bias, norms away from 1) -> ``model.init_from=hf:`` -> our logits equal
    HF's; our model -> export -> HF loads it and its logits equal ours."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    from models.hf_map import hf_config
    from parallel.hf_load import fill_from, open_source
    from scripts.convert_hf import export

    cfg = _ds_cfg(q_lora_rank)
    hf_dict = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures",)}
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_dict)).eval()
    assert hf.config.rope_interleave
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():  # HF zero-inits the router; norms are ones
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in n else 0.2)
                    + (1.0 if "norm" in n else 0.0))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    hf.save_pretrained(tmp_path / "hf_in")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=g)
    ours = build_model(cfg, "cpu")
    src = open_source(f"hf:{tmp_path / 'hf_in'}", cfg)
    fill_from(ours, src)
    src.fill_buffers(ours)
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens)
    print(f"import q_lora_rank={q_lora_rank}: max |logits diff| = "
          f"{(got - want).abs().max().item():.2e}")
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
    # the RoPE row permutation matters: reading the rows as stored does not match
    from models.hf_map import hf_entries

    src.entries = {e.name: e for e in hf_entries(cfg, rope_interleave=False)}
    fill_from(ours, src)
    with torch.no_grad():
        assert (ours(tokens) - want).abs().max().item() > 1e-3

    model, path = _save(cfg, tmp_path / "ckpt", bias=0.1)
    assert export(path, tmp_path / "hf_out") == "deepseek_v3"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out", dtype=torch.float32).eval()
    with torch.no_grad():
        mine, theirs = model(tokens), back(tokens).logits
    print(f"export q_lora_rank={q_lora_rank}: max |logits diff| = "
          f"{(mine - theirs).abs().max().item():.2e}")
    assert (mine - theirs).abs().max().item() < 1e-4


def test_deepseek_v3_dry_run_rank_holds_its_mla_shards():
    """The real preset dry-runs at 512 ranks (pp4 with uneven stages, tp8+SP, ep64, FSDP
    over dp16 / edp2) and a middle-stage rank stores exactly: the TP-split MLA up/out
    projections and shared expert / (tp * dp), the replicated down projections, MLA and
    block norms and router / dp, its 4 routed experts / edp — 15 MoE layers."""
    from trainer.dry_run import dry_run_report

    cfg = compose_config([
        "trainer.dry_run=true", "model=deepseek_v3", "parallel.world_size=512",
        "parallel.pp=4", "parallel.pp_layers=[16,15,15,15]", "parallel.tp=8",
        "parallel.ep=64", "parallel.sequence_parallel=true", "trainer.seq_len=4096",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=64",
        "trainer.precision=bf16", "parallel.dry_run_rank=200"])
    report = dry_run_report(cfg)
    d, H, qr, kvr, nope, rope, v, E, F = 7168, 128, 1536, 512, 128, 64, 128, 256, 2048
    tp, dp, ep, edp = 8, 16, 64, 2
    split = (qr * H * (nope + rope) + kvr * H * (nope + v) + H * v * d + 3 * d * F) // (tp * dp)
    replicated = (d * qr + d * (kvr + rope) + qr + kvr + 2 * d + E * d) // dp
    layer = split + replicated + 3 * E * d * F // (ep * edp)
    assert report.params_numel == 15 * layer
