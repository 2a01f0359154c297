"""Run a function on N gloo ranks (CPU), for tests and benchmark scripts.

``spawn(fn, world, *args)`` starts ``world`` processes, each with OMP_NUM_THREADS=1 and an
initialised gloo process group on a free port, calls ``fn(rank, world, *args)`` and returns
the list of the ranks' return values. It fails fast instead of hanging:

- an exception on any rank terminates the others and is re-raised here as
  ``torch.multiprocessing.ProcessRaisedException`` carrying the tracebacks of the ranks
  that failed, the first to fail (the root cause) first;
- every collective times out after ``timeout_s`` (gloo's default is 30 minutes), and the
  whole run is killed after ``timeout_s`` seconds (``TimeoutError``).

Processes come from a forkserver that imports torch (and ``fn``'s module) once, then forks
each rank from that clean, thread-free state: plain spawn re-imports torch per rank (about
1 s each on 2 cores). ``fn`` must be a module-level function; a script that uses this must
guard its entry point with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing import ProcessRaisedException

__all__ = ["PRELOAD", "free_port", "spawn"]

# More modules for the forkserver to import once, before it forks any rank (a test
# session's conftest adds the trainer's, so the first spawn of the session preloads them).
PRELOAD: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable, world: int, port: int, args: tuple, out_dir: str, timeout_s: float
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # Timestamped, so the parent can tell the root cause from the peers it broke;
        # written whole then renamed, so the parent never reads a half-written file.
        path = os.path.join(out_dir, f"error{rank}.txt")
        with open(path + ".part", "w") as f:
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        os.replace(path + ".part", path)
        raise
    finally:
        dist.destroy_process_group()


def _rank_errors(out_dir: str) -> list[tuple[float, int, str]]:
    errors = []
    for name in os.listdir(out_dir):
        if name.startswith("error") and name.endswith(".txt"):
            with open(os.path.join(out_dir, name)) as f:
                stamp, _, tb = f.read().partition("\n")
            errors.append((float(stamp), int(name[5:-4]), tb))
    return sorted(errors)


def spawn(
    fn: Callable,
    world: int,
    *args: Any,
    timeout_s: float = 120.0,
    progress: Callable[[], object] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return their results by rank.

    With ``progress`` (a function whose value changes whenever the ranks get on, e.g. the
    files in a status folder), ``timeout_s`` is the longest time without a change: a long
    run of many steps may take longer in all, a stuck one is still stopped."""
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("forkserver")
    # Only takes effect if this process has not started its forkserver yet.
    ctx.set_forkserver_preload(["torch", "torch.distributed", __name__, *PRELOAD, fn.__module__])
    with tempfile.TemporaryDirectory(prefix="moefold_spawn_") as out_dir:
        procs = mp.start_processes(
            _entry,
            args=(fn, world, free_port(), args, out_dir, timeout_s),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        last = progress() if progress is not None else None
        try:
            while not procs.join(timeout=0.2):  # raises as soon as one rank fails
                if progress is not None and (now := progress()) != last:
                    last, deadline = now, time.monotonic() + timeout_s
                if time.monotonic() > deadline:
                    for p in procs.processes:
                        if p.is_alive():
                            p.terminate()
                    for p in procs.processes:
                        p.join(5)
                    raise TimeoutError(
                        f"{fn.__name__} on {world} ranks ran past {timeout_s} s"
                        + (" without progress" if progress is not None else "")
                    )
        except ProcessRaisedException as e:
            errors = _rank_errors(out_dir)
            if not errors:
                raise
            # The first rank to fail is the root cause; the others usually just lost a peer.
            msg = "".join(
                f"\n\n-- rank {r} {'failed first' if i == 0 else 'then failed'}:\n{tb}"
                for i, (_, r, tb) in enumerate(errors)
            )
            first = errors[0][1]
            raise ProcessRaisedException(msg, first, procs.processes[first].pid) from e
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)
        ]
