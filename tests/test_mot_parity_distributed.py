"""Mixture-of-Transformers (and Mixture-of-Mamba) keep the central promise: N gloo processes equal one process
(losses per modality, diffusion loss, grad norm, final parameters), through
``trainer.train.run`` (in-process, as in test_parity_distributed.py), on the embedded
multimodal data."""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics
from tests.parity import check_metrics, check_model, reference_runs
from tests.parity import layout_runs as parity_layouts
from tests.test_parity_distributed import COMMON as PARITY_COMMON
from tests.test_parity_distributed import STEPS, _final_model, _report

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SETTINGS = {
    # three modalities (text, image, speech), Chameleon setting, per-modality QK-norm
    "chameleon3": ["model=mot_tiny", "data=digits_speech",
                   "model.mot.modalities=[text,image,speech]", "model.mot.qk_norm=true",
                   "trainer.seq_len=128"],
    # Transfusion: diffusion head, image-bidirectional attention, packed documents
    "transfusion": ["model=mot_tiny", "data=digits_transfusion", "model.diffusion.patch_dim=4",
                    "trainer.seq_len=64"],
    # MoT+MoE: the text FFN is a routed MoE (every other layer), aux/seq-aux/z losses
    "mot_moe": ["model=mot_moe_tiny", "data=digits_chameleon", "trainer.seq_len=160",
                "model.moe.seq_aux_loss_coeff=0.001"],
    # Mixture-of-Mamba (hybrid: one MoT attention layer), packed documents reset the scan
    "mom": ["model=mom_tiny", "data=digits_chameleon", "trainer.seq_len=160",
            "model.mamba.layers=MMAM"],
    # MoM in the Transfusion setting: Mamba layers see the noisy patches causally, the
    # attention layer bidirectionally within each image
    "mom_transfusion": ["model=mom_tiny", "data=digits_transfusion",
                        "model.diffusion.patch_dim=4", "model.mamba.layers=MMAM",
                        "trainer.seq_len=64"],
    # hybrid MoM + MoE: Mamba, attention with a routed-MoE text FFN, Mamba, attention
    "mom_moe": ["model=mom_moe_tiny", "data=digits_chameleon", "trainer.seq_len=160"],
}
LAYOUTS = [
    ("dp2_fsdp", 2, "chameleon3", ["parallel.dp_engine=fsdp"]),
    ("tp2", 2, "chameleon3", ["parallel.tp=2"]),
    ("tp2_sp", 2, "chameleon3", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ("pp2", 2, "chameleon3", ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    ("cp2_transfusion", 2, "transfusion", ["parallel.cp=2"]),
    ("mot_moe_dp2_ep2", 2, "mot_moe", ["parallel.ep=2"]),
    # the two-batch overlap (FSDP over the blocks' whole-call submodules): MoT blocks step
    # at their MoE FFN, Mamba blocks run whole; with activation checkpointing (MoT blocks
    # recompute inside their steps, Mamba blocks are wrapped)
    ("mot_moe_ep2_two_batch", 2, "mot_moe", ["parallel.ep=2", "parallel.two_batch_overlap=true"]),
    ("mom_moe_ep2_two_batch_ac", 2, "mom_moe",
     ["parallel.ep=2", "parallel.two_batch_overlap=true",
      "parallel.activation_checkpointing=true"]),
    ("mom_dp2_fsdp", 2, "mom", []),
    ("mom_pp2", 2, "mom", ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    # d_inner split; SP: the norm on the rank's tokens, the sequence gathered for the mixer
    ("mom_tp2_sp", 2, "mom", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    # CP: conv halos and scan states passed between the ranks' head/tail chunks, on the
    # ranks' d_inner shards (plain TP)
    ("mom_cp2_tp2", 4, "mom", ["parallel.cp=2", "parallel.tp=2"]),
    ("mom_transfusion_cp2", 2, "mom_transfusion", ["parallel.cp=2"]),
    ("mom_moe_ep2_pp2", 4, "mom_moe", ["parallel.ep=2", "parallel.pp=2",
                                        "parallel.pp_schedule=1f1b"]),
]
COMMON = ["trainer.micro_batch_size=1", "trainer.global_batch_size=8",
          f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "logger.console=plain",
          "logger.tensorboard=false", "logger.expert_load_every=0", "optim.lr=3e-3",
          "optim.eps=1e-6", "optim.warmup_steps=2", "checkpoint.keep_last=1"]
KEYS = {"chameleon3": ("loss", "loss_text", "loss_image", "loss_speech", "grad_norm"),
        "transfusion": ("loss", "loss_text", "diffusion_loss", "grad_norm"),
        "mot_moe": ("loss", "loss_text", "loss_image", "aux_loss", "grad_norm"),
        "mom": ("loss", "loss_text", "loss_image", "grad_norm"),
        "mom_moe": ("loss", "loss_text", "loss_image", "aux_loss", "grad_norm"),
        "mom_transfusion": ("loss", "loss_text", "diffusion_loss", "grad_norm")}


@pytest.fixture(scope="module")
def mot_references(single_run):
    return reference_runs(single_run, [*PARITY_COMMON, *COMMON], SETTINGS, STEPS)


@pytest.fixture(scope="module")
def mot_layout_runs(request, tmp_path_factory, moefold_cache):
    """``mot_layout_runs(name) -> run_dir``; each world size's selected layouts train
    together (tests/inproc.py)."""
    return parity_layouts(request, tmp_path_factory.mktemp("mot_layouts"), moefold_cache,
                          LAYOUTS, [*PARITY_COMMON, *COMMON], SETTINGS,
                          test_mot_layout_matches_single_process)


@pytest.mark.parametrize("name, nproc, setting, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_mot_layout_matches_single_process(name, nproc, setting, extra, mot_references,
                                           mot_layout_runs):
    run_dir = mot_layout_runs(name)
    ref_metrics, ref_model = mot_references[setting]
    got = read_metrics(run_dir)
    check_metrics(got, ref_metrics, range(1, STEPS + 1), name, keys=KEYS[setting])
    model = _final_model(run_dir)
    _report(name, nproc, setting, ref_metrics, got, ref_model, model)
    check_model(model, ref_model, name)
