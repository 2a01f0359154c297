"""Step guards: skip non-finite / spiking steps, stop on divergence, never hang silently.

- ``StepGuard.check`` runs after the gradients are clipped and before the optimizer step.
  It decides, identically on every rank, whether the step is applied: the objective value
  (from the loss sums every rank already holds summed over ``dp_cp``/``pp``) and the global
  grad norm (all-reduced over the world by ``clip_grad_norm_``) are tested for NaN/Inf and,
  with ``trainer.spike_factor > 0``, for a spike over the running mean of recent losses.
  The flags and the preemption request (trainer/signals.py) travel in ONE tiny all-reduce
  over the world (3 floats) and one host sync per step, so all ranks skip or stop together
  even if a value is non-finite on one rank only or a signal reached one rank early.
- A skipped step: no optimizer step, gradients dropped, no expert-bias update; the step
  counter, the LR schedule and the data position advance (the batch is consumed, as in
  Megatron). More than ``trainer.skip_budget`` skipped steps within ``trainer.skip_window``
  steps (or any non-finite step with ``trainer.nonfinite=stop``) ends the run with
  ``EXIT_DIVERGED``.
- ``Watchdog``: a thread that ends the process with ``EXIT_HANG`` and one line when a
  phase (a step, a validation, a checkpoint) has run longer than ``trainer.step_timeout_s``;
  heartbeats in the process group's store let that line name the ranks that are behind.
- ``params_finite``: the check ``checkpoint.save`` makes before writing anything.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["EXIT_DIVERGED", "EXIT_HANG", "RunStopped", "StepGuard", "Verdict", "Watchdog",
           "behind_ranks", "params_finite"]

EXIT_DIVERGED = 3  # skip budget exceeded / non-finite step with nonfinite=stop
EXIT_HANG = 4  # a phase ran past trainer.step_timeout_s, or a collective failed / timed out
SPIKE_HISTORY = 20  # accepted steps in the running mean a spike is measured against
DIVERGE_WARN = 1e4  # warn when the grad norm exceeds this × grad_clip (or this, unclipped)
_WARN_EVERY = 100  # steps between two divergence warnings


class RunStopped(Exception):
    """End the run: ``message`` is the one line printed (rank 0), ``code`` the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Verdict:
    skip: Optional[str] = None  # None (applied) | "nonfinite" | "spike"
    stop: Optional[str] = None  # why the run must end now (divergence), else None
    preempt: bool = False  # a stop signal reached some rank: checkpoint and exit
    objective: float = 0.0
    grad_norm: float = 0.0
    tokens: float = 0.0  # the step's trained tokens, read in the same host sync


class StepGuard:
    def __init__(self, t: Any, world_size: int):
        self.mode, self.budget, self.window = t.nonfinite, t.skip_budget, t.skip_window
        self.spike_factor = float(t.spike_factor)
        self.warn_norm = DIVERGE_WARN * (t.grad_clip if t.grad_clip > 0 else 1.0)
        self.world_size = world_size
        self.history: deque[float] = deque(maxlen=SPIKE_HISTORY)
        self.skipped: deque[int] = deque()
        self._warned_at = -_WARN_EVERY

    def check(self, step: int, objective: torch.Tensor, grad_norm: torch.Tensor,
              stop_requested: bool, tokens: Optional[torch.Tensor] = None) -> Verdict:
        """``step``: the number the step will have (1-based). Collective over the world.
        ``tokens`` (already reduced, or None) rides along in the one host sync."""
        objective, grad_norm = objective.detach().float(), grad_norm.detach().float()
        tok = objective.new_zeros(1) if tokens is None else tokens.detach().float().view(1)
        spiking = self.spike_factor > 0 and len(self.history) == SPIKE_HISTORY
        threshold = self.spike_factor * sum(self.history) / SPIKE_HISTORY if spiking else 0.0
        if self.world_size > 1 and dist.is_initialized():
            nonfinite = (~torch.isfinite(torch.stack([objective, grad_norm]))).any().float()
            spike = (objective > threshold).float() if spiking else torch.zeros_like(nonfinite)
            flags = torch.stack([nonfinite, spike,
                                 torch.full_like(spike, float(stop_requested))])
            dist.all_reduce(flags)  # agree: any rank's flag is every rank's
            bad, spiked, preempt, obj, norm, ntok = torch.cat(
                [flags, objective.view(1), grad_norm.view(1), tok]).tolist()  # the host sync
        else:  # one process: read the values (the one host sync), decide on the host
            obj, norm, ntok = torch.cat([objective.view(1), grad_norm.view(1), tok]).tolist()
            bad = float(not (math.isfinite(obj) and math.isfinite(norm)))
            # the threshold in float32, as the tensor comparison above rounds it
            spiked = float(spiking and obj > torch.tensor(threshold).item())
            preempt = float(stop_requested)
        v = Verdict(preempt=preempt > 0, objective=obj, grad_norm=norm, tokens=ntok)
        if bad > 0:
            v.skip = "nonfinite"
        elif spiked > 0:
            v.skip = "spike"
        else:
            self.history.append(obj)
            return v
        self.skipped.append(step)
        while self.skipped[0] <= step - self.window:
            self.skipped.popleft()
        what = ("a non-finite loss or grad norm" if v.skip == "nonfinite" else
                f"a loss spike ({obj:.4g} > {self.spike_factor:g} x the mean of the last "
                f"{SPIKE_HISTORY} steps)")
        if v.skip == "nonfinite" and self.mode == "stop":
            v.stop = f"step {step} has {what} (trainer.nonfinite=stop)"
        elif len(self.skipped) > self.budget:
            v.stop = (f"{len(self.skipped)} steps skipped within the last {self.window} "
                      f"(trainer.skip_budget={self.budget}); step {step} had {what}")
        return v

    def divergence_warning(self, step: int, v: Verdict) -> Optional[str]:
        """A line when the (finite) grad norm is huge, at most every ``_WARN_EVERY`` steps."""
        if v.skip or not math.isfinite(v.grad_norm) or v.grad_norm <= self.warn_norm:
            return None
        if step - self._warned_at < _WARN_EVERY:
            return None
        self._warned_at = step
        return (f"step {step}: grad norm {v.grad_norm:.3g} > {self.warn_norm:.3g} "
                f"({DIVERGE_WARN:g} x trainer.grad_clip); loss {v.objective:.4g}: the run is "
                "diverging (check optim.lr, model.init_std)")


@torch.no_grad()
def params_finite(model: torch.nn.Module) -> bool:
    """Every parameter of every rank is finite (one bool all-reduce; a pass over the
    local shards, no communication of the weights)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    ok = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all() \
        if local else torch.tensor(True)
    flag = (~ok).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0


# -------------------------------------------------------------------------- hangs
def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


def behind_ranks(timeout_s: float = 5.0) -> str:
    """`` (ranks 1 at step 7, the others at step 8)`` from the heartbeats in the store, or
    ``""`` when they cannot be read or tell nothing."""
    store = _store()
    if store is None:
        return ""
    try:
        store.set_timeout(timedelta(seconds=timeout_s))
        world = dist.get_world_size()
        steps = [int(store.get(f"moefold/beat/{r}")) for r in range(world)]
    except Exception:
        return ""
    low = min(steps)
    if low == max(steps):
        return ""
    late = [r for r, s in enumerate(steps) if s == low]
    return (f" (rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} still at "
            f"step {low}, the others at step {max(steps)})")


class Watchdog:
    """Exits the process (code ``EXIT_HANG``) when the current phase runs past
    ``timeout_s``; ``beat(phase, step)`` starts a phase. ``timeout_s=0``: off."""

    def __init__(self, timeout_s: float, rank: int, world_size: int):
        self.timeout_s, self.rank, self.world_size = float(timeout_s), rank, world_size
        self._phase, self._since = "start-up", time.monotonic()
        self._store = _store() if world_size > 1 and timeout_s > 0 else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="moefold-watchdog",
                                            daemon=True)
            self._thread.start()

    @property
    def phase(self) -> str:
        return self._phase

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        self._phase, self._since = phase, time.monotonic()
        if self._store is not None and step is not None:
            try:
                self._store.set(f"moefold/beat/{self.rank}", str(step))
            except Exception:
                self._store = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(5.0, max(0.2, self.timeout_s / 10))
        while not self._stop.wait(poll):
            waited = time.monotonic() - self._since
            if waited > self.timeout_s:
                from trainer.signals import write_exit_code

                print(f"error: rank {self.rank}: {self._phase} has not finished after "
                      f"{waited:.0f}s (trainer.step_timeout_s={self.timeout_s:g}){behind_ranks()}"
                      "; a rank is frozen or dead, or a collective hangs: exiting with code "
                      f"{EXIT_HANG}", file=sys.stderr, flush=True)
                write_exit_code(EXIT_HANG)
                os._exit(EXIT_HANG)
