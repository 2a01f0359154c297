"""DCP resharding: a checkpoint written under one layout resumes under another and
continues with the losses of the uninterrupted single-process run."""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics, run_cli
from tests.test_parity_distributed import COMMON, LOSS_RTOL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT = 6, 3
ARGS = [
    *COMMON,
    f"trainer.max_steps={STEPS}",
    f"checkpoint.every={SAVE_AT}",
    "checkpoint.keep_last=0",
    "model.moe.expert_bias=true",
]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize(
    "save_layout, resume_layout",
    [
        ((4, ["parallel.ep=4"]), (1, [])),  # EP4 (edp 1) -> one process
        ((4, ["parallel.ep=4"]), (4, ["parallel.ep=2"])),  # EP4 -> EP2 x EDP2 (FSDP experts)
        ((2, ["parallel.dp_engine=fsdp"]), (2, ["parallel.ep=2", "parallel.dp_engine=ddp"])),
        ((2, ["parallel.tp=2", "parallel.sequence_parallel=true"]), (1, [])),  # TP2 -> TP1
        ((1, []), (4, ["parallel.tp=2", "parallel.dp_engine=ddp"])),  # 1 process -> TP2 x DP2
    ],
    ids=[
        "ep4_to_single",
        "ep4_to_ep2xedp2",
        "dp2fsdp_to_ep2ddp",
        "tp2sp_to_single",
        "single_to_tp2xdp2",
    ],
)
def test_checkpoint_resumes_under_another_layout(
    save_layout, resume_layout, tmp_path, moefold_cache
):
    ref_dir, save_dir, resume_dir = tmp_path / "ref", tmp_path / "save", tmp_path / "resume"
    _ok(run_cli([*ARGS, f"run_dir={ref_dir}"], cache_dir=moefold_cache))
    n, extra = save_layout
    _ok(
        run_cli(
            [*ARGS, f"run_dir={save_dir}", f"trainer.stop_after_steps={SAVE_AT}", *extra],
            cache_dir=moefold_cache,
            nproc=n,
        )
    )
    ckpt = save_dir / "checkpoints" / f"step_{SAVE_AT:07d}"
    assert ckpt.is_dir()
    n, extra = resume_layout
    proc = run_cli(
        [*ARGS, f"run_dir={resume_dir}", f"checkpoint.resume={ckpt}", *extra],
        cache_dir=moefold_cache,
        nproc=n,
    )
    _ok(proc)
    ref, got = read_metrics(ref_dir), read_metrics(resume_dir)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in got:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=LOSS_RTOL), (step, key)
