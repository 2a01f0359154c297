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
from parallel.runner import MicroBatchLoop, StepRunner, TwoBatchLoop
from parallel.sharded_init import materialize_and_init
from parallel.tensor_parallel import (
    apply_tensor_parallel,
    grads_like_params,
    tp_cross_entropy_sum,
)

__all__ = ["ParallelModel", "choose_dp_engine", "parallelize", "rank_memory_bytes"]


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
    dp_note: str = ""  # parallel.dp_engine=auto: what it chose and why (one line)
    two_batch_overlap: bool = False  # parallel.two_batch_overlap (parallel/runner.py)

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
            loop = TwoBatchLoop if self.two_batch_overlap else MicroBatchLoop
            return loop(self.model, objective, self.arch, autocast, self.moe,
                        before_micro_batch=self.dp.before_micro_batch)
        pairs = 2 if self.two_batch_overlap else 1  # a pipeline micro-batch is a pair
        return PipelineRunner(self.model, self.chunks, self.pp_split,
                              schedule=self.pp_schedule, n_microbatches=self.num_micro // pairs,
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
        pairs = 2 if getattr(pcfg, "two_batch_overlap", False) else 1
        report = pipeline_report(model, split, pcfg.pp_schedule, num_micro // pairs,
                                 pairs=pairs == 2)
        model = stage_module(model, split)
    if dims.ep * dims.etp > 1:
        apply_expert_parallel(model, dims, pcfg.dispatcher, placement=placement)
        set_dispatch_overlap(model, pcfg.overlap)
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh("tp"), sequence_parallel=pcfg.sequence_parallel,
                              src_data_rank=None)
    if dims.cp > 1:
        apply_context_parallel(model, dims, seq_len)
    two_batch = bool(getattr(pcfg, "two_batch_overlap", False))
    if getattr(pcfg, "compile", False):  # before AC and DP: their hooks stay eager
        compile_blocks(model, device, getattr(pcfg, "compile_backend", "inductor"),
                       stepped=two_batch)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model, stepped=two_batch)
    chunks = [model]
    if split is not None:  # after AC: the chunks must hold the wrapped blocks
        chunks = stage_chunks(model, split)
        if two_batch:  # the pipeline's micro-batches are pairs, run paired in each stage
            for chunk in {id(c): c for c in [model, *chunks]}.values():
                chunk.pair_halves = True
    engine, dp_note = pcfg.dp_engine, ""
    if engine == "auto":
        engine, dp_note = choose_dp_engine(model, dims, device,
                                           float(getattr(pcfg, "gpu_memory_gib", 0) or 0),
                                           collective=materialize)
    dp = DataParallel(model, dims, engine, roots=chunks, param_dtype=amp_dtype,
                      grad_sync=pcfg.fsdp_grad_sync, overlap=pcfg.overlap,
                      bucket_mb=pcfg.ddp_bucket_mb,
                      fsdp_prefetch=int(getattr(pcfg, "fsdp_prefetch", 1)),
                      two_batch=two_batch)
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
                         pp_report=report, dp_note=dp_note, two_batch_overlap=two_batch)


def compile_blocks(model: nn.Module, device: torch.device, backend: str = "inductor",
                   stepped: bool = False) -> None:
    """Regional compilation (``parallel.compile``): each block of ``model.layers`` gets its
    ``forward`` replaced by ``torch.compile(forward)``, after TP/EP/CP have rewritten it.
    Only the block's own computation is compiled: the module call around it, where
    activation checkpointing, FSDP and pipelining hook in, stays eager, and the module
    tree, parameter names and checkpoints are unchanged. Graph breaks (data-dependent
    dispatch under EP, host syncs) fall back to eager for that part; the blocks share
    their compiled code (same code object, recompiled only on new guards).

    ``stepped`` (the two-batch overlap): the schedule splits a block's call at its MoE
    exchanges, so each block's whole-call submodules are compiled instead
    (``TransformerBlock.stepped_units``: the attention, the router, the shared experts
    or the dense FFN); the MoE layer's dispatch, experts and combine stay eager, as
    they are graph breaks in a compiled block anyway."""
    if device.type != "cuda" and hasattr(torch, "_grouped_mm"):
        # its fake-tensor kernel accepts bf16 only (torch 2.13), the CPU kernel fp32 too:
        # the grouped GEMM runs eagerly between two compiled graphs
        torch._dynamo.disallow_in_graph(torch._grouped_mm)
    for block in model.layers.values():
        for unit in block.stepped_units() if stepped and hasattr(block, "stepped_units") \
                else [block]:
            unit.forward = torch.compile(unit.forward, backend=backend)


# parallel.dp_engine=auto: replicate (ddp) while params + grads + AdamW state of an
# unsharded replica take at most this share of a rank's memory; shard (fsdp) above it.
# The rest is left to activations and buffers, which neither engine shrinks.
DDP_STATE_SHARE = 0.25
STATE_BYTES_PER_PARAM = 16  # fp32 params 4 + grads 4 + AdamW moments 8 (bf16: 2+2+12)


def rank_memory_bytes(device: torch.device, gpu_memory_gib: float = 0.0) -> int:
    """Memory one rank may use: ``parallel.gpu_memory_gib`` when set, else the GPU's, else
    the host's physical memory divided among the ranks of this node."""
    import os

    if gpu_memory_gib > 0:
        return int(gpu_memory_gib * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)


def choose_dp_engine(model: nn.Module, dims: ParallelDims, device: torch.device,
                     gpu_memory_gib: float = 0.0, collective: bool = True) -> tuple[str, str]:
    """``parallel.dp_engine=auto``: ``ddp`` when every rank's unsharded training state
    (``STATE_BYTES_PER_PARAM`` per local parameter after TP/EP/PP) fits in
    ``DDP_STATE_SHARE`` of its memory, else ``fsdp``; with nothing to reduce over
    (dp*cp == edp == 1) ``ddp`` (both are no-ops). Ranks agree: the largest state and the
    smallest memory over the world decide (one all-reduce when ``collective``)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if max(dims.dp * dims.cp, dims.edp) == 1:
        return "ddp", "parallel.dp_engine=auto: ddp (no data-parallel replicas)"
    seen, numel = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            numel += (p.to_local() if isinstance(p, DTensor) else p).numel()
    state, memory = numel * STATE_BYTES_PER_PARAM, rank_memory_bytes(device, gpu_memory_gib)
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.tensor([float(state), -float(memory)], device=device, dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        state, memory = int(both[0].item()), int(-both[1].item())
    engine = "ddp" if state <= DDP_STATE_SHARE * memory else "fsdp"
    return engine, (f"parallel.dp_engine=auto: {engine} (unsharded params+grads+AdamW "
                    f"{state / 2**30:.3g} GiB per rank {'<=' if engine == 'ddp' else '>'} "
                    f"{DDP_STATE_SHARE:g} x {memory / 2**30:.3g} GiB)")
