"""``build_model``: the entry point from a ``ModelConfig`` to its model (models/transformer.py
for ``arch: llm``, models/mot.py for the per-modality architectures)."""

from __future__ import annotations

import torch

from models.config import MODALITY_ARCHS, ModelConfig
from models.mot import MoTTransformer
from models.transformer import Transformer

__all__ = ["build_model"]


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build on ``device``; on "meta" nothing is allocated (call ``to_empty`` and
    ``init_weights`` later). Otherwise the weights are initialised from the current torch
    RNG, so the result equals meta build + to_empty + init_weights under the same seed."""
    with torch.device("meta"):
        model = MoTTransformer(cfg) if cfg.arch in MODALITY_ARCHS else Transformer(cfg)
    device = torch.device(device)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
