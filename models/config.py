"""Model configuration schema (plain dataclasses; Hydra validates YAML against them).

Kept in ``models/`` so a model can be built without the trainer; ``trainer/config.py``
nests these into the full run schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional


@dataclass
class MoEConfig:
    """Routed-expert layer. ``num_experts == 0`` means every layer is a dense MLP."""

    # Routed experts per MoE layer: an int (every MoE layer), or a list with one entry per
    # layer (model.num_layers entries; pyramid MoE): >= 1 on the MoE layers layer_freq /
    # first_k_dense pick, 0 on the dense ones. Read it only through experts_per_layer().
    num_experts: Any = 0
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
    # What the switch loss's expert-load fractions f_i count (docs/moe_features.md):
    # micro_batch = this micro-batch's routing (Switch / Megatron default);
    # global_batch = the whole previous step's global batch (all micro-batches, all DP
    # ranks; Qwen's global-batch balance, lagged one step so every layout gives the same
    # loss; no balance gradient before the first step's counts exist).
    aux_loss_scope: str = "micro_batch"
    # Aux-loss-free balancing: a per-expert bias added to scores for selection only,
    # updated after each optimizer step by ``rate * sign(mean_count - count)``.
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3

    # AdaMoE null experts: n extra router rows whose experts compute nothing and return
    # zero; top_k is taken over num_experts + n, so a token uses 0..top_k real experts.
    # Null picks are never dispatched and never dropped by capacity. 0 disables.
    num_null_experts: int = 0

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

    # Residual MoE (DeepSpeed-MoE): every MoE layer adds a dense SwiGLU branch of width
    # shared_expert_ffn_hidden_size (0 -> expert_ffn_hidden_size), mixed per token with
    # the routed output by softmax(Linear(D, 2)(x)); the paper routes top_k=1.
    residual: bool = False


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
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, ``model.attention: mla``, models/mla.py).

    Per head the query/key are ``[nope | rope]`` (``qk_nope_head_dim + qk_rope_head_dim``
    channels) and the value ``v_head_dim``; keys and values are up-projected from one
    compressed latent per token, the RoPE part of the key is one head shared by all."""

    # rank of the query compression (x -> q_a -> RMSNorm -> q_b); 0: one q projection
    # straight from x (DeepSeek-V2-Lite)
    q_lora_rank: int = 0
    kv_lora_rank: int = 64  # rank of the compressed key/value latent c_kv (cached at inference)
    qk_nope_head_dim: int = 16  # per-head query/key channels without position encoding
    qk_rope_head_dim: int = 8  # per-head query channels with RoPE (the key's are shared)
    v_head_dim: int = 16  # per-head value channels (o_proj input is num_heads * v_head_dim)
    # Zero-pad v to the q/k width before the attention core (output sliced back): fused
    # SDPA kernels that need equal widths (CPU flash; CUDA flash) then run instead of the
    # math fallback that saves the [T, T] probabilities; costs (qk - v) / v more AV work
    pad_v: bool = False


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
    # Attention of the llm blocks: gqa (models/layers.py; num_kv_heads, head_dim) | mla
    # (multi-head latent attention, models/mla.py; its sizes in model.mla).
    attention: str = "gqa"
    init_std: float = 0.02
    # Initial weights instead of the seeded init (docs/interop.md): hf:<dir> (Hugging Face
    # safetensors of a supported family) or a moefold export dir.
    init_from: str = ""
    moe: MoEConfig = field(default_factory=MoEConfig)
    mot: MoTConfig = field(default_factory=MoTConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)


# architectures whose weights are per modality (models/mot.py, models/mamba.py)
MODALITY_ARCHS = ("mot", "mom")


def layer_kinds(model: ModelConfig) -> str:
    """One letter per layer: ``M`` a Mamba block, ``A`` an attention block, ``E`` an
    attention block with a routed-MoE FFN — the single place that reads ``mamba.layers``."""
    if model.arch != "mom":
        return "A" * model.num_layers
    return model.mamba.layers or "M" * model.num_layers


def _experts_spec(model: ModelConfig) -> list[int] | int:
    ne = model.moe.num_experts
    return ne if isinstance(ne, int) else [int(e) for e in ne]


def has_experts(model: ModelConfig) -> bool:
    """Whether ``model.moe.num_experts`` asks for any routed experts (int > 0, or a list
    with a non-zero entry)."""
    ne = _experts_spec(model)
    return ne > 0 if isinstance(ne, int) else any(e > 0 for e in ne)


def moe_layer_pattern(model: ModelConfig) -> list[bool]:
    """Which layers are MoE (True) — the single place that reads ``moe.layer_freq`` (for
    ``arch: mom``, the ``E`` letters of ``mamba.layers``).

    Raises ``ValueError`` for a malformed ``layer_freq``; the trainer's validation turns
    that into a one-line ``ConfigError``.
    """
    moe = model.moe
    n = model.num_layers
    if not has_experts(model):
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


def experts_per_layer(model: ModelConfig) -> list[int]:
    """Routed experts of each layer (``model.num_layers`` entries, 0 on dense layers) — the
    single place that reads ``moe.num_experts`` (an int, or a per-layer list: pyramid MoE).

    Raises ``ValueError`` (one line) when a list does not fit the layer pattern.
    """
    pattern = moe_layer_pattern(model)
    ne = _experts_spec(model)
    if isinstance(ne, int):
        if ne < 0:
            raise ValueError(f"model.moe.num_experts={ne} must be >= 0")
        return [ne if p else 0 for p in pattern]
    if len(ne) != model.num_layers:
        raise ValueError(f"model.moe.num_experts={ne} must be an int or have "
                         f"model.num_layers={model.num_layers} entries (0 on dense layers)")
    for i, (p, e) in enumerate(zip(pattern, ne)):
        if p and e < 1:
            raise ValueError(f"model.moe.num_experts[{i}]={e} but layer {i} is a MoE layer "
                             "(by model.moe.layer_freq / first_k_dense): must be >= 1")
        if not p and e != 0:
            raise ValueError(f"model.moe.num_experts[{i}]={e} but layer {i} is dense (by "
                             "model.moe.layer_freq / first_k_dense): must be 0")
    return ne


def max_experts(model: ModelConfig) -> int:
    """The largest per-layer expert count (0 for a dense model)."""
    return max(experts_per_layer(model), default=0)


def moe_layer_config(model: ModelConfig, layer: int) -> ModelConfig:
    """The config MoE layer ``layer`` is built from: a copy whose ``moe.num_experts`` is
    that layer's int count, so the router, experts and stats see one plain int."""
    E = experts_per_layer(model)[layer]
    if model.moe.num_experts == E:
        return model
    return replace(model, moe=replace(model.moe, num_experts=E))


def check_attention(model: ModelConfig) -> None:
    """Raise ``ValueError`` (one line naming the key) for an attention choice or MLA size
    that cannot be built; the trainer's validation turns it into a ``ConfigError``."""
    if model.attention not in ("gqa", "mla"):
        raise ValueError(f"model.attention={model.attention!r} is not one of 'gqa', 'mla'")
    if model.attention == "gqa":
        return
    if model.arch != "llm":
        raise ValueError(f"model.attention=mla needs model.arch=llm (got {model.arch}: "
                         "MoT/MoM blocks have their own attention)")
    a = model.mla
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if getattr(a, key) <= 0:
            raise ValueError(f"model.mla.{key}={getattr(a, key)} must be > 0")
    if a.q_lora_rank < 0:
        raise ValueError(f"model.mla.q_lora_rank={a.q_lora_rank} must be >= 0 (0: no "
                         "query compression)")
    if a.qk_rope_head_dim % 2:
        raise ValueError(f"model.mla.qk_rope_head_dim={a.qk_rope_head_dim} must be even "
                         "(RoPE rotates channel pairs)")
