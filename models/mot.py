"""Mixture-of-Transformers (Liang et al., 2024): every non-embedding weight of a layer has
one copy per modality; attention is one global attention over the interleaved sequence.

Block (the MoT reference's branch-output norms, no pre-norm)::

    h   = x + Norm_attn^m(Wo^m . Attn(Q^m x, K^m x, V^m x))
    out = h + Norm_ffn^m(FFN^m(h))

Modality routing is deterministic MoE routing (docs/design.md §5): the tokens of a
micro-batch are sorted by modality once per forward (``models.modality.ModalityRoute``, a
stable argsort), every modality-specific projection is one grouped matmul over the modality
segments (``models.grouped_gemm``, the experts' kernel), and the rows are put back in
sequence order for attention and the residual stream. No loop over modalities' tokens.

``untie`` picks what is modality-specific, for the paper's ablation:
``none`` (the dense baseline: identical FLOPs per token), ``ffn``, ``ffn_qkv`` (FFN and
the attention projections, with their QK-norms) and ``all`` (also the branch norms).
A shared component is stored with a leading dim of 1 and initialised exactly like
modality 0 of an untied one, so a one-modality MoT equals the dense model.

Seams filled by ``parallel/``: ``MoTAttention.attn_fn`` (context parallelism, as
``Attention``), ``MoTBlock.region`` (tensor parallelism: how the block enters and leaves
a TP region) and ``ModalityLinear.weight_fn`` (the local shard of a TP DTensor weight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import causal_attention
from models.config import ModelConfig, layer_kinds, moe_layer_config, moe_layer_pattern
from models.diffusion import PatchIO
from models.layers import RotaryEmbedding, recompute
from models.mamba import MambaBlock
from models.modality import (
    SINGLE_DEVICE,
    ModalityLinear,
    ModalityRMSNorm,
    ModalityRoute,
    Region,
    moe_modality,
    untied_parts,
)
from models.moe import MoELayer
from models.steps import Steps, call_steps, interleave, run
from models.transformer import Transformer, forward_halves_paired


def _num(untied: bool, modalities: int) -> int:
    return modalities if untied else 1


class MoTAttention(nn.Module):
    """Per-modality Q/K/V/O (optional per-modality QK-norm) around one global attention;
    ``attn_fn`` as in ``models.layers.Attention``."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, num: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        d = cfg.hidden_size
        self.wq = ModalityLinear(num, d, self.num_heads * hd)
        self.wk = ModalityLinear(num, d, self.num_kv_heads * hd)
        self.wv = ModalityLinear(num, d, self.num_kv_heads * hd)
        self.wo = ModalityLinear(num, self.num_heads * hd, d, out_proj=True)
        self.q_norm = self.k_norm = None
        if cfg.mot.qk_norm:
            self.q_norm = ModalityRMSNorm(num, hd, cfg.norm_eps)
            self.k_norm = ModalityRMSNorm(num, hd, cfg.norm_eps)
        self.rope = rope
        self.attn_fn: Callable[..., torch.Tensor] = causal_attention

    def forward(self, x_BTD, route, region, position_ids_BT, doc_ids_BT, block_ids_BT):
        B, T, _ = x_BTD.shape
        split = self.wq.split
        xs = route.rows(x_BTD, split)
        ids = route.sorted_ids_N if split else None

        def heads(proj: ModalityLinear, norm: Optional[ModalityRMSNorm]) -> torch.Tensor:
            y = proj(xs, route)
            y = y.view(y.shape[0], -1, self.head_dim)
            if norm is not None:
                y = norm(y, ids, region.shared_in)
            return route.tokens(y.flatten(1), split).view(B, T, -1, self.head_dim)

        q, k, v = heads(self.wq, self.q_norm), heads(self.wk, self.k_norm), heads(self.wv, None)
        q, k = self.rope(q, position_ids_BT), self.rope(k, position_ids_BT)
        out = self.attn_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           doc_ids_BT, block_ids_BT).transpose(1, 2).reshape(B, T, -1)
        return route.tokens(self.wo(route.rows(out, split), route), split)


class MoTFeedForward(nn.Module):
    """Per-modality SwiGLU: three grouped matmuls over the modality segments. With
    ``moe_modality`` (MoT+MoE), that modality's FFN is a routed MoE layer instead: the
    dense grouped matmuls cover the other modalities, whose rows come first in the FFN's
    route (``ModalityRoute.ffn``), and the MoE layer gets the trailing rows of its
    modality as one sequence."""

    def __init__(self, num: int, dim: int, hidden: int, moe: Optional[nn.Module] = None,
                 moe_modality: int = -1):
        super().__init__()
        self.moe, self.moe_modality = moe, moe_modality
        # forward_steps recomputes the dense modalities' SwiGLU in backward (the MoE
        # layer its experts; parallel/activation_checkpoint.py, two-batch overlap)
        self.recompute_in_steps = False
        num -= moe is not None
        self.dense = num > 0  # False: one modality, and its FFN is the MoE
        if self.dense:
            self.w1 = ModalityLinear(num, dim, hidden)  # gate
            self.w3 = ModalityLinear(num, dim, hidden)  # up
            self.w2 = ModalityLinear(num, hidden, dim, out_proj=True)  # down

    def forward(self, x_BTD: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        return run(self.forward_steps(x_BTD, route))

    def forward_steps(self, x_BTD: torch.Tensor, route: ModalityRoute
                      ) -> Steps[torch.Tensor]:
        """:meth:`forward` as steps (models/steps.py): pauses inside the MoE layer while
        its rows are in flight (the dense modalities' rows are done before it)."""
        if not self.dense:  # every token is the MoE modality's: the plain MoE layer
            return (yield from call_steps(self.moe, x_BTD))
        rc = self.recompute_in_steps
        if self.moe is not None:
            r = route.for_moe(self.moe_modality)
            xs = r.sort(x_BTD)
            y = recompute(rc, self._swiglu, xs, r)  # MoE rows: zeros
            n = r.num_dense_rows
            y_moe = (yield from call_steps(self.moe, xs[n:].unsqueeze(0))).squeeze(0)
            return r.unsort(torch.cat([y[:n], y_moe]))
        xs = route.rows(x_BTD, self.w1.split)
        return route.tokens(recompute(rc, self._swiglu, xs, route), self.w1.split)

    def _swiglu(self, xs: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        return self.w2(F.silu(self.w1(xs, route)) * self.w3(xs, route), route)

    def stepped_units(self) -> list[nn.Module]:
        """What :meth:`forward_steps` calls whole before its first pause: the dense
        modalities' projections, then the MoE layer's router and shared experts (the
        whole FFN when it has no MoE layer)."""
        if self.moe is None:
            return [self]
        dense = [self.w1, self.w3, self.w2] if self.dense else []
        return [*dense, *self.moe.stepped_units()]


class MoTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, is_moe: bool = False):
        super().__init__()
        parts, M = untied_parts(cfg.mot.untie), len(cfg.mot.modalities)
        self.attention = MoTAttention(cfg, rope, _num("attn" in parts, M))
        self.attention_norm = ModalityRMSNorm(_num("norms" in parts, M), cfg.hidden_size,
                                              cfg.norm_eps)
        moe = MoELayer(cfg) if is_moe else None
        self.ffn = MoTFeedForward(_num("ffn" in parts, M), cfg.hidden_size, cfg.ffn_hidden_size,
                                  moe, moe_modality(cfg))
        self.ffn_norm = ModalityRMSNorm(_num("norms" in parts, M), cfg.hidden_size, cfg.norm_eps)
        self.region: Region = SINGLE_DEVICE
        # forward_steps recomputes the attention branch (and an FFN without MoE) in
        # backward (parallel/activation_checkpoint.py, under the two-batch overlap)
        self.recompute_in_steps = False

    def forward(self, x_BTD, route, position_ids_BT=None, doc_ids_BT=None, block_ids_BT=None):
        return run(self.forward_steps(x_BTD, route, position_ids_BT, doc_ids_BT, block_ids_BT))

    def forward_steps(self, x_BTD, route, position_ids_BT=None, doc_ids_BT=None,
                      block_ids_BT=None) -> Steps[torch.Tensor]:
        """:meth:`forward` as steps: pauses inside an MoE FFN while its rows travel."""
        r, rc = self.region, self.recompute_in_steps
        ids = r.local(route.ids_BT)
        h = x_BTD + recompute(rc, self._attend, x_BTD, route, ids, position_ids_BT, doc_ids_BT,
                              block_ids_BT)
        if self.ffn.moe is None:  # nothing in flight: one plain call (its hooks included)
            y = recompute(rc, self.ffn, r.enter(h), route)
        else:
            y = yield from call_steps(self.ffn, r.enter(h), route)
        return h + self.ffn_norm(r.exit(y), ids, r.shared_out)

    def _attend(self, x_BTD, route, ids, position_ids_BT, doc_ids_BT, block_ids_BT):
        """The attention branch: attention, then its branch-output norm."""
        r = self.region
        a = self.attention(r.enter(x_BTD), route, r, position_ids_BT, doc_ids_BT, block_ids_BT)
        return self.attention_norm(r.exit(a), ids, r.shared_out)

    def stepped_units(self) -> list[nn.Module]:
        """As ``TransformerBlock.stepped_units``: the attention, then the FFN's
        (:meth:`MoTFeedForward.stepped_units`); the branch norms are outside them."""
        return [self.attention, *self.ffn.stepped_units()]


class MoTTransformer(Transformer):
    """The MoT decoder: ``Transformer``'s layout (``tok_embeddings``, ``layers``, ``norm``,
    ``output``: pipeline stages and TP plans split it the same way) with MoT blocks, and,
    in the Transfusion setting (``model.diffusion.patch_dim > 0``), ``patch_io``: noisy
    image patches in, predicted noise out."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        rope = self._init_embedding(cfg)
        self.num_modalities = len(cfg.mot.modalities)
        self.layers = nn.ModuleDict({
            str(i): self._block(moe_layer_config(cfg, i) if is_moe else cfg, rope, kind, is_moe)
            for i, (kind, is_moe) in enumerate(zip(layer_kinds(cfg), moe_layer_pattern(cfg)))})
        self._init_head(cfg)
        self.patch_io: Optional[PatchIO] = None
        if cfg.diffusion.patch_dim > 0:
            self.patch_io = PatchIO(cfg.diffusion.patch_dim, cfg.hidden_size)

    def _block(self, cfg: ModelConfig, rope: RotaryEmbedding, kind: str, is_moe: bool):
        """A MoT block, or a Mamba block (models/mamba.py) where ``kind`` is ``M``
        (``models.config.layer_kinds``)."""
        if kind == "M":
            return MambaBlock(cfg)
        return MoTBlock(cfg, rope, is_moe)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        position_ids_BT: Optional[torch.Tensor] = None,
        doc_ids_BT: Optional[torch.Tensor] = None,
        block_ids_BT: Optional[torch.Tensor] = None,
        modality_ids_BT: Optional[torch.Tensor] = None,
        patches_BTP: Optional[torch.Tensor] = None,
        timesteps_BT: Optional[torch.Tensor] = None,
        *,
        paired: Optional[dict[str, Optional[torch.Tensor]]] = None,
    ):
        """As ``Transformer.forward`` (``paired`` included), plus ``modality_ids_BT``
        (None: all modality 0) and, for Transfusion, ``patches_BTP`` (noisy patch x_t at
        image positions) with ``timesteps_BT`` (t there, -1 elsewhere): returns
        ``(logits, eps_BTP)`` then."""
        args = (tokens_BT, position_ids_BT, doc_ids_BT, block_ids_BT, modality_ids_BT,
                patches_BTP, timesteps_BT)
        if paired is None and self.pair_halves:
            names = ("position_ids_BT", "doc_ids_BT", "block_ids_BT", "modality_ids_BT",
                     "patches_BTP", "timesteps_BT")
            return forward_halves_paired(self, tokens_BT, **dict(zip(names, args[1:])))
        if paired is not None:
            a, b = interleave([self.forward_steps(*args), self.forward_steps(**paired)])
            return a, b
        return run(self._mot_stack(*args, stepped=False))

    def forward_steps(self, *args, **kwargs) -> Steps[Any]:
        """:meth:`forward` as steps (each block's stepped forward; models/steps.py)."""
        return self._mot_stack(*args, **kwargs, stepped=True)

    def _mot_stack(self, tokens_BT, position_ids_BT=None, doc_ids_BT=None, block_ids_BT=None,
                   modality_ids_BT=None, patches_BTP=None, timesteps_BT=None, *,
                   stepped: bool) -> Steps[Any]:
        first = self.tok_embeddings is not None
        h = self.tok_embeddings(tokens_BT) if first else tokens_BT
        if first and self.patch_io is not None and patches_BTP is not None:
            is_patch = (timesteps_BT >= 0).unsqueeze(-1)
            img = self.patch_io.embed(patches_BTP.to(h.dtype), timesteps_BT.clamp(min=0))
            h = torch.where(is_patch, img.to(h.dtype), h)
        if modality_ids_BT is None:
            modality_ids_BT = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        route = ModalityRoute.build(modality_ids_BT, self.num_modalities)
        for layer in self.layers.values():
            if stepped:
                h = yield from call_steps(layer, h, route, position_ids_BT, doc_ids_BT,
                                          block_ids_BT)
            else:
                h = layer(h, route, position_ids_BT, doc_ids_BT, block_ids_BT)
        if self.norm is None:
            return h
        h = self.norm(h)
        logits = self._logits(h)
        if self.patch_io is not None:
            return logits, self.patch_io.predict(h)
        return logits
