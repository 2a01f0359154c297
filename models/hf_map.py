"""Hugging Face <-> moefold: which HF family expresses a ``ModelConfig`` exactly, its
``config.json``, and the weight-name map (docs/interop.md has the tables).

Pure functions (no I/O, no torch.distributed): ``scripts/convert_hf.py`` exports with
them, ``parallel/hf_load.py`` imports with them.

Weights are named by *init names*, the names ``Initializer`` fills (models/layers.py):
a parameter's FQN, except routed experts, one name per expert and tensor,
``layers.{i}.ffn.experts.w1[{e}]`` ([D, F]; ``w2[e]`` is [F, D]). Each maps to one HF
tensor and whether it is stored transposed (HF ``nn.Linear.weight`` is [out, in]).

Refused (``HFRefused``, one line naming what differs): anything the HF class would
compute differently from our forward — no family is ever approximated.

DeepSeek-V3 (``model.attention: mla``): multi-head latent attention plus DeepSeek's MoE
(sigmoid scores, group-limited top-k, the selection bias ``e_score_correction_bias``,
one ungated shared-expert MLP, the first layers dense). Its checkpoints pair the RoPE
channels interleaved (``rope_interleave``, the default); our RoPE rotates halves, the same
rotation after permuting those channels: an ``Entry`` with ``rope`` names the rows of
``q_b_proj`` / ``q_proj`` / ``kv_a_proj_with_mqa`` to permute (:func:`rope_rows`). The
multi-token-prediction module (``num_nextn_predict_layers``) is not built: its tensors
are ignored on import and not written on export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from models.config import (
    ModelConfig,
    experts_per_layer,
    has_experts,
    max_experts,
    moe_layer_pattern,
)

__all__ = ["HFRefused", "Entry", "hf_family", "hf_config", "hf_entries", "check_hf_config",
           "rope_rows"]


class HFRefused(ValueError):
    """This model has no exact Hugging Face equivalent (the message says why)."""


@dataclass(frozen=True)
class Entry:
    name: str  # our init name
    hf: str  # the HF tensor name
    transpose: bool = False  # ours = hf.T
    # (period, offset, width): in every ``period`` rows, rows offset..offset+width are
    # RoPE channels stored interleaved by HF (ours = hf[rope_rows(...)]); None: as stored
    rope: Optional[tuple[int, int, int]] = None
    buffer: bool = False  # a buffer of ours (the expert selection bias), not a parameter


def rope_rows(rows: int, rope: tuple[int, int, int], to_hf: bool = False) -> list[int]:
    """Row order taking HF's interleaved RoPE pairs (x0, x1), (x2, x3), ... to our halves
    (x0, x2, ... | x1, x3, ...): ``ours = hf[order]``; ``to_hf``: the inverse order."""
    period, offset, width = rope
    within = [*range(0, width, 2), *range(1, width, 2)]
    order = list(range(rows))
    for base in range(0, rows, period):
        for j, src in enumerate(within):
            order[base + offset + j] = base + offset + src
    if to_hf:
        inverse = [0] * rows
        for i, src in enumerate(order):
            inverse[src] = i
        return inverse
    return order


def _cfg_dict(cfg: Any) -> dict:
    return cfg if isinstance(cfg, dict) else asdict(cfg)


def _refuse(what: str) -> None:
    raise HFRefused(f"no exact Hugging Face equivalent: {what}")


def hf_family(cfg: ModelConfig) -> str:
    """``llama`` | ``mixtral`` | ``qwen2_moe``, or ``HFRefused``."""
    if cfg.arch != "llm":
        _refuse(f"model.arch={cfg.arch} (MoT/MoM have no HF class; export writes the "
                "moefold safetensors layout instead)")
    if cfg.attention == "mla":
        return _deepseek_v3_family(cfg)
    m = cfg.moe
    if not has_experts(cfg):
        return "llama"
    if len({E for E in experts_per_layer(cfg) if E}) > 1:
        _refuse(f"model.moe.num_experts={list(m.num_experts)} (pyramid MoE: Mixtral / "
                "Qwen2-MoE have one expert count for every layer)")
    if m.residual:
        _refuse("model.moe.residual=true (residual MoE has no HF class)")
    pattern = moe_layer_pattern(cfg)
    if m.score_func != "softmax":
        _refuse(f"model.moe.score_func={m.score_func} (Mixtral / Qwen2-MoE route with "
                "softmax; sigmoid scoring is DeepSeek-V3, whose HF class needs MLA)")
    if m.expert_bias:
        _refuse("model.moe.expert_bias=true (selection bias exists only in DeepSeek-V3's HF "
                "class, which needs MLA attention)")
    if m.num_groups:
        _refuse("model.moe.num_groups>0 (group-limited routing is DeepSeek-V3 only, whose HF "
                "class needs MLA attention)")
    if m.topk_scaling_factor != 1.0:
        _refuse(f"model.moe.topk_scaling_factor={m.topk_scaling_factor} (no scaling in "
                "Mixtral / Qwen2-MoE)")
    if m.capacity_factor is not None:
        _refuse("model.moe.capacity_factor set (HF MoE blocks are dropless)")
    if m.num_null_experts:
        _refuse(f"model.moe.num_null_experts={m.num_null_experts} (AdaMoE null experts)")
    if m.num_shared_experts == 0:
        if not m.norm_topk_prob:
            _refuse("model.moe.norm_topk_prob=false without shared experts (Mixtral "
                    "renormalises; Qwen3-MoE and OLMoE need QK-norm; Qwen2-MoE needs a gated "
                    "shared expert)")
        if not all(pattern):
            _refuse("dense layers (model.moe.layer_freq / first_k_dense) in a model without "
                    "shared experts (Mixtral has MoE in every layer)")
        return "mixtral"
    if not m.shared_expert_gate:
        _refuse("shared experts without model.moe.shared_expert_gate (Qwen2-MoE gates its "
                "shared expert with a sigmoid; DeepSeek-MoE's ungated one has no HF class)")
    return "qwen2_moe"


def _deepseek_v3_family(cfg: ModelConfig) -> str:
    """MLA models: DeepseekV3ForCausalLM when its MoE computes exactly like ours."""
    m = cfg.moe
    if m.num_experts == 0:
        _refuse("model.attention=mla without MoE (DeepseekV3 has routed experts after its "
                "first_k_dense_replace dense layers)")
    pattern = moe_layer_pattern(cfg)
    if pattern != [i >= m.first_k_dense for i in range(cfg.num_layers)]:
        _refuse("model.moe.layer_freq other than 1 (DeepseekV3: every layer after the first "
                "first_k_dense is MoE)")
    if m.score_func != "sigmoid":
        _refuse(f"model.moe.score_func={m.score_func} with MLA (DeepseekV3 scores with sigmoid)")
    if m.num_groups and m.top_k // m.group_topk != 2:
        _refuse(f"model.moe.top_k={m.top_k} // group_topk={m.group_topk} != 2 (DeepseekV3 "
                "scores a group by its best 2 experts)")
    if m.num_shared_experts == 0 or m.shared_expert_gate:
        _refuse("DeepseekV3 has ungated shared experts (model.moe.num_shared_experts >= 1, "
                "shared_expert_gate=false)")
    if (m.shared_expert_ffn_hidden_size or m.expert_ffn_hidden_size) != m.expert_ffn_hidden_size:
        _refuse("model.moe.shared_expert_ffn_hidden_size != expert_ffn_hidden_size "
                "(DeepseekV3's shared MLP is n_shared_experts * moe_intermediate_size wide)")
    if m.capacity_factor is not None:
        _refuse("model.moe.capacity_factor set (HF MoE blocks are dropless)")
    return "deepseek_v3"


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` (as a dict) of the family expressing ``cfg`` exactly."""
    family = hf_family(cfg)
    arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[family]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": _head_dim(cfg),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "intermediate_size": cfg.ffn_hidden_size,
    }
    m = cfg.moe
    if family == "deepseek_v3":
        a = cfg.mla
        out.update(num_key_value_heads=cfg.num_heads, head_dim=a.qk_rope_head_dim,
                   q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
                   qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                   v_head_dim=a.v_head_dim, rope_interleave=True, attention_bias=False,
                   moe_intermediate_size=m.expert_ffn_hidden_size,
                   n_routed_experts=m.num_experts, n_shared_experts=m.num_shared_experts,
                   num_experts_per_tok=m.top_k, n_group=m.num_groups or 1,
                   topk_group=m.group_topk if m.num_groups else 1,
                   routed_scaling_factor=m.topk_scaling_factor,
                   norm_topk_prob=m.norm_topk_prob, first_k_dense_replace=m.first_k_dense,
                   scoring_func="sigmoid", topk_method="noaux_tc",
                   num_nextn_predict_layers=0)
    elif family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif family == "mixtral":
        out.update(intermediate_size=m.expert_ffn_hidden_size, num_local_experts=max_experts(cfg),
                   num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coeff,
                   sliding_window=None)
    else:
        pattern = moe_layer_pattern(cfg)
        width = m.shared_expert_ffn_hidden_size or m.expert_ffn_hidden_size
        out.update(moe_intermediate_size=m.expert_ffn_hidden_size, num_experts=max_experts(cfg),
                   num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob,
                   shared_expert_intermediate_size=m.num_shared_experts * width,
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i, p in enumerate(pattern) if not p],
                   router_aux_loss_coef=m.aux_loss_coeff, qkv_bias=False,
                   use_sliding_window=False, sliding_window=None)
    return out


# keys whose values must agree between our config and a config.json (import check)
_CHECKED = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "tie_word_embeddings", "intermediate_size", "num_local_experts",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "shared_expert_intermediate_size", "mlp_only_layers", "qkv_bias",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
            "routed_scaling_factor", "first_k_dense_replace", "scoring_func")


def _rope_theta(hf: dict) -> Any:
    rp = hf.get("rope_parameters") or {}
    return rp.get("rope_theta", hf.get("rope_theta"))


def check_hf_config(cfg: ModelConfig, hf: dict[str, Any]) -> str:
    """The family of ``cfg`` if the HF ``config.json`` dict describes the same model;
    ``HFRefused`` (one line: the first differing keys) otherwise."""
    ours = hf_config(cfg)
    family = ours["model_type"]
    hf = dict(hf)
    if family == "deepseek_v3" and hf.get("q_lora_rank") is None:
        hf["q_lora_rank"] = None  # DeepSeek-V2-Lite style: one q_proj
    if hf.get("model_type") != family:
        raise HFRefused(f"config.json model_type={hf.get('model_type')!r} but model.* "
                        f"describes a {family} model")
    hf["rope_theta"] = _rope_theta(hf)
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    if family == "qwen2_moe":
        hf.setdefault("qkv_bias", True)  # transformers < 5 and the published checkpoints
        hf.setdefault("mlp_only_layers", [])
        step = hf.get("decoder_sparse_step", 1)
        dense = set(hf["mlp_only_layers"]) | {i for i in range(hf["num_hidden_layers"])
                                               if (i + 1) % step}
        hf["mlp_only_layers"] = sorted(dense)
        hf.setdefault("norm_topk_prob", False)
    if family == "deepseek_v3":
        hf.setdefault("head_dim", hf.get("qk_rope_head_dim"))
        hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
        for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                           ("moe_layer_freq", 1)):
            if hf.setdefault(key, value) != value:
                raise HFRefused(f"config.json {key}={hf[key]!r} is not expressible "
                                f"(only {value!r})")
        if hf.get("quantization_config"):
            raise HFRefused("config.json quantization_config: quantized (e.g. FP8 block-"
                            "scaled) checkpoints are not read; dequantize to bf16 first")
    for key in ("rope_scaling",):
        if hf.get(key):
            raise HFRefused(f"config.json {key}={hf[key]} is not expressible (plain RoPE only)")
    rp = hf.get("rope_parameters") or {}
    if rp.get("rope_type", "default") != "default":
        raise HFRefused(f"config.json rope_type={rp['rope_type']} is not expressible")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFRefused(f"config.json {key}=true: our layers have no biases")
    diffs = []
    for key in _CHECKED:
        if key in ours and key in hf and _differs(ours[key], hf[key]):
            diffs.append(f"{key}: config.json {hf[key]!r} vs model {ours[key]!r}")
        elif key in ours and key not in hf and key not in ("head_dim",):
            diffs.append(f"{key}: missing from config.json")
    if diffs:
        raise HFRefused("model config does not match the Hugging Face config.json: "
                        + "; ".join(diffs[:4]))
    return family


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(a)))
    return a != b


def hf_entries(cfg: ModelConfig, rope_interleave: bool = True) -> list[Entry]:
    """Every weight of the model: our init name -> HF tensor name (+ transpose).
    ``rope_interleave``: the DeepseekV3 config.json's (how its RoPE rows are stored)."""
    family = hf_family(cfg)
    out = [Entry("tok_embeddings.weight", "model.embed_tokens.weight"),
           Entry("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Entry("output.weight", "lm_head.weight"))
    if family == "deepseek_v3":
        return out + _deepseek_v3_entries(cfg, rope_interleave)
    for i, is_moe in enumerate(moe_layer_pattern(cfg)):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out += [Entry(f"{ours}.attention_norm.weight", f"{hf}.input_layernorm.weight"),
                Entry(f"{ours}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")]
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out.append(Entry(f"{ours}.attention.{a}.weight", f"{hf}.self_attn.{b}.weight"))
        if not is_moe:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out.append(Entry(f"{ours}.ffn.{a}.weight", f"{hf}.mlp.{b}.weight"))
            continue
        if family == "mixtral":
            block, names = f"{hf}.block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}
            out.append(Entry(f"{ours}.ffn.router.weight", f"{block}.gate.weight"))
        else:
            block = f"{hf}.mlp"
            names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
            out.append(Entry(f"{ours}.ffn.router.weight", f"{block}.gate.weight"))
            for a, b in names.items():
                out.append(Entry(f"{ours}.ffn.shared_experts.{a}.weight",
                                 f"{block}.shared_expert.{b}.weight"))
            out.append(Entry(f"{ours}.ffn.shared_gate.weight", f"{block}.shared_expert_gate.weight"))
        for e in range(max_experts(cfg)):
            for a, b in names.items():
                out.append(Entry(f"{ours}.ffn.experts.{a}[{e}]",
                                 f"{block}.experts.{e}.{b}.weight", transpose=True))
    return out


def _deepseek_v3_entries(cfg: ModelConfig, rope_interleave: bool) -> list[Entry]:
    a, m = cfg.mla, cfg.moe
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q_rope = (qk, a.qk_nope_head_dim, a.qk_rope_head_dim) if rope_interleave else None
    kv_rope = ((a.kv_lora_rank + a.qk_rope_head_dim, a.kv_lora_rank, a.qk_rope_head_dim)
               if rope_interleave else None)
    q = (("q_a_proj", None), ("q_a_layernorm", None), ("q_b_proj", q_rope)) if a.q_lora_rank \
        else (("q_proj", q_rope),)
    out = []
    for i, is_moe in enumerate(moe_layer_pattern(cfg)):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out += [Entry(f"{ours}.attention_norm.weight", f"{hf}.input_layernorm.weight"),
                Entry(f"{ours}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")]
        for name, rope in (*q, ("kv_a_proj_with_mqa", kv_rope), ("kv_a_layernorm", None),
                           ("kv_b_proj", None), ("o_proj", None)):
            out.append(Entry(f"{ours}.attention.{name}.weight", f"{hf}.self_attn.{name}.weight",
                             rope=rope))
        names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        if not is_moe:
            out += [Entry(f"{ours}.ffn.{a_}.weight", f"{hf}.mlp.{b}.weight")
                    for a_, b in names.items()]
            continue
        out.append(Entry(f"{ours}.ffn.router.weight", f"{hf}.mlp.gate.weight"))
        out.append(Entry(f"{ours}.ffn.router.expert_bias",
                         f"{hf}.mlp.gate.e_score_correction_bias", buffer=True))
        out += [Entry(f"{ours}.ffn.shared_experts.{a_}.weight",
                      f"{hf}.mlp.shared_experts.{b}.weight") for a_, b in names.items()]
        for e in range(m.num_experts):
            out += [Entry(f"{ours}.ffn.experts.{a_}[{e}]", f"{hf}.mlp.experts.{e}.{b}.weight",
                          transpose=True) for a_, b in names.items()]
    return out


def split_expert(name: str) -> tuple[str, int] | None:
    """``layers.1.ffn.experts.w1[3]`` -> (``layers.1.ffn.experts.w1``, 3); else None."""
    if not name.endswith("]"):
        return None
    key, e = name[:-1].split("[")
    return key, int(e)
