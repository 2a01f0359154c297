"""What the trainer needs from its data (``TrainData``), and the sample layout every
implementation follows (``microbatch_ranges``).

The trainer asks for the micro-batches of one data-parallel rank, for one global batch:
training by ``consumed_samples`` (so resuming needs nothing else), validation by the index
of a fixed validation global batch. Implementations: ``PretrainData``
(``trainer.data.indexed``, Megatron GPT datasets) and ``MultimodalData``
(``trainer.data.multimodal``, the embedded captioned digits); ``trainer.data.build_data``
picks one by ``data.source``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainData(Protocol):
    """The data of a run, as the trainer uses it.

    Each micro-batch is a dict of ``[micro_batch_size, seq_len]`` tensors: ``tokens``,
    ``labels`` (long), ``loss_mask`` (float), ``position_ids`` (long), and where the
    implementation provides them ``doc_ids`` (packed documents), ``modality_ids`` /
    ``loss_modality`` (multimodal), ``block_ids`` / ``patches`` / ``noise`` /
    ``timesteps`` (Transfusion images). The same (seed, global batch) gives the same
    samples for every data-parallel layout (see ``microbatch_ranges``).
    """

    global_batch_size: int

    def train_microbatches(
        self, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """DP rank ``dp_rank``'s micro-batches of the global batch starting at sample
        ``consumed_samples``."""
        ...

    def valid_microbatches(
        self, iteration: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """DP rank ``dp_rank``'s micro-batches of the ``iteration``-th fixed validation
        global batch."""
        ...


def microbatch_ranges(start: int, g: int, mbs: int, dp_rank: int, dp_size: int) -> list[range]:
    """Sample indices of each micro-batch of DP rank ``dp_rank`` in the global batch of
    ``g`` samples starting at ``start``: micro-batch ``i`` holds samples
    ``start + (i*dp + r)*mbs ... + mbs`` (Megatron's pretraining-sampler order)."""
    if mbs <= 0 or dp_size <= 0 or g % (mbs * dp_size):
        raise ValueError(
            f"global batch {g} is not a multiple of micro_batch_size*dp_size={mbs}*{dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
    return [
        range(start + (i * dp_size + dp_rank) * mbs, start + (i * dp_size + dp_rank + 1) * mbs)
        for i in range(g // (mbs * dp_size))
    ]
