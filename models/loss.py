"""Language-model loss on one device (the tensor-parallel version wraps this)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross entropy over unmasked tokens, computed in fp32.

    A sum (not a mean): the trainer divides by the token count of the whole global batch,
    so the objective does not depend on how the batch is split over micro-batches/ranks.
    """
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return (ce * loss_mask.reshape(-1)).sum()
