"""How a run ends when something goes wrong (docs/reliability.md), kept out of the loop.

``Trainer.fit`` calls three things from here: ``watch`` (the step watchdog and the signal
handlers, for the duration of the loop), ``collective_failure`` (a collective that timed
out or lost its peer becomes one line and ``EXIT_HANG``) and ``end_of_step`` (the step
guard's verdict: warn, stop on divergence, or checkpoint and stop on preemption).
``exit_with`` is the entry point's end for ``RunStopped``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.guards import EXIT_DIVERGED, EXIT_HANG, RunStopped, Watchdog, behind_ranks
from trainer.signals import EXIT_PREEMPTED, write_exit_code

__all__ = ["collective_failure", "end_of_step", "exit_with", "watch"]

# what gloo / NCCL / c10d say when a peer is gone or a collective ran out of time
_PEER_LOST = re.compile(r"timed out|timeout|connection closed|connection reset|broken pipe|"
                        r"nccl|gloo|socket", re.IGNORECASE)


@contextmanager
def watch(tr: Any) -> Iterator[Watchdog]:
    """The watchdog thread and the stop-signal handlers, for the loop's lifetime."""
    wd = Watchdog(tr.cfg.trainer.step_timeout_s, tr.rank, tr.world_size)
    tr.stop.install()
    try:
        yield wd
    finally:
        tr.stop.restore()
        wd.close()


@contextmanager
def collective_failure(tr: Any) -> Iterator[None]:
    """A collective that failed because a peer is dead or frozen: one line, every rank,
    ``EXIT_HANG``, and ``os._exit`` (tearing down a broken process group can hang too)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if tr.world_size == 1 or not _PEER_LOST.search(str(e)):
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])
        print(f"error: rank {tr.rank}: a collective failed during {tr.watchdog.phase} "
              f"({first}){behind_ranks()}; a peer rank is dead or frozen "
              f"(parallel.timeout_s={tr.cfg.parallel.timeout_s:g}): exiting with code "
              f"{EXIT_HANG}", file=sys.stderr, flush=True)
        write_exit_code(EXIT_HANG)
        os._exit(EXIT_HANG)


def end_of_step(tr: Any, step: int, saved: Any) -> None:
    """Act on ``tr.verdict`` once the step is logged (and saved, when due): raises
    ``RunStopped`` to end the run."""
    v = tr.verdict  # (no DictConfig read on the common path: ~20 us each)
    warning = tr.guard.divergence_warning(step, v)
    if warning:
        tr.logger.warning(warning)
    if v.stop or v.preempt:
        tr.saver.finish()  # a checkpoint still being written in the background
    if v.stop:
        kept = ckpt.list_checkpoints(tr.cfg.checkpoint.dir)
        last = f"the last checkpoint is {kept[-1][1]}" if kept else "no checkpoint was written"
        raise RunStopped(EXIT_DIVERGED, f"diverged at step {step}: {v.stop}; {last} (its "
                         "parameters are finite: resume from it with a lower optim.lr)")
    if v.preempt and step < tr.cfg.trainer.max_steps:
        path = saved or tr.save_checkpoint()
        how = tr.stop.signal_name or "a stop signal (on another rank)"
        if not path:
            raise RunStopped(EXIT_DIVERGED, f"stopped by {how} at step {step}: parameters "
                             "are non-finite, no checkpoint written")
        raise RunStopped(EXIT_PREEMPTED, f"stopped by {how} at step {step}: checkpoint "
                         f"{path} written; resume with the same command")


def exit_with(e: RunStopped) -> None:
    """Rank 0 prints the line and leaves the code for the launch wrappers; all exit."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(e.message, file=sys.stderr, flush=True)
        write_exit_code(e.code)
    sys.exit(e.code)
