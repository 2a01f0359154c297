"""Analytic parameter counts and training FLOPs per token (for MFU).

Convention (Megatron / PaLM MFU): training FLOPs per token =
``6 * N_matmul + 12 * num_layers * num_heads * head_dim * seq_len``, where N_matmul is the
number of *active* matmul parameters per token — attention and MLP projections, the
top_k routed experts plus the shared experts and their gate, the router, and the output
head (the tied embedding matrix when embeddings are tied), but not the embedding lookup
nor the norm weights. The attention term counts QK^T and AV for every (query, key) pair,
without halving for the causal mask: ``6 * num_layers * num_heads * (d_qk + d_v) *
seq_len`` — ``12 * ... * head_dim`` for GQA; multi-head latent attention (MLA) has
``d_qk = qk_nope + qk_rope`` and ``d_v = v_head_dim``, and its matmuls are the
up-projected (non-absorbed) form the training forward runs.

Null experts (AdaMoE) cost nothing but their router rows; how many real experts a token
uses is decided by training, so the static count takes ``real_experts_per_token`` (default:
top_k, the upper bound) and the measured figure (the trainer's ``real_experts_per_token``
metric) gives the actual FLOPs (scripts/compare_moe_features.py does so).
"""

from __future__ import annotations

from models.config import MODALITY_ARCHS, ModelConfig, experts_per_layer, layer_kinds
from models.mamba import dt_rank
from models.modality import moe_modality, untied_parts


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul, norm) parameters of one llm block's attention (GQA or MLA)."""
    d, H = cfg.hidden_size, cfg.num_heads
    if cfg.attention != "mla":
        hd = _head_dim(cfg)
        return d * H * hd * 2 + d * cfg.num_kv_heads * hd * 2, 0
    a = cfg.mla
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = d * a.q_lora_rank + a.q_lora_rank * H * qk if a.q_lora_rank else d * H * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (
        a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + H * a.v_head_dim * d, a.q_lora_rank + a.kv_lora_rank


def _attention_flops(cfg: ModelConfig, n_layers: int, seq_len: int) -> int:
    """QK^T and AV of every (query, key) pair, forward + backward (module docstring)."""
    if cfg.attention == "mla":
        a = cfg.mla
        width = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
    else:
        width = 2 * _head_dim(cfg)
    return 6 * n_layers * cfg.num_heads * width * seq_len


def _layer_matmul_params(cfg: ModelConfig, num_experts: int,
                         real_experts_per_token: float | None = None) -> tuple[int, int]:
    """(total, active) matmul parameters of one block with ``num_experts`` routed experts
    (0: a dense block); ``real_experts_per_token``: routed experts a token really runs
    (null experts: fewer than top_k; default top_k)."""
    d = cfg.hidden_size
    attn = attention_params(cfg)[0]
    if not num_experts:
        mlp = 3 * d * cfg.ffn_hidden_size
        return attn + mlp, attn + mlp
    m = cfg.moe
    expert = 3 * d * m.expert_ffn_hidden_size
    shared = 0
    width = m.shared_expert_ffn_hidden_size or m.expert_ffn_hidden_size
    if m.residual:  # residual MoE: one dense FFN branch + the Linear(D, 2) mix
        shared = 3 * d * width + 2 * d
    elif m.num_shared_experts:
        shared = 3 * d * m.num_shared_experts * width + (d if m.shared_expert_gate else 0)
    router = d * (num_experts + m.num_null_experts)
    common = attn + shared + router
    k_real = m.top_k if real_experts_per_token is None else real_experts_per_token
    return common + num_experts * expert, common + round(k_real * expert)


def _mot_layer(cfg: ModelConfig, num_experts: int) -> tuple[int, list[int]]:
    """One MoT block: (total parameters, [active matmul+norm parameters per token of each
    modality]). Each modality-specific part has one copy per modality; a token uses its
    modality's copy; with MoT+MoE the MoE modality's FFN is the routed layer."""
    d, hd, M = cfg.hidden_size, _head_dim(cfg), len(cfg.mot.modalities)
    parts = untied_parts(cfg.mot.untie)
    attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
    attn += 2 * hd if cfg.mot.qk_norm else 0
    ffn, norms = 3 * d * cfg.ffn_hidden_size, 2 * d
    copies = {p: (M if p in parts else 1) for p in ("attn", "ffn", "norms")}
    total = attn * copies["attn"] + ffn * copies["ffn"] + norms * copies["norms"]
    active = [attn + ffn + norms] * M
    m = moe_modality(cfg)
    if num_experts and m >= 0:
        moe_total, moe_active = (x - attn + (2 * hd if cfg.mot.qk_norm else 0)
                                 for x in _layer_matmul_params(cfg, num_experts))
        total += moe_total - ffn
        active[m] += moe_active - ffn
    return total, active


def _mamba_layer(cfg: ModelConfig) -> tuple[int, list[int]]:
    """One (Mixture-of-)Mamba block: (total parameters, [active per token per modality]).
    Matmul parameters count as in the module docstring; the scan's own work (~9 FLOPs per
    channel and state per token) is not in N."""
    mc, d, M = cfg.mamba, cfg.hidden_size, len(cfg.mot.modalities)
    di, N, R = mc.expand * d, mc.d_state, dt_rank(cfg)
    proj = {"in_proj": d * 2 * di, "x_proj": di * (R + 2 * N), "dt_proj": R * di + di,
            "out_proj": di * d}
    shared = di * mc.d_conv + di + di * N + di + d  # conv w+b, A_log, D, norm
    total = shared + sum(n * (M if k in mc.untie else 1) for k, n in proj.items())
    return total, [shared + sum(proj.values())] * M


def _mot_counts(cfg: ModelConfig) -> tuple[int, list[int]]:
    total, active = 0, [0] * len(cfg.mot.modalities)
    for kind, E in zip(layer_kinds(cfg), experts_per_layer(cfg)):
        t, a = _mamba_layer(cfg) if kind == "M" else _mot_layer(cfg, E)
        total, active = total + t, [x + y for x, y in zip(active, a)]
    return total, active


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, embeddings and norms included; a tied
    output head is counted once."""
    d = cfg.hidden_size
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    if cfg.arch in MODALITY_ARCHS:  # active: averaged over the modalities
        total, active = _mot_counts(cfg)
        P = cfg.diffusion.patch_dim
        io = 2 * P * d + 2 * d * d + 2 * d if P else 0  # patch in/out, timestep MLP
        return embed + d + io + total, embed + d + io + round(sum(active) / len(active))
    norms = d * (2 * cfg.num_layers + 1) + cfg.num_layers * attention_params(cfg)[1]
    total = active = embed + norms
    for E in experts_per_layer(cfg):
        t, a = _layer_matmul_params(cfg, E)
        total, active = total + t, active + a
    return total, active


def flops_per_token_by_modality(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """MoT: training FLOPs per token of each modality (they differ with MoT+MoE)."""
    n_mamba = layer_kinds(cfg).count("M")
    n_attn = cfg.num_layers - n_mamba
    norms = 2 * cfg.hidden_size * n_attn  # not matmul parameters
    qk = 2 * _head_dim(cfg) * n_attn if cfg.mot.qk_norm else 0
    if n_mamba:
        mc, di = cfg.mamba, cfg.mamba.expand * cfg.hidden_size
        # conv, A_log, D, dt bias, norm: elementwise, not matmuls
        norms += n_mamba * (di * mc.d_conv + di + di * mc.d_state + 2 * di + cfg.hidden_size)
    attention = 12 * n_attn * cfg.num_heads * _head_dim(cfg) * seq_len
    head = cfg.vocab_size * cfg.hidden_size
    _, active = _mot_counts(cfg)
    return {name: float(6 * (a - norms - qk + head) + attention)
            for name, a in zip(cfg.mot.modalities, active)}


def training_flops_per_token(cfg: ModelConfig, seq_len: int,
                             real_experts_per_token: float | None = None) -> float:
    """Forward + backward FLOPs per token (see the module docstring for the convention);
    MoT: the mean over modalities (:func:`flops_per_token_by_modality`).
    ``real_experts_per_token``: the measured mean (null experts), default top_k."""
    if cfg.arch in MODALITY_ARCHS:
        per = flops_per_token_by_modality(cfg, seq_len)
        return sum(per.values()) / len(per)
    matmul = cfg.vocab_size * cfg.hidden_size  # output head (tied or not)
    for E in experts_per_layer(cfg):
        matmul += _layer_matmul_params(cfg, E, real_experts_per_token)[1]
    return float(6 * matmul + _attention_flops(cfg, cfg.num_layers, seq_len))
