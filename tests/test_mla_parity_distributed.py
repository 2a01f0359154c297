"""Multi-head latent attention (models/mla.py) keeps the central promise: N gloo processes
equal one process (losses, grad norm, final parameters) under TP (heads split, replicated
down projections), TP+SP with FSDP, CP (head/tail chunks, all-gathered K/V) and PP, all
with packed-document masks, through ``trainer.train.run`` in-process (tests/inproc.py), as in
tests/test_parity_distributed.py, on the mla_tiny preset (MLA + MoE)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import read_metrics
from tests.inproc import LazyRuns, selected_ids
from tests.test_parity_distributed import COMMON as PARITY_COMMON
from tests.test_parity_distributed import (
    LOSS_RTOL,
    PARAM_ATOL,
    PARAM_RTOL,
    STEPS,
    _final_model,
    _report,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# One reference for every layout (one single-process run): packed documents (per-document
# RoPE positions, document masks) and the aux-loss-free expert bias.
SETTINGS = {
    "mla_documents": ["model=mla_tiny", "data.document_mask=true", "model.moe.expert_bias=true"],
}
LAYOUTS = [
    ("mla_tp2", 2, "mla_documents", ["parallel.tp=2"]),
    ("mla_tp2_sp_fsdp", 2, "mla_documents", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                             "parallel.dp_engine=fsdp"]),
    ("mla_cp2", 2, "mla_documents", ["parallel.cp=2"]),
    ("mla_pp2", 2, "mla_documents", ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
]
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


@pytest.fixture(scope="module")
def mla_references(single_run):
    refs = {}
    for name, extra in SETTINGS.items():
        run_dir = single_run([*PARITY_COMMON, *extra])
        refs[name] = (read_metrics(run_dir), _final_model(run_dir))
    return refs


@pytest.fixture(scope="module")
def mla_layout_runs(request, tmp_path_factory, moefold_cache):
    """``mla_layout_runs(name) -> run_dir``; the selected layouts train together."""
    jobs = {name: (nproc, [*PARITY_COMMON, *SETTINGS[setting], *extra])
            for name, nproc, setting, extra in LAYOUTS}
    return LazyRuns(tmp_path_factory.mktemp("mla_layouts"), moefold_cache, jobs,
                    selected_ids(request, test_mla_layout_matches_single_process))


@pytest.mark.parametrize("name, nproc, setting, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_mla_layout_matches_single_process(name, nproc, setting, extra, mla_references,
                                           mla_layout_runs):
    run_dir = mla_layout_runs(name)
    ref_metrics, ref_model = mla_references[setting]
    got = read_metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        for key in KEYS:
            assert got[step][key] == pytest.approx(ref_metrics[step][key], rel=LOSS_RTOL), (
                name, step, key)
    model = _final_model(run_dir)
    assert set(model) == set(ref_model)
    assert any(".attention.kv_b_proj." in k for k in model)  # really MLA
    _report(name, nproc, setting, ref_metrics, got, ref_model, model)
    for key, ref in ref_model.items():
        torch.testing.assert_close(model[key], ref, atol=PARAM_ATOL, rtol=PARAM_RTOL,
                                   msg=lambda m, k=key: f"{name}: {k}: {m}")
