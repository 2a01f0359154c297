"""Steppable forwards: a module's forward as a generator that pauses where a collective
is in flight, so two micro-batches can run in lockstep on one thread.

The two-batch overlap (``parallel.two_batch_overlap``, parallel/runner.py) runs micro-batch
A's forward until its expert all-to-all is launched, then B's until B's is launched, then
A's again (its rows have arrived meanwhile), and so on: one micro-batch's attention,
router and experts run while the other's tokens travel, as DeepSeek-V3's dual micro-batch
overlap and SGLang's two-batch overlap do. One thread builds both graphs, so autograd's
creation order interleaves them too and the summed backward runs in the mirrored order,
with each reverse exchange in flight over the other micro-batch's backward.

The protocol is plain Python generators:

- ``module.forward_steps(*args)`` (where a module has it) is a generator that ``yield``\\ s
  (``None``) at every point where it has launched a collective and has work to wait
  for, and ``return``\\ s the forward's output. Driving it to completion (:func:`run`) is
  the forward.
- :func:`call_steps` is ``module(*args)`` for steppable modules: it runs the module's
  plain forward hooks (tensor parallelism's input/output layout hooks) around
  ``forward_steps`` and refuses hooks it cannot replay. Modules without
  ``forward_steps`` are called normally (one atomic step).
- :func:`interleave` drives several generators round-robin and returns their results.

Each stretch between two yields runs to its end before another generator resumes, so
every rank issues its collectives in the same order (the order is fixed by the schedule,
never by timing).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules import module as _module_hooks

__all__ = ["Steps", "call_steps", "interleave", "run", "start"]

R = TypeVar("R")
Steps = Generator[None, None, R]


def run(steps: Steps[R]) -> R:
    """Drive ``steps`` to completion (every pause resumes at once) and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def start(steps: Steps[R]) -> tuple[bool, Any]:
    """Advance ``steps`` to its first pause: ``(True, None)`` when it paused (a collective
    is in flight; resume it with :func:`run` or ``yield from``), ``(False, value)`` when
    it finished without pausing. After a pause: ``yield`` (let the others run), then
    ``value = yield from steps`` (resuming it does not pause again)."""
    try:
        next(steps)
    except StopIteration as stop:
        return False, stop.value
    return True, None


def call_steps(module: nn.Module, *args: Any, **kwargs: Any) -> Steps[Any]:
    """``module(*args, **kwargs)`` as steps: its forward pre-hooks, ``forward_steps``,
    its forward hooks. A module without ``forward_steps`` is one plain call. Hooks this
    cannot replay (keyword-argument hooks, as FSDP's; backward hooks; global module
    hooks) are refused by name rather than skipped."""
    steps_fn = getattr(module, "forward_steps", None)
    if steps_fn is None:
        return module(*args, **kwargs)
    _check_hooks(module)
    for hook in module._forward_pre_hooks.values():
        out = hook(module, args)
        if out is not None:
            args = out if isinstance(out, tuple) else (out,)
    result = yield from steps_fn(*args, **kwargs)
    for hook in module._forward_hooks.values():
        out = hook(module, args, result)
        if out is not None:
            result = out
    return result


def _check_hooks(module: nn.Module) -> None:
    bad = [name for name, hooks in (
        ("keyword-argument forward pre-hooks (FSDP's)", module._forward_pre_hooks_with_kwargs),
        ("keyword-argument forward hooks", module._forward_hooks_with_kwargs),
        ("backward hooks", module._backward_hooks),
        ("backward pre-hooks", module._backward_pre_hooks),
        ("global forward pre-hooks", _module_hooks._global_forward_pre_hooks),
        ("global forward hooks", _module_hooks._global_forward_hooks),
    ) if hooks]
    if bad:
        raise RuntimeError(f"{type(module).__name__} has {', '.join(bad)}, which a stepped "
                           "forward (parallel.two_batch_overlap) cannot run; turn "
                           "parallel.two_batch_overlap off for this layout")


def interleave(all_steps: list[Steps[Any]]) -> list[Any]:
    """Drive every generator round-robin, one stretch (up to its next pause) each in
    turn, until all have finished; their results in order."""
    results: list[Any] = [None] * len(all_steps)
    live = list(range(len(all_steps)))
    while live:
        still = []
        for i in live:
            try:
                next(all_steps[i])
                still.append(i)
            except StopIteration as stop:
                results[i] = stop.value
        live = still
    return results
