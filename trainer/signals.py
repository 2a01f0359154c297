"""Preemption: SIGTERM / SIGUSR1 / SIGINT end the run at a step boundary, with a checkpoint.

The handler only records the signal (it runs between two Python bytecodes of the main
thread, maybe in the middle of a step); the trainer reads ``StopRequest.requested`` once
per step and folds it into the one tiny all-reduce the step guard does anyway
(trainer/guards.py), so every rank stops after the *same* step even when the signal
reached the ranks at different moments. Then every rank writes the checkpoint of that step
and the run exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"), which
launch/slurm.sbatch turns into ``scontrol requeue``.

Repeated signals are ignored (torchrun forwards the SIGTERM/SIGINT its workers already
received from Slurm or the terminal), except a second Ctrl-C more than
``ABORT_AFTER_S`` seconds after the first: that one aborts at once, without a checkpoint.

``MOEFOLD_EXIT_FILE`` (set by launch/torchrun.sh and launch/slurm.sbatch): rank 0 writes
its documented exit code there, because torchrun itself exits 1 whenever a worker exits
non-zero; the wrappers exit with the workers' code instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["ABORT_AFTER_S", "EXIT_PREEMPTED", "StopRequest", "write_exit_code"]

EXIT_PREEMPTED = 75  # stopped by a signal after writing a checkpoint: requeue / rerun
ABORT_AFTER_S = 2.0
_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopRequest:
    """Records the first of SIGTERM / SIGUSR1 / SIGINT; ``install()`` / ``restore()``."""

    def __init__(self, announce: bool = True):
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._announce = announce
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in _SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._first_at = now
            if self._announce:
                print(f"received {self.signal_name}: finishing the current step, then writing "
                      "a checkpoint", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and now - self._first_at > ABORT_AFTER_S:
            raise KeyboardInterrupt  # a second Ctrl-C: abort without a checkpoint


def write_exit_code(code: int) -> None:
    """Rank 0 leaves its exit code where the launch wrappers look (``MOEFOLD_EXIT_FILE``)."""
    path = os.environ.get("MOEFOLD_EXIT_FILE")
    if path and int(os.environ.get("RANK", 0)) == 0:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
