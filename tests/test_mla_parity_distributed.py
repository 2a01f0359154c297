"""Multi-head latent attention (models/mla.py) keeps the central promise: N gloo processes
equal one process (losses, grad norm, final parameters) under TP (heads split, replicated
down projections), TP+SP with FSDP, CP (head/tail chunks, all-gathered K/V) and PP, all
with packed-document masks, through ``trainer.train.run`` in-process (tests/inproc.py), as in
tests/test_parity_distributed.py, on the mla_tiny preset (MLA + MoE)."""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics
from tests.parity import check_metrics, check_model, reference_runs
from tests.parity import layout_runs as parity_layouts
from tests.test_parity_distributed import COMMON as PARITY_COMMON
from tests.test_parity_distributed import STEPS, _final_model, _report

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


@pytest.fixture(scope="module")
def mla_references(single_run):
    return reference_runs(single_run, PARITY_COMMON, SETTINGS, STEPS)


@pytest.fixture(scope="module")
def mla_layout_runs(request, tmp_path_factory, moefold_cache):
    """``mla_layout_runs(name) -> run_dir``; the selected layouts train together."""
    return parity_layouts(request, tmp_path_factory.mktemp("mla_layouts"), moefold_cache,
                          LAYOUTS, PARITY_COMMON, SETTINGS, test_mla_layout_matches_single_process)


@pytest.mark.parametrize("name, nproc, setting, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_mla_layout_matches_single_process(name, nproc, setting, extra, mla_references,
                                           mla_layout_runs):
    run_dir = mla_layout_runs(name)
    ref_metrics, ref_model = mla_references[setting]
    got = read_metrics(run_dir)
    check_metrics(got, ref_metrics, range(1, STEPS + 1), name)
    model = _final_model(run_dir)
    assert any(".attention.kv_b_proj." in k for k in model)  # really MLA
    _report(name, nproc, setting, ref_metrics, got, ref_model, model)
    check_model(model, ref_model, name)
