"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv 2405.04434 / DeepSeek-V3 arXiv
2412.19437): low-rank compressed keys/values and a decoupled RoPE key shared by all heads.

Per token (``H`` heads, sizes from ``model.mla``)::

    q    = q_b_proj(RMSNorm(q_a_proj(x)))           (q_lora_rank > 0; else q_proj(x))
           -> per head [q_nope (qk_nope) | q_rope (qk_rope)]
    c_kv, k_rope = split(kv_a_proj_with_mqa(x), [kv_lora_rank, qk_rope])
    k_nope, v = split(kv_b_proj(RMSNorm(c_kv)), per head [qk_nope | v_head])
    q = [q_nope, RoPE(q_rope)];  k = [k_nope, RoPE(k_rope) broadcast to every head]
    out = o_proj(attn_fn(q, k, v))                    softmax scale 1/sqrt(qk_nope + qk_rope)

The parameter names are those of the Hugging Face DeepseekV3 checkpoints, so the weight
map (models/hf_map.py) is one-to-one. RoPE is the "rotate half" form of
models/layers.py on the ``qk_rope_head_dim`` channels; DeepSeek's checkpoints pair the
channels interleaved (HF ``rope_interleave``), which is the same rotation after a fixed
permutation of those channels — an importer permutes the rope rows of ``q_b_proj`` and
``kv_a_proj_with_mqa`` once. YaRN (DeepSeek-V3's long-context extension) is not
implemented: plain RoPE, unscaled softmax (docs/moe_features.md).

The core is the same ``attn_fn`` seam as ``Attention`` (context parallelism swaps it):
q, k ``[B, H, T, qk_nope + qk_rope]``, v ``[B, H, T, v_head]`` — the value width may
differ from the query/key width (SDPA's default scale is 1/sqrt of the q/k width, which
is MLA's); PyTorch's fused kernels need equal widths on some backends (CPU flash
falls back to the math path, which saves the [T, T] probabilities), which
``model.mla.pad_v`` provides by zero-padding v. Head counts come from the weights, so a TP plan that shards ``q_b_proj`` /
``kv_b_proj`` by heads works unchanged; ``shared_rope`` is the seam for the one RoPE key
every local head reads (identity on one device; under TP its gradient is summed over
the ranks, each of which holds other heads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from models.config import ModelConfig
from models.layers import Initializer, RMSNorm, RotaryEmbedding, causal_attention

__all__ = ["MultiHeadLatentAttention", "mla_rope_dim"]


def mla_rope_dim(cfg: ModelConfig) -> int:
    """Channels of the shared RoPE table for ``cfg``'s attention."""
    if cfg.attention == "mla":
        return cfg.mla.qk_rope_head_dim
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class MultiHeadLatentAttention(nn.Module):
    """MLA with the forward signature of ``models.layers.Attention`` (see module
    docstring). ``rope``: a shared table of ``qk_rope_head_dim`` channels (or its own)."""

    def __init__(self, cfg: ModelConfig, rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        a = cfg.mla
        d, H = cfg.hidden_size, cfg.num_heads
        self.num_heads = H
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.qk_dim = self.nope + self.rope_dim
        self.pad_v = a.pad_v and self.v_dim < self.qk_dim
        if a.q_lora_rank:
            self.q_a_proj = nn.Linear(d, a.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(a.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, a.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)
        self.rope = rope or RotaryEmbedding(self.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.attn_fn: Callable[..., torch.Tensor] = causal_attention
        self.shared_rope: Callable[[torch.Tensor], torch.Tensor] = _identity

    def query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``[B, T, H_local * (qk_nope + qk_rope)]`` before RoPE."""
        if self.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        return self.q_proj(x_BTD)

    def forward(
        self,
        x_BTD: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.query(x_BTD).view(B, T, -1, self.qk_dim)
        H = q.shape[2]  # local heads (TP shards q_b_proj / kv_b_proj by heads)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BTD).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = self.rope(self.shared_rope(k_rope).unsqueeze(2), position_ids_BT)
        q = torch.cat([q_nope, self.rope(q_rope, position_ids_BT)], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, T, H, self.rope_dim)], dim=-1)
        if self.pad_v:  # model.mla.pad_v: equal widths for fused kernels
            v = torch.nn.functional.pad(v, (0, self.qk_dim - self.v_dim))
        out = self.attn_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           doc_ids_BT, block_ids_BT)
        if self.pad_v:
            out = out[..., :self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def init_params(self, init: Initializer, prefix: str) -> None:
        """Linears from the seeded normal (o_proj at the output std); the two norms
        initialise themselves (``RMSNorm.init_params``)."""
        names = ("q_a_proj", "q_b_proj") if self.q_lora_rank else ("q_proj",)
        for name in (*names, "kv_a_proj_with_mqa", "kv_b_proj"):
            init.normal_(getattr(self, name).weight, f"{prefix}.{name}.weight", init.std)
        init.normal_(self.o_proj.weight, f"{prefix}.o_proj.weight", init.out_std)
