"""Model configuration schema (plain dataclasses; Hydra validates YAML against them).

Kept in ``models/`` so a model can be built without the trainer; ``trainer/config.py``
nests these into the full run schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class MoEConfig:
    """Routed-expert layer. ``num_experts == 0`` means every layer is a dense MLP."""

    num_experts: int = 0
    top_k: int = 2
    # FFN width of one routed expert (fine-grained MoE uses a small value).
    expert_ffn_hidden_size: int = 0
    # Which layers are MoE, as in Megatron's moe_layer_freq: an int N means every N-th
    # layer (layer i is MoE when i % N == 0), a list gives 1/0 per layer.
    layer_freq: Any = 1
    # The first ``first_k_dense`` layers stay dense whatever layer_freq says (DeepSeek).
    first_k_dense: int = 0

    # Router: fp32 logits -> score -> (group-limited) top-k.
    score_func: str = "softmax"  # softmax | sigmoid
    # Renormalise the selected k probabilities to sum to 1 (Mixtral: true, DeepSeek-V2: false).
    norm_topk_prob: bool = True
    topk_scaling_factor: float = 1.0
    # Group-limited routing (DeepSeek-V3): experts in num_groups groups, tokens pick
    # experts only from the best group_topk groups. 0 disables.
    num_groups: int = 0
    group_topk: int = 0

    # Load balancing.
    aux_loss_coeff: float = 0.0  # switch-style, over the micro-batch
    seq_aux_loss_coeff: float = 0.0  # per-sequence (DeepSeek-V2/V3)
    z_loss_coeff: float = 0.0  # mean(logsumexp(logits)^2)
    # Aux-loss-free balancing: a per-expert bias added to scores for selection only,
    # updated after each optimizer step by ``rate * sign(mean_count - count)``.
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3

    # Capacity. None = dropless (default). Otherwise capacity per expert =
    # ceil(tokens * top_k / num_experts * capacity_factor), at least min_capacity.
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"  # probs | position
    pad_to_capacity: bool = False
    min_capacity: int = 0

    # Shared experts (always active, DeepSeek / Qwen-MoE).
    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: int = 0  # per shared expert; 0 -> expert_ffn_hidden_size
    shared_expert_gate: bool = False  # sigmoid gate on the shared output (Qwen2-MoE)

    # Sparse upcycling (docs/interop.md): a dense checkpoint dir or hf:<dir> whose FFNs
    # are copied into every expert; each copy times (1 + upcycle_noise * N(0, 1)).
    upcycle_from: str = ""
    upcycle_noise: float = 0.0  # relative noise on each expert copy (0 = identical experts)


@dataclass
class MoTConfig:
    """Mixture-of-Transformers (``arch: mot``, models/mot.py)."""

    # Modality names; a token's modality id is the index of its name here.
    modalities: list = field(default_factory=lambda: ["text", "image"])
    # What is modality-specific: none (the dense baseline) | ffn | ffn_qkv | all.
    untie: str = "all"
    qk_norm: bool = False  # per-head RMSNorm of q and k (per modality when attn is untied)
    # MoT+MoE: this modality's FFN is a routed MoE (``moe``, on the layers moe.layer_freq
    # picks); "" = none. Needs the FFN untied.
    moe_modality: str = ""


@dataclass
class MambaConfig:
    """Mamba-1 / Mixture-of-Mamba (``arch: mom``, models/mamba.py)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 -> ceil(hidden_size / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    # modality-specific projections (the rest is shared); [] = the dense Mamba baseline
    untie: list = field(default_factory=lambda: ["in_proj", "x_proj", "dt_proj", "out_proj"])
    # layer types, one letter per layer: M = Mamba, A = attention (a MoT block, untied by
    # model.mot.untie), E = attention whose model.mot.moe_modality FFN is a routed MoE
    # (``moe``); "" = all Mamba. Hybrid stacks, e.g. "MMAM", "MEMA" (Jamba-like).
    layers: str = ""
    scan_chunk: int = 16  # steps per chunk of the reference selective scan (bench_scan.py)
    # auto: on CUDA use mamba_ssm's selective scan / causal_conv1d when installed (the
    # moefold[mamba] extra; models/mamba_kernels.py; logs once which path runs); cuda:
    # require them on CUDA (fail if not importable); torch: always the reference
    kernels: str = "auto"


@dataclass
class DiffusionConfig:
    """Transfusion: image positions carry continuous patches (``patch_dim`` > 0)."""

    patch_dim: int = 0  # 0 = no diffusion head (discrete tokens only, Chameleon)
    num_timesteps: int = 1000  # DDPM T, cosine schedule
    loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_DDPM


@dataclass
class ModelConfig:
    name: str = "moe_tiny"
    # Architecture family: llm (models/transformer.py) | mot (models/mot.py) |
    # mom (Mamba / Mixture-of-Mamba, models/mamba.py).
    arch: str = "llm"
    vocab_size: int = 2048
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    ffn_hidden_size: int = 128  # dense MLP width (dense layers and dense models)
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Initial weights instead of the seeded init (docs/interop.md): hf:<dir> (Hugging Face
    # safetensors of a supported family) or a moefold export dir.
    init_from: str = ""
    moe: MoEConfig = field(default_factory=MoEConfig)
    mot: MoTConfig = field(default_factory=MoTConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


# architectures whose weights are per modality (models/mot.py, models/mamba.py)
MODALITY_ARCHS = ("mot", "mom")


def layer_kinds(model: ModelConfig) -> str:
    """One letter per layer: ``M`` a Mamba block, ``A`` an attention block, ``E`` an
    attention block with a routed-MoE FFN — the single place that reads ``mamba.layers``."""
    if model.arch != "mom":
        return "A" * model.num_layers
    return model.mamba.layers or "M" * model.num_layers


def moe_layer_pattern(model: ModelConfig) -> list[bool]:
    """Which layers are MoE (True) — the single place that reads ``moe.layer_freq`` (for
    ``arch: mom``, the ``E`` letters of ``mamba.layers``).

    Raises ``ValueError`` for a malformed ``layer_freq``; the trainer's validation turns
    that into a one-line ``ConfigError``.
    """
    moe = model.moe
    n = model.num_layers
    if moe.num_experts == 0:
        return [False] * n
    if model.arch == "mom":  # hybrid stacks name their MoE layers: E in mamba.layers
        return [kind == "E" for kind in layer_kinds(model)]
    freq = moe.layer_freq
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"model.moe.layer_freq={freq} must be >= 1 or a list of 0/1")
        pattern = [i % freq == 0 for i in range(n)]
    else:
        freq = list(freq)
        if len(freq) != n or any(f not in (0, 1) for f in freq):
            raise ValueError(
                f"model.moe.layer_freq={freq} must have model.num_layers={n} entries of 0/1"
            )
        pattern = [bool(f) for f in freq]
    return [p and i >= moe.first_k_dense for i, p in enumerate(pattern)]
