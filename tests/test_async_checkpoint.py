"""checkpoint.async_save: periodic checkpoints written by DCP in a background thread are the
same checkpoints as synchronous ones, published atomically, and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import FAST, read_metrics
from tests.inproc import run_jobs, train_here

ARGS = [*FAST, "trainer.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=0"]


def _tensors(ckpt_dir, out) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, out)
    state = torch.load(out, weights_only=False)
    return {f"{k}.{n}": v for k in ("model",) for n, v in state[k].items()}


def test_background_checkpoints_equal_synchronous_ones_and_resume_exactly(
    tmp_path, single_run, moefold_cache
):
    sync = single_run(ARGS)
    bg = tmp_path / "bg"
    train_here([*ARGS, "checkpoint.async_save=true"], bg, moefold_cache)
    for step in (2, 4, 6):
        name = f"checkpoints/step_{step:07d}"
        assert json.loads((bg / name / "meta.json").read_text())["step"] == step
        a = _tensors(bg / name, tmp_path / f"a{step}.pt")
        b = _tensors(sync / name, tmp_path / f"b{step}.pt")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert not list((bg / "checkpoints").glob(".tmp-*"))
    ref, got = read_metrics(sync), read_metrics(bg)
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]

    # a run stopped after 3 steps published its step-2 background write; resuming from it
    # gives the uninterrupted run's losses
    cut = tmp_path / "cut"
    train_here([*ARGS, "checkpoint.async_save=true", "trainer.stop_after_steps=3"], cut,
               moefold_cache)
    assert (cut / "checkpoints/step_0000002/meta.json").is_file()
    train_here([*ARGS, "checkpoint.async_save=true"], cut, moefold_cache)
    got = read_metrics(cut)
    for s in range(3, 7):
        assert got[s]["loss"] == ref[s]["loss"], s


@pytest.mark.distributed
def test_background_checkpoints_on_two_ranks(tmp_path, single_run, moefold_cache):
    """EP2 over two gloo ranks: the background writes use their own process group; the
    published checkpoint equals the synchronous single-process one's values."""
    errors = run_jobs([("ep2_async", 2, [*ARGS, "parallel.ep=2", "checkpoint.async_save=true"],
                        tmp_path / "ep2")], moefold_cache)
    assert errors["ep2_async"] is None, errors["ep2_async"]
    ref = read_metrics(single_run(ARGS))
    got = read_metrics(tmp_path / "ep2")
    for s in range(1, 7):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
    a = _tensors(tmp_path / "ep2/checkpoints/step_0000004", tmp_path / "a.pt")
    b = _tensors(single_run(ARGS) / "checkpoints/step_0000004", tmp_path / "b.pt")
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
