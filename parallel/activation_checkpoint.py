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
    wrapper would sit around): no wrapper on a steppable block; it recomputes its
    attention and its FFN, or its MoE layer its routed and shared experts (a MoT block:
    its attention branch and the dense modalities' SwiGLU), inside ``forward_steps``
    (``recompute_in_steps``). Kept for backward: each block's input, the router's
    outputs, the exchanged rows and the combine's inputs (what crosses ranks is not
    exchanged again). A block the stepped forward calls whole (Mamba) is wrapped."""
    names = list(model.layers)
    if stepped:
        # steppable blocks recompute inside their steps; a block called whole (Mamba)
        # is wrapped as usual
        for m in (m for b in model.layers.values() if hasattr(b, "forward_steps")
                  for m in b.modules()):
            if hasattr(m, "recompute_in_steps"):
                m.recompute_in_steps = True
        names = [n for n, b in model.layers.items() if not hasattr(b, "forward_steps")]
    for name in names:
        block = model.layers[name]
        model.layers[name] = checkpoint_wrapper(
            block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
