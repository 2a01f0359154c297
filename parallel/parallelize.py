"""``parallelize``: the model of this rank, built and parallelised in one place.

Order (each step is a module of this package; the model file stays single-device):

1. build on the meta device; under PP keep this rank's stages (``pipeline.stage_module``);
2. EP/ETP: shard the routed experts, install the dispatcher (``expert_parallel``);
3. materialise and initialise from the seed — name-keyed, so every layout initialises
   every parameter exactly as the single-process model;
4. TP/SP DTensor plans on the initialised weights (``tensor_parallel``);
5. CP: the attention core and the MoE token group (``context_parallel``);
6. activation checkpointing (wraps blocks);
7. PP chunks (one module per local stage, sharing the stage module's submodules);
8. the DP engine (FSDP2 roots = the chunks, or the bucketed all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from parallel.data_parallel import DataParallel
from parallel.dims import ParallelDims

__all__ = ["ParallelModel", "parallelize"]


@dataclass
class ParallelModel:
    model: nn.Module  # this rank's (stage) module: optimizer, checkpoints, MoE layers
    chunks: list[nn.Module]  # what runs: [model], or one module per local pipeline stage
    dp: DataParallel
    moe_layer_ids: list[int]  # global layer index of every MoE layer of the model
    moe_local_pos: list[int]  # position in moe_layer_ids of each local MoE layer
    pp_split: Optional[Any] = None  # pipeline.PipelineSplit under PP
    pp_report: str = ""


def parallelize(
    model_cfg: Any, pcfg: Any, dims: ParallelDims, *, device: torch.device, seed: int,
    seq_len: int, num_micro: int, moe_pattern: list[bool],
) -> ParallelModel:
    from models import build_model

    model = build_model(model_cfg, device="meta")
    split, report = None, ""
    if dims.pp > 1:
        from parallel.pipeline import SCHEDULES, PipelineSplit, pipeline_report, stage_module

        split = PipelineSplit(
            model_cfg.num_layers, dims.pp, dims.pp_rank,
            list(pcfg.pp_layers) if pcfg.pp_layers else None,
            vpp=pcfg.vpp, style=SCHEDULES[pcfg.pp_schedule].style,
        )
        report = pipeline_report(model, split, pcfg.pp_schedule, num_micro)
        model = stage_module(model, split)
    moe_layer_ids = [i for i, moe in enumerate(moe_pattern) if moe]
    moe_local_pos = [moe_layer_ids.index(int(k)) for k in model.layers if moe_pattern[int(k)]]
    if dims.ep * dims.etp > 1:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, dims, pcfg.dispatcher)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if dims.tp > 1:
        # TP shards the already-initialised full weights (identical on every rank, so no
        # broadcast). Known limit: each rank briefly holds the whole dense model.
        from parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh("tp"), sequence_parallel=pcfg.sequence_parallel,
                              src_data_rank=None)
    if dims.cp > 1:
        from parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, dims, seq_len)
    if pcfg.activation_checkpointing:
        from parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    chunks = [model]
    if split is not None:  # after AC: the chunks must hold the wrapped blocks
        from parallel.pipeline import stage_chunks

        chunks = stage_chunks(model, split)
    dp = DataParallel(model, dims, pcfg.dp_engine, roots=chunks)
    return ParallelModel(model=model, chunks=chunks, dp=dp, moe_layer_ids=moe_layer_ids,
                         moe_local_pos=moe_local_pos, pp_split=split, pp_report=report)
