"""Many trainings in few processes: what ``python -m trainer.train`` (one process) and
``launch/torchrun.sh N`` (N processes) would do, through the same entry point
``trainer.train.run(cfg)``, without paying python + torch + hydra + megatron start-up per
run.

- ``train_here(overrides, run_dir, cache)``: one single-process run in this process.
- ``train_batch(world, jobs, cache)``: the jobs ``[(name, overrides, run_dir), ...]`` one
  after another on ``world`` gloo ranks of one ``tests.distributed_utils.spawn``; each
  rank sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun would and calls
  ``run(compose_config(overrides + [run_dir=...]))``. Returns ``{name: error or None}``.
  A job that raises (or hangs) fails its whole spawn: the error is recorded for that job
  (a rank killed by a signal is first retried once from an empty run_dir),
  with the ranks' tracebacks, and the jobs after it run in a fresh spawn, so one broken
  layout fails its own test and no other.

Global state between runs in one process: the trainer seeds torch from the config before
it initialises the model, the data pipelines seed their own generators, wandb is disabled
by default, hydra is composed inside a context manager, and ``run()`` only destroys a
process group it created itself. The run loggers close their files on exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from pathlib import Path

import torch.distributed as dist

from tests.distributed_utils import spawn
from tests.helpers import compose_config

__all__ = ["LazyRuns", "run_jobs", "selected_ids", "train_batch", "train_here"]

# Heavy modules the trainer imports lazily: the forkserver imports them once (if it has
# not started yet), not every spawned rank.
PRELOAD = ["trainer.train", "trainer.data", "parallel.parallelize", "trainer.run_logger",
           "trainer.data.multimodal", "models.transformer", "megatron.core.datasets"]
for _m in PRELOAD:
    try:
        __import__(_m)
    except Exception:  # pragma: no cover - a missing optional module is imported later
        pass


def _set_env(rank: int, world: int, cache: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MOEFOLD_CACHE=str(cache),
                      WANDB_SILENT="true", OMP_NUM_THREADS="1")


def train_here(overrides: list[str], run_dir: Path, cache: Path) -> None:
    """One single-process training run in this process (what the CLI would run)."""
    from trainer.train import run

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                            "LOCAL_WORLD_SIZE", "MOEFOLD_CACHE")}
    assert not dist.is_initialized(), "a single-process run must not see a process group"
    _set_env(0, 1, cache)
    try:
        run(compose_config([*overrides, f"run_dir={run_dir}"]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(rank: int, world: int, jobs: list, cache: str, status_dir: str) -> None:
    from trainer.train import run

    _set_env(rank, world, Path(cache))
    for name, overrides, run_dir in jobs:
        try:
            run(compose_config([*overrides, f"run_dir={run_dir}"]))
            dist.barrier()
        except BaseException:
            raise RuntimeError(f"layout {name!r} failed on rank {rank}:\n"
                               f"{traceback.format_exc()}") from None
        Path(status_dir, f"{name}.rank{rank}.done").touch()


def train_batch(world: int, jobs: list[tuple[str, list[str], Path]], cache: Path,
                *, timeout_per_job_s: float = 240.0) -> dict[str, str | None]:
    """Run ``jobs`` on ``world`` ranks (fresh spawn after a failure); errors by job name."""
    assert len({name for name, _, _ in jobs}) == len(jobs), "job names must be unique"
    errors: dict[str, str | None] = {}
    todo = [(name, list(overrides), str(run_dir)) for name, overrides, run_dir in jobs]
    retried: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="moefold_batch_") as status_dir:
        while todo:
            try:
                spawn(_worker, world, todo, str(cache), status_dir,
                      timeout_s=timeout_per_job_s,
                      progress=lambda: len(os.listdir(status_dir)))
                err = None
            except Exception as e:  # a rank raised, or the batch hung
                err = f"{type(e).__name__}: {e}"
            done = set(os.listdir(status_dir))
            while todo and all(f"{todo[0][0]}.rank{r}.done" in done for r in range(world)):
                errors[todo.pop(0)[0]] = None
            if not todo:
                break
            # The first unfinished job is the one that failed. A rank killed by a signal
            # (not a Python exception: seen once in five full suites, a SIGABRT with no
            # traceback, not reproduced) gets one more try from an empty run_dir in a
            # fresh process group; a second failure, or any exception, fails the job.
            name, overrides, run_dir = todo[0]
            if err and "terminated with signal" in err and name not in retried:
                retried.add(name)
                print(f"tests/inproc.py: retrying {name!r} once after: {err}", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
                continue
            todo.pop(0)
            errors[name] = err or f"{name}: the ranks returned without finishing it"
    return errors


def run_jobs(jobs: list[tuple[str, int, list[str], Path]], cache: Path) -> dict[str, str | None]:
    """``jobs`` = ``[(name, world, overrides, run_dir), ...]``: the single-process ones here,
    the others in one ``train_batch`` per world size. Returns ``{name: error or None}``."""
    errors: dict[str, str | None] = {}
    for name, world, overrides, run_dir in jobs:
        if world == 1:
            try:
                train_here(overrides, run_dir, cache)
                errors[name] = None
            except Exception:
                errors[name] = f"{name} (single process) failed:\n{traceback.format_exc()}"
    for world in sorted({w for _, w, _, _ in jobs if w > 1}):
        errors.update(train_batch(
            world, [(n, o, d) for n, w, o, d in jobs if w == world], cache))
    return errors


def selected_ids(request, test_fn) -> set[str]:
    """The parametrize ids of ``test_fn`` that this session will run (after -k, node ids)."""
    return {item.callspec.id for item in request.session.items
            if getattr(item, "originalname", None) == test_fn.__name__
            and item.module.__name__ == test_fn.__module__ and hasattr(item, "callspec")}


class LazyRuns:
    """``runs(name) -> run_dir`` for the jobs ``{name: (world, overrides)}``: the first time
    a job of some world size is asked for, every selected job of that world size runs, in
    one process group (``train_batch``); a job that failed fails the test asking for it."""

    def __init__(self, root: Path, cache: Path, jobs: dict[str, tuple[int, list[str]]],
                 selected: set[str]):
        self.root, self.cache, self.jobs, self.selected = root, cache, jobs, selected
        self.errors: dict[str, str | None] = {}

    def __call__(self, name: str) -> Path:
        import pytest

        if name not in self.errors:
            world = self.jobs[name][0]
            batch = [n for n, (w, _) in self.jobs.items()
                     if w == world and n not in self.errors and (n in self.selected or n == name)]
            self.errors.update(run_jobs(
                [(n, world, self.jobs[n][1], self.root / n) for n in batch], self.cache))
        if self.errors[name] is not None:
            pytest.fail(f"training {name!r} failed:\n{self.errors[name]}", pytrace=False)
        return self.root / name
