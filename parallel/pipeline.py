"""Pipeline parallelism on ``torch.distributed.pipelining`` (no hand-written schedules).

The model is cut by layers into ``pp`` stages; stage ``s`` runs on pipeline rank ``s``.
A stage is the plain ``Transformer`` with the layers it does not own deleted (the
``layers`` ModuleDict keeps the global keys, so parameter names — and therefore
checkpoints, seeded initialisation and the expert-load plots — are the same as in the
unsplit model), ``tok_embeddings`` only on the first stage and ``norm`` + ``output`` only
on the last. TP, EP, activation checkpointing and the DP engine are applied to the stage
afterwards, exactly as to a whole model.

Loss: the last stage's ``loss_fn`` returns ``sum of token losses / tokens of the global
batch`` per micro-batch and the schedule does not rescale (``scale_grads=False``), the
same objective as without PP. MoE aux losses need nothing special: they enter the graph
through an identity autograd function on each MoE layer's output (models/moe.py), so the
backward of every stage — whatever order the schedule runs it in — delivers their
gradients to that stage's routers; their logged values are summed over the pipeline
ranks by the trainer.

Version 1 limits: one stage per rank (``parallel.vpp=1``) with the GPipe and 1F1B
schedules; tied embeddings are refused (the first and last stage would share a weight).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

__all__ = ["PipelineSplit", "bubble_fraction", "build_schedule", "split_layers", "stage_module"]

SCHEDULES = ("gpipe", "1f1b")


def split_layers(num_layers: int, stages: int, split: Optional[list[int]] = None) -> list[range]:
    """Layer ids of every stage. ``split``: layers per stage (must sum to ``num_layers``);
    default: as even as possible, the remainder going to the middle stages so the first
    (embedding) and last (head + loss) stages are never the heaviest."""
    if split:
        if len(split) != stages or sum(split) != num_layers or min(split) < 1:
            raise ValueError(
                f"parallel.pp_layers={list(split)} must list {stages} positive layer counts "
                f"summing to model.num_layers={num_layers}"
            )
        counts = list(split)
    else:
        if num_layers < stages:
            raise ValueError(f"model.num_layers={num_layers} is fewer than parallel.pp={stages}")
        base, extra = divmod(num_layers, stages)
        counts = [base] * stages
        middle = list(range(1, stages - 1)) or list(range(stages))
        order = middle + [s for s in range(stages) if s not in middle]
        for s in order[:extra]:
            counts[s] += 1
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


class PipelineSplit:
    """Where this rank's stage sits in the pipeline."""

    def __init__(self, num_layers: int, pp: int, pp_rank: int, split=None):
        self.ranges = split_layers(num_layers, pp, split)
        self.pp, self.stage = pp, pp_rank
        self.layers = self.ranges[pp_rank]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp - 1


def stage_module(model: nn.Module, split: PipelineSplit) -> nn.Module:
    """A copy of ``model`` (best built on the meta device) reduced to this stage."""
    if getattr(model, "tie_embeddings", False) and split.pp > 1:
        raise ValueError("model.tie_embeddings=true cannot be pipelined (parallel.pp > 1)")
    stage = copy.deepcopy(model)
    for key in list(stage.layers.keys()):
        if int(key) not in split.layers:
            del stage.layers[key]
    if not split.is_first:
        stage.tok_embeddings = None
    if not split.is_last:
        stage.norm = None
        stage.output = None
    return stage


def build_schedule(
    stage: nn.Module,
    split: PipelineSplit,
    *,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    group,
):
    """The ``torch.distributed.pipelining`` schedule for this rank's stage."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in classes:
        raise ValueError(
            f"parallel.pp_schedule={schedule!r} is not available yet (valid: {', '.join(classes)})"
        )
    pstage = PipelineStage(stage, split.stage, split.pp, device, group=group)
    return classes[schedule](pstage, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def bubble_fraction(schedule: str, pp: int, n_microbatches: int) -> float:
    """Idle fraction of a pipeline rank for GPipe / 1F1B with equal stage costs:
    ``(p - 1) / (m + p - 1)`` (the two differ in memory, not in bubble)."""
    return (pp - 1) / (n_microbatches + pp - 1)


def in_flight(schedule: str, pp: int, stage: int, n_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak: all of them for GPipe,
    ``pp - stage`` for 1F1B."""
    return n_microbatches if schedule == "gpipe" else min(n_microbatches, pp - stage)


def pipeline_report(model: nn.Module, split: PipelineSplit, schedule: str, m: int) -> str:
    """Start-up table: layers, parameters and estimated memory per stage, bubble fraction.
    Memory = fp32 weights + grads + two Adam moments (16 B/parameter) before TP/EP/FSDP
    sharding, plus the number of micro-batches whose activations are live at the peak."""
    rows = []
    for s, layers in enumerate(split.ranges):
        n = sum(p.numel() for k in layers for p in model.layers[str(k)].parameters())
        extra = []
        if s == 0:
            n += model.tok_embeddings.weight.numel()
            extra.append("embedding")
        if s == split.pp - 1:
            n += model.norm.weight.numel() + (model.output.weight.numel() if model.output is not None else 0)
            extra.append("head")
        rows.append(
            f"  stage {s}: layers {layers.start}-{layers.stop - 1}"
            f"{' + ' + ' + '.join(extra) if extra else ''}: {n / 1e6:.2f}M params, "
            f"~{16 * n / 2**30:.2f} GiB weights+grads+Adam, "
            f"{in_flight(schedule, split.pp, s, m)} micro-batches of activations in flight"
        )
    bubble = bubble_fraction(schedule, split.pp, m)
    head = f"pipeline: {split.pp} stages, schedule {schedule}, {m} micro-batches, bubble ~{bubble:.1%}"
    return "\n".join([head, *rows])
