"""The run directory: checked before use, owned by one live run, metrics rolled back.

- ``check_run_dir``: ``run_dir`` is a directory that exists or can be created, and is
  writable; otherwise one ``ConfigError`` line naming it.
- ``RunLock``: ``<run_dir>/run.lock`` (JSON: host, pid, start time, command) taken by rank
  0 before anything else is written by the run. A second live run is refused with one
  line naming the owner. A lock whose owner is gone is taken over with a warning line:
  same host and its pid is not alive; or another host and the lock's heartbeat (its file
  time, refreshed every ``HEARTBEAT_S`` by a daemon thread) is older than
  ``checkpoint.lock_stale_after_s``.
- ``roll_back_metrics``: metrics.jsonl keeps the records of steps <= the step the run
  starts from; later ones (a killed run's steps after its last checkpoint, or a rolled
  back run's) are moved to ``metrics.jsonl.rolled-back-<time>``, never dropped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError, UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0


def timestamp() -> str:
    """A file-name-safe local time stamp (seconds), e.g. 20250101-120000."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a directory that exists (created if needed) and is writable."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir} cannot be created ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={run_dir} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLockError(UserError):
    """Another live run holds the run directory."""


class RunLock:
    """``<run_dir>/run.lock``, held by one run (its rank 0) at a time; see the module doc."""

    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = 900.0):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after_s = float(stale_after_s)
        self.warnings: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owned = False
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": time.time(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: a lock being written, or garbage

    def _describe(self, owner: dict[str, Any]) -> str:
        return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
                f"{owner.get('started', '?')}")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record, f)
        return True

    def acquire(self) -> RunLock:
        for _ in range(3):  # a lock that vanishes between our looks: try again
            if self._create():
                self._owned = True
                self._start_heartbeat()
                return self
            owner = self._read()
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if not owner and age < 5.0:
                time.sleep(0.2)  # being written right now
                continue
            if not self._stale(owner, age):
                raise RunLockError(
                    f"run_dir={self.path.parent} is in use by another run ({self._describe(owner)}"
                    f"; lock file {self.path}); wait for it, choose another run_dir, or delete "
                    "the lock file if that run is gone"
                )
            self.warnings.append(
                f"took over the stale lock {self.path} of {self._describe(owner)} "
                f"(last heartbeat {age:.0f}s ago)")
            # Replace atomically: a concurrent taker sees either the old or our record.
            tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}")
            tmp.write_text(json.dumps(self._record))
            os.replace(tmp, self.path)
            if self._read().get("pid") == os.getpid() and \
                    self._read().get("host") == self._record["host"]:
                self._owned = True
                self._start_heartbeat()
                return self
        raise RunLockError(f"could not take the lock {self.path} (another run keeps taking it)")

    def _stale(self, owner: dict[str, Any], age: float) -> bool:
        if not owner:
            return True  # garbage that nobody is writing
        if owner.get("host") == self._record["host"]:
            pid = owner.get("pid")
            return not isinstance(pid, int) or not _pid_alive(pid)
        return age > self.stale_after_s

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if not self._owned:
            return
        self._owned = False
        owner = self._read()
        if owner.get("pid") == os.getpid() and owner.get("host") == self._record["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def owned_run_dir(run_dir: str | os.PathLike, stale_after_s: float, rank: int):
    """Check ``run_dir`` and hold its lock for the run (rank 0 takes it; the launcher stops
    the other ranks when rank 0 refuses)."""
    check_run_dir(run_dir)
    if rank != 0:
        yield None
        return
    with RunLock(run_dir, stale_after_s) as lock:
        for w in lock.warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        yield lock


def roll_back_metrics(run_dir: str | os.PathLike, step: int) -> str | None:
    """Keep the metrics.jsonl records of steps <= ``step``; move the others (and
    unparsable lines) to ``metrics.jsonl.rolled-back-<time>``. Returns a message when
    lines were moved, else None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    keep, cut = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                rec_step = None  # a torn last line of a killed run
            (keep if rec_step is not None and rec_step <= step else cut).append(
                line if line.endswith("\n") else line + "\n")
    if not cut:
        return None
    backup = path.with_name(f"metrics.jsonl.rolled-back-{timestamp()}")
    n = 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"metrics.jsonl.rolled-back-{timestamp()}-{n}")
    backup.write_text("".join(cut), encoding="utf-8")
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return (f"metrics.jsonl: moved {len(cut)} records after step {step} to {backup.name} "
            "(steps the resumed checkpoint does not contain)")


__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "check_run_dir", "roll_back_metrics",
           "precheck_run_dir", "timestamp"]


def precheck_run_dir(argv: list[str]) -> None:
    """Check an explicit ``run_dir=<path>`` on the command line before Hydra creates it
    (Hydra's own failure is a traceback); prints one ``error:`` line and exits 2."""
    from trainer.errors import report_user_error

    if any(a in ("-m", "--multirun") for a in argv):
        return
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "run_dir" or not value or "${" in value or "," in value:
            continue
        try:
            check_run_dir(value)
        except UserError as e:
            report_user_error(e)
            sys.exit(2)
