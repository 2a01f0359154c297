"""Language-model loss on one device (the tensor-parallel version wraps this)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_sum(ce_N: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w[t] * ce[t]``: a scalar for ``weights`` shaped like ``labels``, a vector [G]
    for ``weights [..., G]`` (one sum per loss group, e.g. per modality)."""
    if weights.dim() == labels.dim():
        return (ce_N * weights.reshape(-1).to(ce_N.dtype)).sum()
    return (ce_N.unsqueeze(-1) * weights.reshape(ce_N.shape[0], -1).to(ce_N.dtype)).sum(0)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross entropy over unmasked tokens, computed in fp32 (per loss
    group when ``loss_mask`` has a trailing group dim, see :func:`weighted_sum`).

    A sum (not a mean): the trainer divides by the token count of the whole global batch,
    so the objective does not depend on how the batch is split over micro-batches/ranks.
    """
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return weighted_sum(ce, labels, loss_mask)
