"""What a model's forward takes from a micro-batch besides the tokens.

A micro-batch is a dict of ``[B, T]`` tensors (``tokens``, ``labels``, ``loss_mask`` and,
as the data provides them, document ids, positions, modality ids, image patches...). The
trainer's step runners and the pipeline stages pass the model only what its forward
declares, by these names.
"""

from __future__ import annotations

import torch

from models.config import MODALITY_ARCHS

__all__ = ["model_kwargs"]

# batch key -> model forward keyword; the first stage also takes "tokens" positionally
_MODEL_INPUTS = {"position_ids": "position_ids_BT", "doc_ids": "doc_ids_BT",
                 "block_ids": "block_ids_BT"}
_MOT_INPUTS = {"modality_ids": "modality_ids_BT", "patches": "patches_BTP",
               "timesteps": "timesteps_BT"}


def model_kwargs(mb: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The micro-batch tensors the model's forward takes besides the tokens."""
    keys = {**_MODEL_INPUTS, **(_MOT_INPUTS if arch in MODALITY_ARCHS else {})}
    return {kw: mb[k] for k, kw in keys.items() if k in mb}
