"""Step runners: one pass of the model over a step's micro-batches, whatever the layout.

``StepRunner.run(micro_batches, normaliser, train) -> sums``: forward (and, when
``train``, backward) every micro-batch of this rank and return the objective's sums
``[G + 1]`` (see trainer/objective.py), already summed over the pipeline stages — so the
caller only adds up the ranks that hold different tokens (``dp_cp``). ``normaliser`` is
the step's global counts, by which every micro-batch's backward is scaled, so the
gradients are those of the global objective however the batch is split.

Two implementations: :class:`MicroBatchLoop` (no pipeline: a plain loop, gradient
accumulation by autograd) and ``parallel.pipeline.PipelineRunner`` (a
``torch.distributed.pipelining`` schedule). The trainer never knows which one it has.

Gradient-sync seam: :class:`MicroBatchLoop` calls ``before_micro_batch(index, is_last)``
(``DataParallel.before_micro_batch``) before each training micro-batch, so the DP engine
reduces only in the step's last backward: FSDP reduce-scatters there
(``parallel.fsdp_grad_sync=last``), the ``ddp`` engine launches its buckets during it
(``parallel.overlap``). ``PipelineRunner`` does not (the schedule owns the backward
order): the pipeline stage defers FSDP's reduction itself, and ``ddp`` reduces after the
schedule, as without overlap.

The ``objective`` they take is duck-typed: ``sums(model_output, micro_batch) -> [G + 1]``
and ``value(sums, normaliser) -> scalar`` (the trainer's ``Objective``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from models.inputs import model_kwargs
from parallel.moe_stats import MoEStats

__all__ = ["MicroBatchLoop", "StepRunner"]

Batch = dict[str, torch.Tensor]


class StepRunner(Protocol):
    def run(self, micro_batches: list[Batch], normaliser: torch.Tensor, train: bool
            ) -> torch.Tensor: ...


class MicroBatchLoop:
    """Forward + backward one micro-batch at a time (no pipeline parallelism)."""

    def __init__(self, model: nn.Module, objective: Any, arch: str,
                 autocast: Callable[[], AbstractContextManager], moe: MoEStats,
                 before_micro_batch: Callable[[int, bool], None] | None = None):
        """``before_micro_batch(index, is_last)``: called before each training
        micro-batch (the DP engine defers its gradient reduction to the last one)."""
        self.model, self.objective, self.arch = model, objective, arch
        self.autocast, self.moe = autocast, moe
        self.before_micro_batch = before_micro_batch

    def run(self, micro_batches: list[Batch], normaliser: torch.Tensor, train: bool
            ) -> torch.Tensor:
        sums = torch.zeros_like(normaliser)
        for i, mb in enumerate(micro_batches):
            if train and self.before_micro_batch is not None:
                self.before_micro_batch(i, i == len(micro_batches) - 1)
            with self.autocast():
                out = self.model(mb["tokens"], **model_kwargs(mb, self.arch))
            mb_sums = self.objective.sums(out, mb)
            if train:
                self.objective.value(mb_sums, normaliser).backward()
                self.moe.count_dispatch()
            sums += mb_sums.detach()
        return sums
