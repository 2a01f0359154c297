"""The central promise: same seed and global batch => same losses and parameters,
whatever the layout. N gloo processes against one process, through ``trainer.train.run``:
the layouts of one world size run one after another in one spawned process group
(tests/inproc.py), the single-process references in the test process;
``test_torchrun_cli_equals_in_process`` checks that a ``launch/torchrun.sh`` run gives
exactly the losses of the same layout run in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, read_metrics, run_cli
from tests.inproc import LazyRuns, selected_ids
from tests.parity import LOSS_RTOL, check_metrics, check_model, final_model, reference_runs
from tests.parity import layout_runs as parity_layouts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 5
COMMON = [
    *FAST,
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=8",
    f"trainer.max_steps={STEPS}",
    "optim.lr=3e-3",
    # Adam's eps sets how far a rounding-noise gradient (~1e-9) can move a parameter;
    # at 1e-6 that is ~lr*1e-3 per step, so parameter parity measures real differences.
    "optim.eps=1e-6",
    "model.moe.aux_loss_coeff=0.01",
    "model.moe.seq_aux_loss_coeff=0.001",
    "model.moe.z_loss_coeff=0.001",
    "checkpoint.keep_last=1",
]
PLACED = Path(__file__).parent / "assets" / "placement_moe_tiny.json"
MODES = {
    "dropless": ["model.moe.expert_bias=true"],
    "capacity": ["model.moe.capacity_factor=1.0", "model.moe.drop_policy=probs"],
    # Drops ranked by position, not by probability: the zero-bubble schedule sums its
    # split weight gradients in another order, and with drop_policy=probs a rounding-level
    # difference flipped a near-tied drop on one CPU model (losses 6e-7 apart at step 4,
    # one embedding element 2.7e-5 apart after step 5; 1e-7 everywhere with position).
    "capacity_position": ["model.moe.capacity_factor=1.0", "model.moe.drop_policy=position"],
    # packed-document attention masks (and per-document RoPE positions)
    "documents": ["data.document_mask=true", "model.moe.expert_bias=true"],
}
# (name, processes, mode, extra overrides). Every feature is in at least one layout; plain
# layouts that a combined one covers (DDP, EP2, EP4, TP2, TP2+SP, PP2 1F1B alone) were
# folded into those to keep CI time down.
LAYOUTS = [
    ("dp2_fsdp", 2, "dropless", ["parallel.dp_engine=fsdp"]),
    ("ep2_allgather", 2, "dropless", ["parallel.ep=2", "parallel.dispatcher=allgather"]),
    # FSDP over dense (4 ranks) and experts (edp 2), all-gathers prefetched 2 blocks ahead
    ("dp2xep2_folded", 4, "dropless", ["parallel.ep=2", "parallel.fsdp_prefetch=2"]),
    ("ep2_capacity", 2, "capacity", ["parallel.ep=2"]),
    # ddp reducing small buckets during the last of 4 accumulated backwards (overlap is
    # on by default in every ddp layout), EP2 with the shared expert overlapping the
    # all-to-all
    ("dp2_ep2_ddp_buckets", 2, "dropless",
     ["parallel.ep=2", "parallel.dp_engine=ddp", "parallel.ddp_bucket_mb=0.05"]),
    ("dp2xep2_capacity_ddp", 4, "capacity", ["parallel.ep=2", "parallel.dp_engine=ddp"]),
    ("ep2_act_ckpt", 2, "dropless", ["parallel.ep=2", "parallel.activation_checkpointing=true"]),
    (
        "tp2xdp2_sp_ddp",
        4,
        "dropless",
        ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_engine=ddp"],
    ),
    # MoE folded under TP: attention TP ranks split each sequence at MoE entry.
    ("tp2_ep2_etp2", 4, "dropless",
     ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2", "parallel.dp_engine=ddp"]),
    ("tp2xdp2_ep4_folded", 4, "dropless",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4",
      "parallel.dp_engine=ddp"]),
    ("tp2xdp2_ep2xedp2", 4, "dropless",
     ["parallel.tp=2", "parallel.ep=2", "parallel.dp_engine=ddp"]),
    ("tp2_sp_ep2_capacity", 2, "capacity",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]),
    ("tp2_etp2_padded", 2, "capacity",
     ["parallel.tp=2", "parallel.etp=2", "model.moe.pad_to_capacity=true"]),
    ("dp4_ep2xetp2", 4, "dropless", ["parallel.ep=2", "parallel.etp=2"]),
    # experts placed by a scrambled permutation (parallel/expert_placement.py), FSDP over
    # edp2: the checkpoint still holds them in logical order
    ("dp4_ep2_placed", 4, "dropless", ["parallel.ep=2", f"parallel.expert_placement={PLACED}"]),
    # Pipeline parallelism (torch.distributed.pipelining), aux losses through every stage
    ("pp2_gpipe_uneven", 2, "capacity",
     ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_layers=[1,3]"]),
    ("pp2xdp2_ep2", 4, "dropless", ["parallel.pp=2", "parallel.ep=2"]),
    # two stages per rank: interleaved 1F1B; zero bubble (input/weight-split backward, the
    # torchtitan #2061 aux-loss case) with capacity drops, with FSDP over dp2 and EP2, and
    # with TP2+SP (FSDP experts only, under the stage roots)
    ("pp2_vpp2_interleaved", 2, "dropless",
     ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"]),
    ("pp2_vpp2_zbv_capacity", 2, "capacity_position",
     ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=zbv"]),
    ("pp2xdp2_vpp2_zbv_ep2", 4, "dropless",
     ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=zbv", "parallel.ep=2"]),
    ("pp2xtp2_sp_vpp2_izb", 4, "dropless",
     ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.vpp=2",
      "parallel.pp_schedule=interleaved_zb"]),
    # Context parallelism (head+tail chunks, all-gathered K/V): with document masks, with
    # EP2 folded over the CP ranks and capacity drops decided in sequence order, under
    # TP2+SP, and attention CP2·DP2 with experts EP4
    ("cp2_documents", 2, "documents", ["parallel.cp=2"]),
    ("cp2_ep2_capacity", 2, "capacity", ["parallel.cp=2", "parallel.ep=2"]),
    ("cp2xtp2_sp", 4, "dropless",
     ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("cp2xdp2_ep4_folded", 4, "dropless", ["parallel.cp=2", "parallel.ep=4"]),
    ("cp2xpp2_vpp2_documents", 4, "documents",
     ["parallel.cp=2", "parallel.pp=2", "parallel.vpp=2",
      "parallel.pp_schedule=interleaved_1f1b"]),
    # Two-batch overlap (parallel/runner.py): micro-batch pairs interleaved at the expert
    # all-to-all, one backward per pair; under FSDP (dense dp4 over the blocks' whole-call
    # submodules, experts EP2 x EDP2), and under TP2+SP (hooks replayed) with ddp, drops
    # and activation checkpointing (attention and experts recomputed inside the steps)
    ("dp4_ep2_fsdp_two_batch", 4, "dropless",
     ["parallel.ep=2", "parallel.dp_engine=fsdp", "parallel.two_batch_overlap=true"]),
    ("dp4_ep2_fsdp_two_batch_capacity_ac", 4, "capacity",
     ["parallel.ep=2", "parallel.dp_engine=fsdp", "parallel.two_batch_overlap=true",
      "parallel.activation_checkpointing=true", "parallel.fsdp_prefetch=2"]),
    ("tp2xdp2_sp_ep4_two_batch_capacity_ac", 4, "capacity",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4",
      "parallel.dp_engine=ddp", "parallel.two_batch_overlap=true",
      "parallel.activation_checkpointing=true"]),
    # under PP the pipeline's micro-batches are pairs, each stage runs its halves paired
    ("pp2xdp2_ep2_two_batch", 4, "dropless",
     ["parallel.pp=2", "parallel.ep=2", "parallel.two_batch_overlap=true"]),
    # ... and FSDP over TP DTensors in the blocks' whole-call groups
    ("tp2xdp2_sp_ep4_fsdp_two_batch_capacity_ac", 4, "capacity",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4",
      "parallel.dp_engine=fsdp", "parallel.two_batch_overlap=true",
      "parallel.activation_checkpointing=true"]),
    # FSDP2 over TP DTensors (dense params _StridedShard on (dp_cp, tp))
    ("tp2xdp2_sp_fsdp", 4, "dropless",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_engine=fsdp"]),
]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return final_model(run_dir, STEPS)


def _train(run_dir: Path, nproc: int, overrides: list[str], cache: Path) -> None:
    proc = run_cli([*COMMON, f"run_dir={run_dir}", *overrides], cache_dir=cache, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _report(name, nproc, mode, ref_metrics, got, ref_model, model) -> None:
    """Append the measured differences to $MOEFOLD_PARITY_REPORT (docs/parallelism.md)."""
    path = os.environ.get("MOEFOLD_PARITY_REPORT")
    if not path:
        return
    loss = max(
        abs(got[s]["loss"] - ref_metrics[s]["loss"]) / abs(ref_metrics[s]["loss"]) for s in got
    )
    param = max((model[k] - ref_model[k]).abs().max().item() for k in ref_model)
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "layout": name,
                    "nproc": nproc,
                    "mode": mode,
                    "max_rel_loss_diff": loss,
                    "max_abs_param_diff": param,
                }
            )
            + "\n"
        )


@pytest.fixture(scope="module")
def references(single_run):
    return reference_runs(single_run, COMMON, MODES, STEPS)


@pytest.fixture(scope="module")
def layout_runs(request, tmp_path_factory, moefold_cache):
    """``layout_runs(name) -> run_dir``; each world size's selected layouts train together."""
    return parity_layouts(request, tmp_path_factory.mktemp("layouts"), moefold_cache, LAYOUTS,
                          COMMON, MODES, test_layout_matches_single_process)


@pytest.mark.parametrize("name, nproc, mode, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_single_process(name, nproc, mode, extra, references, layout_runs):
    run_dir = layout_runs(name)
    ref_metrics, ref_model = references[mode]
    got = read_metrics(run_dir)
    check_metrics(got, ref_metrics, range(1, STEPS + 1), name)
    if mode.startswith("capacity"):
        assert got[STEPS]["dropped_frac"] == pytest.approx(ref_metrics[STEPS]["dropped_frac"])
        assert ref_metrics[STEPS]["dropped_frac"] > 0  # the mode really drops tokens
    model = _final_model(run_dir)
    _report(name, nproc, mode, ref_metrics, got, ref_model, model)
    check_model(model, ref_model, name)


def test_torchrun_cli_equals_in_process(layout_runs, tmp_path, moefold_cache):
    """The user-facing launcher (launch/torchrun.sh, python -m trainer.train) trains a
    layout to exactly the metrics the in-process harness above gets for it."""
    name, nproc, mode, extra = next(x for x in LAYOUTS if x[0] == "ep2_allgather")
    _train(tmp_path, nproc, [*MODES[mode], *extra], moefold_cache)
    cli, here = read_metrics(tmp_path), read_metrics(layout_runs(name))
    assert sorted(cli) == sorted(here) == list(range(1, STEPS + 1))
    for step in cli:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "dropped_frac"):
            assert cli[step][key] == here[step][key], (step, key)
    model, ref = _final_model(tmp_path), _final_model(layout_runs(name))
    assert set(model) == set(ref)
    for key in ref:
        assert torch.equal(model[key], ref[key]), key


VALIDATION_SCHEDULES = ["interleaved_1f1b", "zbv"]
VALIDATION = ["trainer.max_steps=3", "trainer.eval_every=2", "trainer.eval_iters=2",
              *MODES["dropless"]]


@pytest.fixture(scope="module")
def validation_runs(request, tmp_path_factory, moefold_cache):
    jobs = {schedule: (2, [*COMMON, *VALIDATION, "parallel.pp=2", "parallel.vpp=2",
                           f"parallel.pp_schedule={schedule}"])
            for schedule in VALIDATION_SCHEDULES}
    return LazyRuns(tmp_path_factory.mktemp("validation"), moefold_cache, jobs,
                    selected_ids(request, test_pipeline_validation_matches_single_process))


@pytest.mark.parametrize("schedule", VALIDATION_SCHEDULES)
def test_pipeline_validation_matches_single_process(schedule, single_run, validation_runs):
    """Validation between training steps under PP: the validation loss, and the training
    steps after it, equal one process. (torch re-runs its shape inference after switching
    from eval() back to step(); the zero-bubble schedules cannot eval() at all.)"""
    ref = read_metrics(single_run([*COMMON, *VALIDATION]))
    got = read_metrics(validation_runs(schedule))
    assert sorted(got) == [1, 2, 3] and "val_loss" in got[2] and "val_loss" in got[3]
    for step in got:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss"):
            if key in ref[step]:
                assert got[step][key] == pytest.approx(ref[step][key], rel=LOSS_RTOL), (
                    schedule, step, key)
