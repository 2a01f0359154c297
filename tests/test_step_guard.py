"""``StepGuard.check`` in one process decides on the host from its one device read: the
same verdicts (non-finite, spike, stop request) and the step's token count with them."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import torch

from trainer.guards import SPIKE_HISTORY, StepGuard


def _guard(spike_factor: float = 0.0) -> StepGuard:
    t = NS(nonfinite="skip", skip_budget=100, skip_window=100, spike_factor=spike_factor,
           grad_clip=1.0)
    return StepGuard(t, world_size=1)


def test_single_process_verdicts_and_tokens():
    g = _guard(spike_factor=2.0)
    v = g.check(1, torch.tensor(3.0), torch.tensor(0.5), False, torch.tensor(512.0))
    assert (v.skip, v.stop, v.preempt, v.objective, v.grad_norm, v.tokens) == (
        None, None, False, 3.0, 0.5, 512.0)
    assert g.check(2, torch.tensor(math.nan), torch.tensor(0.5), False).skip == "nonfinite"
    assert g.check(3, torch.tensor(3.0), torch.tensor(math.inf), False).skip == "nonfinite"
    assert g.check(4, torch.tensor(3.0), torch.tensor(0.5), True).preempt
    for s in range(SPIKE_HISTORY):  # fill the history at 2.0 (mean 2.0 -> threshold 4.0)
        g.check(10 + s, torch.tensor(2.0), torch.tensor(0.5), False)
    g.history.clear()
    g.history.extend([2.0] * SPIKE_HISTORY)
    assert g.check(40, torch.tensor(3.9), torch.tensor(0.5), False).skip is None
    v = g.check(41, torch.tensor(4.5), torch.tensor(0.5), False)
    assert v.skip == "spike" and v.objective == 4.5
    assert g.skipped[-1] == 41 and list(g.skipped) == [2, 3, 41]
