"""Sharded initialisation (parallel/sharded_init.py): every layout family, built on meta,
sharded, then materialised shard by shard, must hold exactly (``torch.equal``) the slices
of the single-process model initialised from the same seed — parameters (plain, TP
DTensors, FSDP2 ``Shard``/``_StridedShard`` DTensors, EP/ETP expert slices) and buffers
(RoPE tables, expert bias, MoE statistics).

One 4-rank spawn builds every layout in turn; each rank returns its mismatches.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from models.build import build_model
from models.transformer import canonical_name
from parallel.data_parallel import is_expert_param
from parallel.dims import ParallelDims
from parallel.parallelize import parallelize
from tests.distributed_utils import spawn
from tests.helpers import compose_config
from trainer.config import moe_layer_pattern, validate

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

SEED = 1234
# (name, model preset, overrides) -- every family: TP, TP+SP, EP, ETP, PP, FSDP (plain,
# over TP: _StridedShard, over edp), ddp, CP, MoT (+MoE), Mamba (MoM, hybrid Jamba), AC.
LAYOUTS = [
    ("dp4_fsdp", "moe_tiny", ["model.moe.expert_bias=true"]),
    ("tp2xdp2_fsdp", "moe_tiny", ["parallel.tp=2"]),
    ("tp2_sp_ddp", "moe_tiny", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                "parallel.dp_engine=ddp"]),
    ("ep2xetp2", "moe_tiny", ["parallel.ep=2", "parallel.etp=2",
                              "model.moe.expert_bias=true"]),
    ("pp2xdp2_vpp2_ep2", "moe_tiny", ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2",
                                      "parallel.pp_schedule=interleaved_1f1b"]),
    ("cp2xtp2_sp", "moe_tiny", ["parallel.cp=2", "parallel.tp=2",
                                "parallel.sequence_parallel=true"]),
    ("mot_tp2xdp2_sp", "mot_tiny", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("mot_moe_ep2", "mot_moe_tiny", ["parallel.ep=2"]),
    ("mom_tp2xdp2", "mom_tiny", ["parallel.tp=2"]),
    ("jamba_pp2_ep2_ac", "jamba_tiny", ["parallel.pp=2", "parallel.ep=2",
                                        "parallel.activation_checkpointing=true"]),
]


def _expected_param(ref: torch.Tensor, name: str, module: torch.nn.Module) -> torch.Tensor:
    """The module-level value of a parameter: routed experts are this rank's EP/ETP slice."""
    if not is_expert_param(name):
        return ref
    ex = module.get_submodule(name.rsplit(".", 1)[0])
    E_l = getattr(ex, name.rsplit(".", 1)[1]).shape[0]
    ffn_dim = 1 if name.endswith("w2") else 2
    F_l = ex.w1.shape[2]
    return ref[ex.expert_offset:ex.expert_offset + E_l].narrow(ffn_dim, ex.ffn_offset, F_l)


def _check_layout(rank: int, world: int, preset: str, overrides: list[str]) -> list[str]:
    cfg = compose_config([f"model={preset}", "trainer.seq_len=32", "trainer.micro_batch_size=1",
                          "trainer.global_batch_size=16", *overrides])
    validate(cfg, world)
    mc = OmegaConf.to_object(cfg.model)
    torch.manual_seed(SEED)
    ref = build_model(mc, device="cpu")  # the 1-process model, same seed
    ref_p = dict(ref.named_parameters())
    ref_b = dict(ref.named_buffers(remove_duplicate=False))
    dims = ParallelDims.from_config(cfg.parallel, world, rank=rank)
    dims.build_meshes("cpu")
    pm = parallelize(mc, cfg.parallel, dims, device=torch.device("cpu"), seed=SEED,
                     seq_len=32, num_micro=16 // dims.dp_size, moe_pattern=moe_layer_pattern(cfg.model))
    bad = []
    local = 0
    for raw, p in pm.model.named_parameters():
        name = canonical_name(raw)
        if p.is_meta:
            bad.append(f"{name}: still on meta")
            continue
        local += (p.to_local() if isinstance(p, DTensor) else p).numel()
        got = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        want = _expected_param(ref_p[name], name, pm.model)
        if got.shape != want.shape or not torch.equal(got, want):
            bad.append(f"{name}: {tuple(got.shape)} differs from the 1-process slice "
                       f"{tuple(want.shape)}")
    for raw, b in pm.model.named_buffers(remove_duplicate=False):
        name = canonical_name(raw)
        if not torch.equal(b, ref_b[name]):
            bad.append(f"buffer {name} differs")
    if world > 1 and local >= sum(p.numel() for p in ref.parameters()):
        bad.append(f"rank holds {local} elements: not sharded")
    return bad


def _all_layouts(rank: int, world: int) -> dict[str, list[str]]:
    return {name: _check_layout(rank, world, preset, ov) for name, preset, ov in LAYOUTS}


def test_sharded_init_equals_full_init():
    results = spawn(_all_layouts, 4, timeout_s=280)
    errors = [f"rank {r} {layout}: {e}" for r, res in enumerate(results)
              for layout, errs in res.items() for e in errs]
    assert not errors, "\n".join(errors[:40])
