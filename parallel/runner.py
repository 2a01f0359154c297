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

Two-batch overlap (``parallel.two_batch_overlap``): :class:`TwoBatchLoop` takes the
micro-batches in pairs and runs each pair's forwards in lockstep on one thread
(models/steps.py), inside one model call (``Transformer.forward(..., paired=...)``):
while one micro-batch's expert all-to-all is in flight the other's attention, router
and experts run. Its backward is one ``backward`` of the pair's summed
objective: autograd runs the nodes in reverse creation order, so the two backwards
interleave the same way and each reverse exchange travels during the other micro-batch's
backward. Two micro-batches' activations are live at once (the dry-run estimate counts
them); halve ``trainer.micro_batch_size`` to keep the memory of the plain loop.

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

__all__ = ["MicroBatchLoop", "StepRunner", "TwoBatchLoop", "check_two_batch_overlap"]

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


class TwoBatchLoop(MicroBatchLoop):
    """Micro-batches in pairs (an odd last one alone): each pair's forwards interleaved
    at the MoE layers' exchanges, one backward for the pair (module docstring)."""

    def run(self, micro_batches: list[Batch], normaliser: torch.Tensor, train: bool
            ) -> torch.Tensor:
        sums = torch.zeros_like(normaliser)
        n = len(micro_batches)
        for first in range(0, n, 2):
            pair = micro_batches[first:first + 2]
            last = first + len(pair) - 1
            if train and self.before_micro_batch is not None:
                self.before_micro_batch(last, last == n - 1)
            with self.autocast():
                kwargs = [model_kwargs(mb, self.arch) for mb in pair]
                if len(pair) == 2:  # one model call for the pair (hooks on it run once)
                    outs = self.model(pair[0]["tokens"], **kwargs[0],
                                      paired={"tokens_BT": pair[1]["tokens"], **kwargs[1]})
                else:
                    outs = [self.model(pair[0]["tokens"], **kwargs[0])]
            pair_sums = [self.objective.sums(out, mb) for out, mb in zip(outs, pair)]
            if train:
                values = [self.objective.value(s, normaliser) for s in pair_sums]
                (values[0] + values[1] if len(values) == 2 else values[0]).backward()
                self.moe.count_dispatch()
            for mb_sums in pair_sums:
                sums += mb_sums.detach()
        return sums


def check_two_batch_overlap(pcfg: Any, num_micro: int) -> None:
    """One-line ``ValueError`` where ``parallel.two_batch_overlap`` cannot run: it needs
    an expert all-to-all in flight (EP > 1, the all-to-all dispatcher, ``overlap``), two
    micro-batches per step (an even number under PP, whose micro-batches are then pairs,
    each stage running its halves paired) over steppable blocks (activation checkpointing
    recomputes inside them; MoT/MoM blocks step at their MoE FFN, Mamba blocks run
    whole). FSDP then shards, and
    ``parallel.compile`` compiles, the blocks' whole-call submodules instead of the
    blocks (parallel/data_parallel.py, parallel/parallelize.py)."""
    if not getattr(pcfg, "two_batch_overlap", False):
        return
    why = []
    if pcfg.ep <= 1 or pcfg.dispatcher != "alltoall" or not pcfg.overlap:
        why.append("an expert all-to-all in flight (parallel.ep > 1, "
                   "parallel.dispatcher=alltoall, parallel.overlap=true)")
    if num_micro < 2:
        why.append(f"at least 2 micro-batches per step (this layout has {num_micro}: "
                   "raise trainer.global_batch_size or lower trainer.micro_batch_size)")
    if pcfg.pp > 1 and num_micro % 2:
        why.append(f"an even number of micro-batches per step under pipeline parallelism "
                   f"(this layout has {num_micro}; the pipeline's micro-batches are pairs)")
    if why:
        raise ValueError("parallel.two_batch_overlap=true needs " + "; ".join(why))
