"""The training objective, for text-only and multimodal batches alike.

Per micro-batch the model's outputs give a vector of *sums* ``[G + 1]``: the LM cross
entropy summed over the loss tokens of each loss group (the modality of the predicted
token; one group for text-only data), then the diffusion MSE summed over image patch
values (Transfusion; 0 otherwise). The step's normalisers — the same vector of counts,
summed over the whole global batch — turn sums into the objective

    L = sum_g LM_g / N_LM  +  lambda * MSE / N_patch_values

so it (and its gradient) does not depend on how the batch is split into micro-batches
or ranks. ``LM_g / N_g`` are the per-modality losses that are logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

from models.config import MODALITY_ARCHS
from models.loss import lm_loss_sum

LossSum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Objective:
    """``groups``: names of the LM loss groups (the modalities; ``["text"]`` for LLMs);
    ``diffusion_weight``: lambda (Transfusion), None without a diffusion head;
    ``loss_sum(logits, labels, weights [..., G]) -> [G]``: the CE sums (the parallel
    model's, vocab-parallel under TP; ``models.loss.lm_loss_sum`` by default)."""

    def __init__(self, groups: list[str], diffusion_weight: Optional[float],
                 loss_sum: LossSum = lm_loss_sum, no_lm: tuple[str, ...] = ()):
        """``no_lm``: groups without LM targets (Transfusion's images), not logged."""
        self.groups, self.diffusion_weight = list(groups), diffusion_weight
        self.loss_sum = loss_sum
        self.G = len(groups)
        self.no_lm = set(no_lm)

    @classmethod
    def from_config(cls, cfg: Any, loss_sum: LossSum = lm_loss_sum) -> Objective:
        """The run's objective: one LM group per data modality (``text`` for text data), the
        diffusion term for a model with a diffusion head, no LM loss on Transfusion's
        (continuous) images."""
        multimodal = cfg.data.source == "multimodal"
        diffusion = cfg.model.diffusion
        weight = None
        if cfg.model.arch in MODALITY_ARCHS and diffusion.patch_dim:
            weight = diffusion.loss_weight
        no_lm = ("image",) if multimodal and cfg.data.setting == "transfusion" else ()
        return cls(list(cfg.data.modalities) if multimodal else ["text"], weight, loss_sum,
                   no_lm)

    def modality_tokens(self, mbs: list[dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """This rank's input positions per modality (tokens/s per modality); None for
        text-only data."""
        if "modality_ids" not in mbs[0]:
            return None
        M = self.G
        return sum(torch.bincount(mb["modality_ids"].flatten(), minlength=M)[:M]
                   for mb in mbs).float()

    def group_weights(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T, G]: the loss mask split by the predicted token's group."""
        mask = mb["loss_mask"]
        if self.G == 1:
            return mask.unsqueeze(-1)
        return F.one_hot(mb["loss_modality"], self.G).to(mask.dtype) * mask.unsqueeze(-1)

    def counts(self, mbs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """This rank's normalisers [G + 1] (LM tokens per group, patch values)."""
        out = []
        for mb in mbs:
            c = self.group_weights(mb).sum((0, 1))
            d = torch.zeros((), device=c.device)
            if self.diffusion_weight is not None and "timesteps" in mb:
                d = (mb["timesteps"] >= 0).sum() * mb["patches"].shape[-1]
            out.append(torch.cat([c.float(), d.float().view(1)]))
        return torch.stack(out).sum(0)

    def sums(self, out: Any, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """[G + 1] sums of one micro-batch from the model output (logits, or
        ``(logits, eps)`` with a diffusion head)."""
        logits, eps = out if isinstance(out, tuple) else (out, None)
        lm = self.loss_sum(logits, mb["labels"], self.group_weights(mb))
        if eps is None:
            return torch.cat([lm, lm.new_zeros(1)])
        is_patch = (mb["timesteps"] >= 0).unsqueeze(-1)
        err = (eps.float() - mb["noise"].float()).pow(2)
        return torch.cat([lm, torch.where(is_patch, err, 0).sum().view(1)])

    def tokens(self, norm: torch.Tensor, patch_dim: int) -> torch.Tensor:
        """Tokens trained on (for tokens/s, MFU): LM targets plus image patch positions."""
        out = norm[: self.G].sum()
        if self.diffusion_weight is not None:
            out = out + norm[self.G] / patch_dim
        return out

    def _lm(self, sums: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return sums[: self.G].sum() / norm[: self.G].sum().clamp_min(1)

    def _diffusion(self, sums: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return sums[self.G] / norm[self.G].clamp_min(1)

    def value(self, sums: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The objective's contribution of ``sums`` given the global normalisers."""
        loss = self._lm(sums, norm)
        if self.diffusion_weight is not None:
            loss = loss + self.diffusion_weight * self._diffusion(sums, norm)
        return loss

    def metrics(self, sums: torch.Tensor, norm: torch.Tensor, prefix: str = "") -> dict:
        """``lm_loss``, ``diffusion_loss`` and one ``loss_<group>`` per group (tensors)."""
        out = {f"{prefix}lm_loss": self._lm(sums, norm)}
        if self.G > 1:
            for g, name in enumerate(self.groups):
                if name not in self.no_lm:
                    out[f"{prefix}loss_{name}"] = sums[g] / norm[g].clamp_min(1)
        if self.diffusion_weight is not None:
            out[f"{prefix}diffusion_loss"] = self._diffusion(sums, norm)
        return out
