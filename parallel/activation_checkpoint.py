"""Activation checkpointing: recompute each transformer block in backward.

Applied after TP/EP (so the recomputation includes their collectives, in the same order
on every rank) and before FSDP. Non-reentrant ``torch.utils.checkpoint``; the MoE layer
skips its statistics during the recompute, so aux losses and expert counts are recorded
once (models/moe.py).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every block of ``model.layers`` in place (FQNs are preserved for checkpoints)."""
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
