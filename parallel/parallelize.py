"""``parallelize``: the model of this rank, built and parallelised in one place.

Order (each step is a module of this package; the model file stays single-device):

1. build on the meta device; under PP keep this rank's stages (``pipeline.stage_module``);
2. EP/ETP: shard the routed experts, install the dispatcher (``expert_parallel``);
3. TP/SP DTensor plans (``tensor_parallel``);
4. CP: the attention core and the MoE token group (``context_parallel``);
5. activation checkpointing (wraps blocks);
6. PP chunks (one module per local stage, sharing the stage module's submodules);
7. the DP engine (FSDP2 roots = the chunks, or the bucketed all-reduce);
8. materialise only the local shards and initialise them from the seed
   (``sharded_init``) — name-keyed, so every layout initialises every parameter exactly
   as the single-process model, and no rank ever holds more than its shards plus one
   full tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from models import build_model
from models.loss import lm_loss_sum
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.context_parallel import apply_context_parallel, shard_batch
from parallel.data_parallel import DataParallel
from parallel.dims import ParallelDims
from parallel.dispatch import set_dispatch_overlap
from parallel.expert_parallel import apply_expert_parallel
from parallel.expert_placement import Placement
from parallel.moe_stats import MoEStats
from parallel.pipeline import (
    SCHEDULES,
    PipelineRunner,
    PipelineSplit,
    pipeline_report,
    stage_chunks,
    stage_module,
)
from parallel.runner import MicroBatchLoop, StepRunner
from parallel.sharded_init import materialize_and_init
from parallel.tensor_parallel import (
    apply_tensor_parallel,
    grads_like_params,
    tp_cross_entropy_sum,
)

__all__ = ["ParallelModel", "parallelize"]


@dataclass
class ParallelModel:
    """This rank's model and everything the trainer needs from the layout, behind seams
    that hide it: ``loss_sum`` (vocab-parallel under TP), ``shard_batch`` (this rank's
    part of a micro-batch under CP), ``step_runner`` (a plain micro-batch loop or a
    pipeline schedule), ``moe`` (the MoE statistics and their reductions) and ``dp``
    (gradient reduction and clipping)."""

    model: nn.Module  # this rank's (stage) module: optimizer, checkpoints, MoE layers
    chunks: list[nn.Module]  # what runs: [model], or one module per local pipeline stage
    dp: DataParallel
    dims: ParallelDims
    moe: MoEStats
    arch: str
    num_micro: int
    pp_schedule: str
    device: torch.device
    pp_split: Optional[PipelineSplit] = None
    pp_report: str = ""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
        """Per-group LM cross-entropy sums ``[G]`` (``models.loss.lm_loss_sum``); under TP
        the logits stay vocab-sharded and are never gathered."""
        if self.dims.tp > 1:
            return tp_cross_entropy_sum(logits, labels, weights)
        return lm_loss_sum(logits, labels, weights)

    def shard_batch(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch: under CP its positions of every sequence
        (parallel/context_parallel.py), else the micro-batch itself."""
        if self.dims.cp == 1:
            return mb
        return shard_batch(mb, self.dims.cp, self.dims.coords()["cp"])

    def step_runner(self, objective: Any, autocast: Callable[[], AbstractContextManager]
                    ) -> StepRunner:
        """The runner of one step's micro-batches for this layout (parallel/runner.py)."""
        if self.pp_split is None:
            return MicroBatchLoop(self.model, objective, self.arch, autocast, self.moe,
                                  before_micro_batch=self.dp.before_micro_batch)
        return PipelineRunner(self.model, self.chunks, self.pp_split,
                              schedule=self.pp_schedule, n_microbatches=self.num_micro,
                              objective=objective, arch=self.arch, autocast=autocast,
                              moe=self.moe, dims=self.dims, device=self.device)


def parallelize(
    model_cfg: Any, pcfg: Any, dims: ParallelDims, *, device: torch.device, seed: int,
    seq_len: int, num_micro: int, moe_pattern: list[bool], materialize: bool = True,
    placement: Optional[Placement] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> ParallelModel:
    """This rank's model: every layout transform is applied on the meta device, then only
    the local shards are allocated and initialised (parallel/sharded_init.py).
    ``materialize=False`` leaves the model on meta (the dry run: trainer/dry_run.py).
    ``placement``: which experts each EP rank holds (parallel/expert_placement.py).
    ``amp_dtype``: the compute dtype when not fp32 (FSDP's bf16 all-gather policy)."""
    model = build_model(model_cfg, device="meta")
    split, report = None, ""
    if dims.pp > 1:
        split = PipelineSplit(
            model_cfg.num_layers, dims.pp, dims.pp_rank,
            list(pcfg.pp_layers) if pcfg.pp_layers else None,
            vpp=pcfg.vpp, style=SCHEDULES[pcfg.pp_schedule].style,
        )
        report = pipeline_report(model, split, pcfg.pp_schedule, num_micro)
        model = stage_module(model, split)
    if dims.ep * dims.etp > 1:
        apply_expert_parallel(model, dims, pcfg.dispatcher, placement=placement)
        set_dispatch_overlap(model, pcfg.overlap)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh("tp"), sequence_parallel=pcfg.sequence_parallel,
                              src_data_rank=None)
    if dims.cp > 1:
        apply_context_parallel(model, dims, seq_len)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    chunks = [model]
    if split is not None:  # after AC: the chunks must hold the wrapped blocks
        chunks = stage_chunks(model, split)
    dp = DataParallel(model, dims, pcfg.dp_engine, roots=chunks, param_dtype=amp_dtype,
                      grad_sync=pcfg.fsdp_grad_sync, overlap=pcfg.overlap,
                      bucket_mb=pcfg.ddp_bucket_mb)
    if materialize:
        materialize_and_init(model, chunks, device, seed)
        if model_cfg.init_from or model_cfg.moe.upcycle_from:  # docs/interop.md
            from parallel.hf_load import init_from_sources
            init_from_sources(model, model_cfg, seed)
        if dims.tp > 1:  # to_empty replaced the parameters and dropped their hooks
            grads_like_params(model)
        dp.refresh_params()
    moe = MoEStats(model, dims, moe_pattern, model_cfg.moe.num_experts, num_micro, device,
                   num_null_experts=model_cfg.moe.num_null_experts)
    return ParallelModel(model=model, chunks=chunks, dp=dp, dims=dims, moe=moe,
                         arch=model_cfg.arch, num_micro=num_micro,
                         pp_schedule=pcfg.pp_schedule, device=device, pp_split=split,
                         pp_report=report)
