"""Activation checkpointing: recompute each transformer block in backward (under the
two-batch overlap: its attention and experts, see :func:`apply_activation_checkpointing`).

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


def apply_activation_checkpointing(model: nn.Module, stepped: bool = False) -> None:
    """Wrap every block of ``model.layers`` in place (FQNs are preserved for checkpoints).

    ``stepped`` (the two-batch overlap, whose stepped forward splits the block call a
    wrapper would sit around): no wrapper; each block recomputes its attention and its
    FFN, or its MoE layer its routed and shared experts, inside ``forward_steps``
    (``recompute_in_steps``). Kept for backward: each block's input, the router's
    outputs, the exchanged rows and the combine's inputs (what crosses ranks is not
    exchanged again)."""
    if stepped:
        for block in model.layers.values():
            block.recompute_in_steps = True
            if hasattr(block.ffn, "recompute_in_steps"):
                block.ffn.recompute_in_steps = True
        return
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
