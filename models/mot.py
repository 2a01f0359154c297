"""Mixture-of-Transformers (Liang et al., 2024): every non-embedding weight of a layer has
one copy per modality; attention is one global attention over the interleaved sequence.

Block (the MoT reference's branch-output norms, no pre-norm)::

    h   = x + Norm_attn^m(Wo^m . Attn(Q^m x, K^m x, V^m x))
    out = h + Norm_ffn^m(FFN^m(h))

Modality routing is deterministic MoE routing (docs/design.md §5): the tokens of a
micro-batch are sorted by modality once per forward (:class:`ModalityRoute`, a stable
argsort), every modality-specific projection is one grouped matmul over the modality
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
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, layer_kinds, moe_layer_pattern
from models.diffusion import PatchIO
from models.grouped_gemm import grouped_mm
from models.layers import Initializer, RotaryEmbedding, causal_attention, rms_normalize
from models.transformer import Transformer

UNTIE = ("none", "ffn", "ffn_qkv", "all")


def untied_parts(untie: str) -> set[str]:
    """Which block parts are modality-specific: subset of {"ffn", "attn", "norms"}."""
    return {"none": set(), "ffn": {"ffn"}, "ffn_qkv": {"ffn", "attn"},
            "all": {"ffn", "attn", "norms"}}[untie]


@dataclass
class ModalityRoute:
    """Tokens of a micro-batch grouped by modality: ``order_N`` (row -> token, stable
    argsort of the flattened ids), ``inverse_N`` (token -> row), ``counts_M`` (rows per
    modality), ``ids_BT``. Built once per forward and shared by every layer."""

    ids_BT: torch.Tensor
    order_N: torch.Tensor
    inverse_N: torch.Tensor
    counts_M: torch.Tensor
    sorted_ids_N: torch.Tensor
    # MoT+MoE: the FFN's route, with the MoE modality's rows last (``for_moe``)
    ffn: Optional[ModalityRoute] = None
    num_dense_rows: int = 0

    @classmethod
    def build(cls, ids_BT: torch.Tensor, num_modalities: int) -> ModalityRoute:
        flat = ids_BT.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=num_modalities)[:num_modalities]
        return cls(ids_BT, order, inverse, counts, flat[order])

    def for_moe(self, moe_modality: int) -> ModalityRoute:
        """The FFN's route under MoT+MoE, built on first use and shared by the layers:
        rows of the other modalities first (grouped in id order), then those of
        ``moe_modality``; its row count is read on the host once per forward (the MoE
        layer's input size), as the dispatcher's split sizes are."""
        if self.ffn is not None:
            return self.ffn
        M = self.counts_M.shape[0]
        key = self.ids_BT - (self.ids_BT > moe_modality).long()  # dense index
        key = torch.where(self.ids_BT == moe_modality, M - 1, key)
        ffn = ModalityRoute.build(key, M)
        ffn.num_dense_rows = int(ffn.counts_M[: M - 1].sum())
        ffn.counts_M = ffn.counts_M[: M - 1]  # the dense weights' groups; MoE rows trail
        self.ffn = ffn
        return ffn

    def sort(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD.reshape(-1, x_BTD.shape[-1])[self.order_N]

    def unsort(self, y_ND: torch.Tensor) -> torch.Tensor:
        B, T = self.ids_BT.shape
        return y_ND[self.inverse_N].view(B, T, -1)

    def rows(self, x_BTD: torch.Tensor, split: bool) -> torch.Tensor:
        """Rows for projections: grouped by modality when any weight is per modality
        (``split``), else in sequence order (no gather)."""
        return self.sort(x_BTD) if split else x_BTD.reshape(-1, x_BTD.shape[-1])

    def tokens(self, y_ND: torch.Tensor, split: bool) -> torch.Tensor:
        """Inverse of :meth:`rows`: [B, T, ...] in sequence order."""
        return self.unsort(y_ND) if split else y_ND.view(*self.ids_BT.shape, -1)


class Region:
    """How a block's projections meet tensor parallelism (identity on one device).

    ``enter(x)``: the block-part input as the full sequence every TP rank multiplies by
    its weight shard; ``exit(y)``: the partial output summed over TP (and re-sharded by
    sequence under SP); ``local(ids_BT)``: the ids of the tokens ``exit`` returns;
    ``shared_out(w)`` / ``shared_in(w)``: a replicated weight applied to the tokens ``exit``
    returns / inside the region (to the rank's heads): its gradient is summed over TP
    where the rank saw only part of the data (SP's sequence chunk; its heads)."""

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def local(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return ids_BT

    def shared_out(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def shared_in(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """A partial sum every rank then uses in full (Mamba's dt/B/C): summed over TP
        forward, and its gradient summed backward."""
        return y


SINGLE_DEVICE = Region()


class ModalityLinear(nn.Module):
    """``weight [M, in, out]`` (M = 1: shared by every modality); ``forward(x_N, route)``
    multiplies row ``n`` (grouped by modality) by its modality's matrix."""

    def __init__(self, num: int, d_in: int, d_out: int, out_proj: bool = False,
                 out_parts: int = 1):
        """``out_parts`` > 1 stores the weight as ``[M, in, parts, out/parts]`` (flattened
        in forward): tensor parallelism then splits every part, e.g. Mamba's x and z."""
        super().__init__()
        shape = (num, d_in, d_out) if out_parts == 1 else (num, d_in, out_parts,
                                                            d_out // out_parts)
        self.weight = nn.Parameter(torch.empty(shape))
        self.out_proj = out_proj  # a block's output projection: initialised with out_std
        self.init_by_parent = False  # the owning module initialises it (Mamba's dt_proj)
        self.weight_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def split(self) -> bool:
        """Per modality (M > 1), as opposed to shared."""
        return self.weight.shape[0] > 1

    def local_weight(self) -> torch.Tensor:
        w = self.weight if self.weight_fn is None else self.weight_fn(self.weight)
        return w.flatten(2) if w.dim() == 4 else w

    def forward(self, x_ND: torch.Tensor, route: Optional[ModalityRoute]) -> torch.Tensor:
        w = self.local_weight()
        if w.shape[0] == 1:
            return x_ND @ w[0]
        return grouped_mm(x_ND, w, route.counts_M)

    def init_params(self, init: Initializer, prefix: str) -> None:
        if self.init_by_parent:
            return
        std = init.out_std if self.out_proj else init.std
        for m in range(self.weight.shape[0]):
            init.normal_(self.weight[m], f"{prefix}.weight[{m}]", std)


class ModalityRMSNorm(nn.Module):
    """RMSNorm (fp32) with one weight row per modality (``[1, D]``: shared)."""

    def __init__(self, num: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor],
                shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``ids``: modality per row of ``x`` (``x.shape[:-1]`` or its leading dims);
        ``shared``: a ``Region.shared_*`` for the weight."""
        w = (self.weight if shared is None else shared(self.weight)).float()
        w = w[0] if w.shape[0] == 1 else w[ids]
        while w.dim() < x.dim():
            w = w.unsqueeze(-2)
        return (rms_normalize(x, self.eps) * w).to(x.dtype)

    def init_params(self, init: Initializer, prefix: str) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


def moe_modality(cfg: ModelConfig) -> int:
    """Id of the modality whose FFN is a routed MoE (MoT+MoE), -1 for none."""
    if cfg.moe.num_experts == 0 or not cfg.mot.moe_modality:
        return -1
    return list(cfg.mot.modalities).index(cfg.mot.moe_modality)


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
        num -= moe is not None
        self.dense = num > 0  # False: one modality, and its FFN is the MoE
        if self.dense:
            self.w1 = ModalityLinear(num, dim, hidden)  # gate
            self.w3 = ModalityLinear(num, dim, hidden)  # up
            self.w2 = ModalityLinear(num, hidden, dim, out_proj=True)  # down

    def forward(self, x_BTD: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        if not self.dense:  # every token is the MoE modality's: the plain MoE layer
            return self.moe(x_BTD)
        if self.moe is not None:
            r = route.for_moe(self.moe_modality)
            xs = r.sort(x_BTD)
            y = self.w2(F.silu(self.w1(xs, r)) * self.w3(xs, r), r)  # MoE rows: zeros
            n = r.num_dense_rows
            y_moe = self.moe(xs[n:].unsqueeze(0)).squeeze(0)
            return r.unsort(torch.cat([y[:n], y_moe]))
        xs = route.rows(x_BTD, self.w1.split)
        y = self.w2(F.silu(self.w1(xs, route)) * self.w3(xs, route), route)
        return route.tokens(y, self.w1.split)


class MoTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, is_moe: bool = False):
        super().__init__()
        parts, M = untied_parts(cfg.mot.untie), len(cfg.mot.modalities)
        self.attention = MoTAttention(cfg, rope, _num("attn" in parts, M))
        self.attention_norm = ModalityRMSNorm(_num("norms" in parts, M), cfg.hidden_size,
                                              cfg.norm_eps)
        moe = None
        if is_moe:
            from models.moe import MoELayer

            moe = MoELayer(cfg)
        self.ffn = MoTFeedForward(_num("ffn" in parts, M), cfg.hidden_size, cfg.ffn_hidden_size,
                                  moe, moe_modality(cfg))
        self.ffn_norm = ModalityRMSNorm(_num("norms" in parts, M), cfg.hidden_size, cfg.norm_eps)
        self.region: Region = SINGLE_DEVICE

    def forward(self, x_BTD, route, position_ids_BT=None, doc_ids_BT=None, block_ids_BT=None):
        r = self.region
        ids = r.local(route.ids_BT)
        a = self.attention(r.enter(x_BTD), route, r, position_ids_BT, doc_ids_BT, block_ids_BT)
        h = x_BTD + self.attention_norm(r.exit(a), ids, r.shared_out)
        return h + self.ffn_norm(r.exit(self.ffn(r.enter(h), route)), ids, r.shared_out)


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
            str(i): self._block(cfg, rope, kind, is_moe)
            for i, (kind, is_moe) in enumerate(zip(layer_kinds(cfg), moe_layer_pattern(cfg)))})
        self._init_head(cfg)
        self.patch_io: Optional[PatchIO] = None
        if cfg.diffusion.patch_dim > 0:
            self.patch_io = PatchIO(cfg.diffusion.patch_dim, cfg.hidden_size)

    def _block(self, cfg: ModelConfig, rope: RotaryEmbedding, kind: str, is_moe: bool):
        """A MoT block, or a Mamba block (models/mamba.py) where ``kind`` is ``M``
        (``models.config.layer_kinds``)."""
        if kind == "M":
            from models.mamba import MambaBlock

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
    ):
        """As ``Transformer.forward``, plus ``modality_ids_BT`` (None: all modality 0) and,
        for Transfusion, ``patches_BTP`` (noisy patch x_t at image positions) with
        ``timesteps_BT`` (t there, -1 elsewhere): returns ``(logits, eps_BTP)`` then."""
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
            h = layer(h, route, position_ids_BT, doc_ids_BT, block_ids_BT)
        if self.norm is None:
            return h
        h = self.norm(h)
        logits = self._logits(h)
        if self.patch_io is not None:
            return logits, self.patch_io.predict(h)
        return logits
