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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from models.config import (
    ModelConfig,
    experts_per_layer,
    has_experts,
    max_experts,
    moe_layer_pattern,
)

__all__ = ["HFRefused", "Entry", "hf_family", "hf_config", "hf_entries", "check_hf_config"]


class HFRefused(ValueError):
    """This model has no exact Hugging Face equivalent (the message says why)."""


@dataclass(frozen=True)
class Entry:
    name: str  # our init name
    hf: str  # the HF tensor name
    transpose: bool = False  # ours = hf.T


def _cfg_dict(cfg: Any) -> dict:
    return cfg if isinstance(cfg, dict) else asdict(cfg)


def _refuse(what: str) -> None:
    raise HFRefused(f"no exact Hugging Face equivalent: {what}")


def hf_family(cfg: ModelConfig) -> str:
    """``llama`` | ``mixtral`` | ``qwen2_moe``, or ``HFRefused``."""
    if cfg.arch != "llm":
        _refuse(f"model.arch={cfg.arch} (MoT/MoM have no HF class; export writes the "
                "moefold safetensors layout instead)")
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


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` (as a dict) of the family expressing ``cfg`` exactly."""
    family = hf_family(cfg)
    arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}[family]
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
    if family == "llama":
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
            "shared_expert_intermediate_size", "mlp_only_layers", "qkv_bias")


def _rope_theta(hf: dict) -> Any:
    rp = hf.get("rope_parameters") or {}
    return rp.get("rope_theta", hf.get("rope_theta"))


def check_hf_config(cfg: ModelConfig, hf: dict[str, Any]) -> str:
    """The family of ``cfg`` if the HF ``config.json`` dict describes the same model;
    ``HFRefused`` (one line: the first differing keys) otherwise."""
    ours = hf_config(cfg)
    family = ours["model_type"]
    hf = dict(hf)
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


def hf_entries(cfg: ModelConfig) -> list[Entry]:
    """Every weight of the model: our init name -> HF tensor name (+ transpose)."""
    family = hf_family(cfg)
    out = [Entry("tok_embeddings.weight", "model.embed_tokens.weight"),
           Entry("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Entry("output.weight", "lm_head.weight"))
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


def split_expert(name: str) -> tuple[str, int] | None:
    """``layers.1.ffn.experts.w1[3]`` -> (``layers.1.ffn.experts.w1``, 3); else None."""
    if not name.endswith("]"):
        return None
    key, e = name[:-1].split("[")
    return key, int(e)
