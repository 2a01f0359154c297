"""Faults a real cluster produces, through the CLI (docs/reliability.md): a diverging run,
SIGTERM / SIGINT mid-run, a frozen rank, a killed rank under torchrun --max-restarts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, REPO, read_metrics, run_cli

pytestmark = pytest.mark.slow

EXIT_DIVERGED, EXIT_PREEMPTED = 3, 75
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")


def _env(cache: Path, **extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MOEFOLD_CACHE=str(cache), WANDB_SILENT="true",
                PYTHON=sys.executable, **extra)


def _popen(args: list[str], cache: Path, nproc: int = 1, **env) -> subprocess.Popen:
    cmd = ([sys.executable, "-m", "trainer.train"] if nproc == 1 else
           ["bash", str(REPO / "launch" / "torchrun.sh"), str(nproc)])
    return subprocess.Popen([*cmd, *args], cwd=REPO, env=_env(cache, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240):
    """Until metrics.jsonl holds ``step`` (the process is then in a later step)."""
    end = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if path.exists() and any(json.loads(x)["step"] >= step
                                 for x in path.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _same_losses(got: dict, ref: dict, steps) -> None:
    for step in steps:
        for key in KEYS:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def _params_finite(ckpt: Path, tmp: Path) -> bool:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp / "ckpt.pt")
    model = torch.load(tmp / "ckpt.pt", weights_only=False)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if torch.is_tensor(t))


def test_nonfinite_steps_are_skipped_then_the_budget_stops_the_run(tmp_path, moefold_cache):
    """optim.lr=1e4: the grad norm overflows after a few steps. The bad steps are skipped
    (logged, weights untouched), the fourth one exceeds skip_budget=3: exit 3 and one line
    naming the step; every kept checkpoint holds finite weights."""
    proc = run_cli([*FAST, f"run_dir={tmp_path}", "trainer.max_steps=30", "checkpoint.every=5",
                    "optim.lr=1e4", "optim.min_lr=0", "optim.warmup_steps=1000",
                    "trainer.skip_budget=3"], cache_dir=moefold_cache)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("diverged at step")]
    assert len(lines) == 1 and "trainer.skip_budget=3" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    m = read_metrics(tmp_path)
    skipped = sorted(s for s, r in m.items() if r.get("skipped"))
    assert len(skipped) == 4 and skipped == list(range(skipped[0], skipped[0] + 4)), skipped
    stop = skipped[-1]
    assert lines[0].startswith(f"diverged at step {stop}:") and max(m) == stop
    assert all(m[s]["skip_cause"] == "nonfinite" for s in skipped)
    assert all(not math.isfinite(m[s]["grad_norm"] or math.nan) for s in skipped)
    assert f"step {skipped[0]}/30 | loss" in proc.stdout and "skipped (nonfinite)" in proc.stdout
    kept = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert kept and str(kept[-1]) in lines[0]
    for ckpt in kept:  # periodic saves during the skipped steps still hold finite weights
        assert json.loads((ckpt / "meta.json").read_text())["params_finite"] is True
    assert _params_finite(kept[-1], tmp_path)


def test_sigterm_then_sigint_stop_with_a_checkpoint_and_resume_exactly(tmp_path, moefold_cache):
    """SIGTERM mid-run without periodic checkpoints: the step finishes, its checkpoint is
    written, exit 75 with one line; the resumed run is stopped by Ctrl-C the same way;
    the third run completes, and every step's losses equal an uninterrupted run's."""
    args = [*FAST, "trainer.max_steps=14", "checkpoint.every=0", "checkpoint.save_final=false"]
    ref = _popen([*args, f"run_dir={tmp_path / 'ref'}"], moefold_cache)
    run = tmp_path / "run"
    stops = []
    for sig, after in ((signal.SIGTERM, 3), (signal.SIGINT, 8)):
        proc = _popen([*args, f"run_dir={run}"], moefold_cache)
        _wait_for_step(run, after, proc)
        proc.send_signal(sig)
        rc, out, err = _finish(proc)
        assert rc == EXIT_PREEMPTED, err[-3000:]
        lines = [x for x in err.splitlines() if x.startswith(f"stopped by {sig.name} at step")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        step = int(lines[0].split(" at step ")[1].split(":")[0])
        assert step > after and step == max(read_metrics(run))
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        assert f"checkpoint {ckpt} written" in lines[0] and (ckpt / "meta.json").is_file()
        stops.append(step)
    rc, out, err = _finish(_popen([*args, f"run_dir={run}"], moefold_cache))
    assert rc == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stops[1]:07d}'}" in out
    assert _finish(ref)[0] == 0
    got, want = read_metrics(run), read_metrics(tmp_path / "ref")
    assert sorted(got) == sorted(want) == list(range(1, 15))
    _same_losses(got, want, range(1, 15))


def _worker_pid(root: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` below process ``root``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return pid
        todo += children.get(pid, [])
    return None


def test_frozen_rank_makes_the_others_exit_within_the_timeout(tmp_path, moefold_cache):
    """SIGSTOP on rank 1 of 2: rank 0's next collective times out after
    parallel.timeout_s and it exits (code 4) with one line naming itself and the step,
    instead of hanging."""
    if not any(moefold_cache.iterdir()):  # building the data cache would outlast 8 s
        assert run_cli([*FAST, f"run_dir={tmp_path / 'warm'}", "trainer.max_steps=1"],
                       cache_dir=moefold_cache).returncode == 0
    proc = _popen([*FAST, f"run_dir={tmp_path}", "trainer.max_steps=400",
                   "checkpoint.save_final=false", "parallel.timeout_s=8",
                   "parallel.dp_engine=ddp"], moefold_cache, nproc=2)
    rank1 = None
    try:
        _wait_for_step(tmp_path, 2, proc)
        rank0, rank1 = _worker_pid(proc.pid, 0), _worker_pid(proc.pid, 1)
        assert rank0 and rank1
        os.kill(rank1, signal.SIGSTOP)
        frozen_at = time.monotonic()
        while time.monotonic() - frozen_at < 60 and Path(f"/proc/{rank0}").exists():
            if (Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z":
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - frozen_at
        assert elapsed < 8 + 20, elapsed  # the timeout, plus a loaded machine's slack
    finally:
        if rank1:
            os.kill(rank1, signal.SIGKILL)
            os.kill(rank1, signal.SIGCONT)
    rc, out, err = _finish(proc, timeout=120)
    lines = [x for x in err.splitlines() if x.startswith("error: rank 0: a collective failed")]
    assert len(lines) == 1, err[-3000:]
    assert "parallel.timeout_s=8" in lines[0] and "during step " in lines[0]
    assert rc == 4, (rc, err[-2000:])


def test_step_watchdog_exits_with_a_line(tmp_path):
    """The watchdog thread ends a process whose phase runs past the timeout (code 4)."""
    code = ("import time\nfrom trainer.guards import Watchdog\n"
            "w = Watchdog(0.5, 3, 1)\nw.beat('step 7', 6)\ntime.sleep(30)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4 and time.monotonic() - t0 < 30
    assert "error: rank 3: step 7 has not finished after" in proc.stderr, proc.stderr


def test_torchrun_restart_after_a_killed_rank_is_exact(tmp_path, moefold_cache):
    """SIGKILL on rank 1 mid-run: torchrun --max-restarts=1 restarts both workers, they
    resume from the last checkpoint, and every step's losses equal an uninterrupted run's."""
    args = [*FAST, "trainer.max_steps=10", "checkpoint.every=3", "checkpoint.keep_last=0",
            "checkpoint.save_final=false", "parallel.dp_engine=ddp"]
    run = tmp_path / "run"
    proc = _popen([*args, f"run_dir={run}"], moefold_cache, nproc=2,
                  TORCHRUN_ARGS="--max-restarts=1")
    _wait_for_step(run, 4, proc)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
    rc, out, err = _finish(proc)
    assert rc == 0, "\n".join(x for x in err.splitlines() if "rror" in x or "rank" in x)[-4000:]
    assert "resumed from" in out
    # the reference after, not alongside: a restart's gloo rendezvous under load was flaky
    ref = _popen([*args, f"run_dir={tmp_path / 'ref'}"], moefold_cache, nproc=2)
    assert _finish(ref)[0] == 0
    got, want = read_metrics(run), read_metrics(tmp_path / "ref")
    assert sorted(got) == sorted(want) == list(range(1, 11))
    _same_losses(got, want, range(1, 11))
