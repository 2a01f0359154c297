"""The activation-memory model (parallel/memory.py) against measurement.

Measured: the bytes autograd saves for backward during one micro-batch's forward and
loss, counted with ``torch.autograd.graph.saved_tensors_hooks`` as unique storages (a view
shares its base's storage; DTensors count their local tensor), leaving out parameters and
buffers (weights saved by a matmul, the RoPE tables). Under activation checkpointing the
hooks see only what lives outside the blocks, so each checkpointed block's input (held by
the checkpoint) is added. Estimated: ``activation_bytes`` of the same built model. They
must agree within 10% on every layout: single process (dense, MoE, capacity, MoT, Mamba,
AC), TP+SP, CP, EP (2 ranks) and each PP stage.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from models.inputs import model_kwargs
from parallel.dims import ParallelDims
from parallel.memory import activation_bytes
from parallel.parallelize import parallelize
from tests.distributed_utils import spawn
from tests.helpers import compose_config
from trainer.config import moe_layer_pattern, validate

pytestmark = pytest.mark.timeout(300)

TOL = 0.10
B, T = 2, 64
COMMON = [f"trainer.seq_len={T}", f"trainer.micro_batch_size={B}",
          f"trainer.global_batch_size={4 * B}", "trainer.precision=fp32",
          "parallel.dp_engine=ddp"]

SINGLE = {
    "dense": ["model=dense_tiny"],
    "moe": ["model=moe_tiny"],
    "moe_capacity": ["model=moe_tiny", "model.moe.capacity_factor=1.5",
                     "model.moe.pad_to_capacity=true"],
    "moe_ac": ["model=moe_tiny", "parallel.activation_checkpointing=true"],
    "mot": ["model=mot_tiny"],
    "mom": ["model=mom_tiny"],
    "jamba": ["model=jamba_tiny"],
}
TWO_RANKS = {
    "tp2_sp": ["model=moe_tiny", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2": ["model=dense_tiny", "parallel.tp=2"],
    "cp2": ["model=moe_tiny", "parallel.cp=2"],
    "ep2": ["model=moe_tiny", "parallel.ep=2"],
    "pp2": ["model=moe_tiny", "parallel.pp=2"],
    "mot_tp2_sp": ["model=mot_tiny", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "mom_tp2": ["model=mom_tiny", "parallel.tp=2"],
}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s data: a DTensor's local shard, an async
    collective's result (functional collectives wrap it)."""
    while True:
        if isinstance(t, DTensor):
            t = t._local_tensor
        elif type(t) is not torch.Tensor and hasattr(t, "elem"):
            t = t.elem
        else:
            return t


def measure(rank: int, world: int, overrides: list[str]) -> tuple[int, int]:
    """(measured, estimated) saved bytes of one micro-batch on this rank."""
    cfg = compose_config([*COMMON, *overrides])
    validate(cfg, world)
    mc = OmegaConf.to_object(cfg.model)
    dims = ParallelDims.from_config(cfg.parallel, world, rank=rank)
    if world > 1:
        dims.build_meshes("cpu")
    num_micro = cfg.trainer.global_batch_size // (B * dims.dp_size)
    pm = parallelize(mc, cfg.parallel, dims, device=torch.device("cpu"), seed=1,
                     seq_len=T, num_micro=num_micro, moe_pattern=moe_layer_pattern(cfg.model))
    model = pm.model
    estimate = sum(activation_bytes(model, mc, cfg.parallel, cfg.trainer, dims, 4)[0].values())

    g = torch.Generator().manual_seed(0)  # the same micro-batch on every rank
    tokens = torch.randint(0, mc.vocab_size, (B, T), generator=g)
    mb = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
          "loss_mask": torch.ones(B, T), "position_ids": torch.arange(T).expand(B, T)}
    if mc.arch in ("mot", "mom"):
        mb["modality_ids"] = torch.randint(0, len(mc.mot.modalities), (B, T), generator=g)
    mb = pm.shard_batch(mb)

    skip = {_local(t).untyped_storage().data_ptr()
            for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = _local(t).untyped_storage()
        if st.data_ptr() not in skip and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    checkpointed = []
    if cfg.parallel.activation_checkpointing:
        for block in model.layers.values():
            block.register_forward_pre_hook(lambda m, args: checkpointed.append(args[0]))
    first = getattr(model, "tok_embeddings", None) is not None
    last = getattr(model, "norm", None) is not None
    inp = mb["tokens"] if first else torch.randn(
        B, mb["tokens"].shape[1], mc.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inp, **model_kwargs(mb, mc.arch))
        if last:
            pm.loss_sum(out, mb["labels"], mb["loss_mask"]).sum()
    for x in checkpointed:
        st = _local(x).untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values()), estimate


def _single(_rank: int, _world: int) -> dict[str, tuple[int, int]]:
    return {name: measure(0, 1, ov) for name, ov in SINGLE.items()}


def _two(rank: int, world: int) -> dict[str, tuple[int, int]]:
    return {name: measure(rank, world, ov) for name, ov in TWO_RANKS.items()}


def _check(results: dict[str, tuple[int, int]], label: str) -> list[str]:
    bad = []
    for name, (got, est) in results.items():
        if abs(est - got) > TOL * got:
            bad.append(f"{label} {name}: estimated {est} B, measured {got} B "
                       f"({(est - got) / got:+.1%})")
    return bad


def test_activation_estimate_single_process():
    results = spawn(_single, 1)[0]
    bad = _check(results, "1 rank")
    assert not bad, "\n".join(bad)


@pytest.mark.distributed
def test_activation_estimate_two_ranks():
    results = spawn(_two, 2)
    bad = [e for r, res in enumerate(results) for e in _check(res, f"rank {r}")]
    assert not bad, "\n".join(bad)
