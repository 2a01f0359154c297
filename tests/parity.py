"""What every parity test checks: a run (N processes, another layout, a compiled model...)
against its single-process reference — the same metrics step by step and the same final
parameters, within float tolerance."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

LOSS_RTOL = 1e-5
# Adam (eps 1e-6 in the parity runs) moves a parameter whose gradient is itself near zero
# by ~lr * (rounding difference ~1e-9) / eps = 3e-6 a step: over 5 steps one embedding
# element of cp2_documents (a near-zero gradient the CP split sums in another order) drifted
# 2.1e-5 on one CPU model. 3e-5 leaves that noise room; real differences are far larger.
PARAM_ATOL, PARAM_RTOL = 3e-5, 1e-4
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def final_model(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The parameters of ``run_dir``'s ``step`` checkpoint, whatever layout wrote it,
    gathered into one state dict (DCP reshards)."""
    out = run_dir / f"final_{step}.pt"
    if not out.is_file():
        dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:07d}", out)
    return torch.load(out, weights_only=False)["model"]


def check_metrics(got: dict, ref: dict, steps: Iterable[int], name: str,
                  keys: Iterable[str] = KEYS, rtol: float = LOSS_RTOL, atol: float = 0.0
                  ) -> None:
    """``got`` logged exactly ``steps`` and each ``key`` equals ``ref``'s at every step."""
    steps = list(steps)
    assert sorted(got) == steps, (name, sorted(got))
    for step in steps:
        for key in keys:
            assert got[step][key] == pytest.approx(ref[step][key], rel=rtol, abs=atol), (
                name, step, key)


def check_model(model: dict, ref: dict, name: str) -> None:
    """The same tensors (names, shapes) with the same values, within PARAM_ATOL/RTOL."""
    assert set(model) == set(ref), (name, set(model) ^ set(ref))
    for key, value in ref.items():
        assert model[key].shape == value.shape, (name, key)
        torch.testing.assert_close(model[key], value, atol=PARAM_ATOL, rtol=PARAM_RTOL,
                                   msg=lambda m, k=key: f"{name}: {k}: {m}")


def reference_runs(single_run, common: list[str], modes: dict[str, list[str]], steps: int
                   ) -> dict[str, tuple[dict, dict]]:
    """``{mode: (metrics, final model)}`` of the single-process run of every mode (shared
    across modules through the session's ``single_run``)."""
    from tests.helpers import read_metrics

    out = {}
    for mode, extra in modes.items():
        run_dir = single_run([*common, *extra])
        out[mode] = (read_metrics(run_dir), final_model(run_dir, steps))
    return out


def layout_runs(request, root: Path, cache: Path, layouts, common: list[str],
                modes: dict[str, list[str]], test_fn):
    """``runs(name) -> run_dir`` for ``layouts`` = ``[(name, nproc, mode, extra), ...]``:
    the layouts of one world size that this session selected (for ``test_fn``) train
    together, in one spawned process group (tests/inproc.py)."""
    from tests.inproc import LazyRuns, selected_ids

    jobs = {name: (nproc, [*common, *modes[mode], *extra])
            for name, nproc, mode, extra in layouts}
    return LazyRuns(root, cache, jobs, selected_ids(request, test_fn))
