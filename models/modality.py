"""Modality routing shared by Mixture-of-Transformers (models/mot.py) and Mixture-of-Mamba
(models/mamba.py): the per-micro-batch grouping of tokens by modality
(:class:`ModalityRoute`), the per-modality projection and norm weights
(:class:`ModalityLinear`, :class:`ModalityRMSNorm`), and the tensor-parallel seam
:class:`Region` (``SINGLE_DEVICE`` on one device; ``parallel.mot_parallel.TPRegion``).

Modality routing is deterministic MoE routing (docs/design.md §5): the tokens of a
micro-batch are sorted by modality once per forward (a stable argsort), every
modality-specific projection is one grouped matmul over the modality segments
(``models.grouped_gemm``, the experts' kernel), and the rows are put back in sequence
order for attention and the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from models.config import ModelConfig, has_experts
from models.grouped_gemm import grouped_mm
from models.layers import Initializer, rms_normalize

__all__ = [
    "SINGLE_DEVICE",
    "UNTIE",
    "ModalityLinear",
    "ModalityRMSNorm",
    "ModalityRoute",
    "Region",
    "moe_modality",
    "untied_parts",
]

UNTIE = ("none", "ffn", "ffn_qkv", "all")


def untied_parts(untie: str) -> set[str]:
    """Which block parts are modality-specific: subset of {"ffn", "attn", "norms"}."""
    return {
        "none": set(),
        "ffn": {"ffn"},
        "ffn_qkv": {"ffn", "attn"},
        "all": {"ffn", "attn", "norms"},
    }[untie]


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

    def __init__(self, num: int, d_in: int, d_out: int, out_proj: bool = False, out_parts: int = 1):
        """``out_parts`` > 1 stores the weight as ``[M, in, parts, out/parts]`` (flattened
        in forward): tensor parallelism then splits every part, e.g. Mamba's x and z."""
        super().__init__()
        shape = (num, d_in, d_out) if out_parts == 1 else (num, d_in, out_parts, d_out // out_parts)
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
        init.apply(self.weight, init.rows(lambda m: init.normal(f"{prefix}.weight[{m}]", std)))


class ModalityRMSNorm(nn.Module):
    """RMSNorm (fp32) with one weight row per modality (``[1, D]``: shared)."""

    def __init__(self, num: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(
        self,
        x: torch.Tensor,
        ids: Optional[torch.Tensor],
        shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``ids``: modality per row of ``x`` (``x.shape[:-1]`` or its leading dims);
        ``shared``: a ``Region.shared_*`` for the weight."""
        w = (self.weight if shared is None else shared(self.weight)).float()
        w = w[0] if w.shape[0] == 1 else w[ids]
        while w.dim() < x.dim():
            w = w.unsqueeze(-2)
        return (rms_normalize(x, self.eps) * w).to(x.dtype)

    def init_params(self, init: Initializer, prefix: str) -> None:
        init.constant_(self.weight, 1.0)


def moe_modality(cfg: ModelConfig) -> int:
    """Id of the modality whose FFN is a routed MoE (MoT+MoE), -1 for none."""
    if not has_experts(cfg) or not cfg.mot.moe_modality:
        return -1
    return list(cfg.mot.modalities).index(cfg.mot.moe_modality)
