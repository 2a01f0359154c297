"""The start-up lines of a run: model size and FLOPs, the peak used for MFU, the layout,
the pipeline report and where the run resumed."""

from __future__ import annotations

from typing import Any

import torch

from models.config import MODALITY_ARCHS, experts_per_layer
from models.flops import flops_per_token_by_modality, param_counts, training_flops_per_token
from trainer.config import moe_layer_pattern
from trainer.perf import Throughput, peak_flops_per_device

__all__ = ["startup_report"]


def _experts_note(model_cfg: Any) -> str:
    """Pyramid / residual MoE: the per-layer expert counts and the dense branch."""
    note = ""
    if not isinstance(model_cfg.moe.num_experts, int):
        note += f" (experts per layer {experts_per_layer(model_cfg)})"
    if model_cfg.moe.residual and any(experts_per_layer(model_cfg)):
        note += " (residual MoE)"
    return note


def startup_report(tr: Any) -> Throughput:
    """Log the model, the layout and the resume point of the Trainer ``tr``; returns the
    throughput meter (tokens/s, MFU against the device's peak)."""
    cfg, t = tr.cfg, tr.cfg.trainer
    flops = training_flops_per_token(tr.model_cfg, t.seq_len)
    peak, peak_src = peak_flops_per_device(tr.device, tr.amp_dtype or torch.float32,
                                           t.peak_tflops)
    total, active = param_counts(tr.model_cfg)  # analytic: shards would undercount
    n_moe = sum(moe_layer_pattern(cfg.model))  # the whole model's, not this PP stage's
    # null experts: how many real experts a token runs is decided by training
    bound = (" at top_k real experts, an upper bound (the logged MFU counts the real "
             "experts picked)") if tr.model_cfg.moe.num_null_experts else ""
    tr.logger.info(
        f"model {cfg.model.name}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M "
        f"active), {n_moe} MoE layers{_experts_note(tr.model_cfg)}; "
        f"{flops / 1e6:.1f} MFLOP/token{bound}; "
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_src}); device {tr.device}")
    if cfg.model.arch in MODALITY_ARCHS:
        per = flops_per_token_by_modality(tr.model_cfg, t.seq_len)
        tr.logger.info("MFLOP/token per modality: " + ", ".join(
            f"{k} {v / 1e6:.2f}" for k, v in per.items()))
    if tr.world_size > 1:
        tr.logger.info(tr.dims.describe())
    if tr.pm.dp_note:
        tr.logger.info(tr.pm.dp_note)
    if tr.pm.pp_report:
        tr.logger.info(tr.pm.pp_report)
    for note in filter(None, tr.resume.notes):
        tr.logger.info(note)
    if tr.resume_from is not None:
        tr.logger.info(f"resumed from {tr.resume_from} at step {tr.state.step} "
                         f"({tr.state.consumed_samples} samples consumed)")
    return Throughput(flops_per_token=flops, peak_flops=peak, world_size=tr.world_size,
                      peak_is_lower_bound=peak_src.startswith("measured"))
