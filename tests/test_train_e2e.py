"""End-to-end through the CLI: training lowers the loss, kill-and-resume is exact,
and user mistakes give one clear line, a non-zero exit, and lose nothing."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from tests.helpers import FAST, read_metrics, run_cli

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    )
    return proc


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


REFERENCE = [*FAST, "trainer.max_steps=12", "checkpoint.every=4", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def reference_run(single_run):
    """12 uninterrupted steps with a checkpoint every 4: the reference for resume tests.
    Trained in-process through trainer.train.run (tests/inproc.py; the parity tests check
    that this equals the CLI exactly); the resumed runs below go through the CLI."""
    return single_run(REFERENCE)


def test_training_lowers_the_loss(tmp_path, moefold_cache):
    proc = _ok(
        run_cli(
            [
                *FAST,
                f"run_dir={tmp_path}",
                "trainer.max_steps=40",
                "optim.lr=5e-3",
                "trainer.eval_every=20",
            ],
            cache_dir=moefold_cache,
        )
    )
    m = read_metrics(tmp_path)
    assert sorted(m) == list(range(1, 41))
    first, last = m[1], m[40]
    tail = sum(m[s]["lm_loss"] for s in range(36, 41)) / 5
    for key in ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in first, key
    # starts near ln(V) for the 2048-token vocabulary and falls clearly
    assert abs(first["lm_loss"] - math.log(2048)) < 0.5
    assert tail < first["lm_loss"] - 1.0
    assert math.isfinite(m[40]["val_loss"]) and m[40]["val_loss"] < m[20]["val_loss"] < first["lm_loss"]
    # the objective includes the (small, positive) aux + z losses, lm_loss does not
    assert last["aux_loss"] > 0 and last["loss"] == pytest.approx(
        last["lm_loss"] + last["aux_loss"]
    )
    assert (tmp_path / "checkpoints" / "step_0000040").is_dir()
    assert "step 40" in proc.stdout or "40/40" in proc.stdout


def test_kill_and_resume_is_exact(tmp_path, reference_run, moefold_cache):
    args = [
        *FAST,
        f"run_dir={tmp_path}",
        "trainer.max_steps=12",
        "checkpoint.every=4",
        "checkpoint.keep_last=0",
    ]
    # "killed" after 6 steps: the last complete checkpoint is step 4
    _ok(run_cli([*args, "trainer.stop_after_steps=6"], cache_dir=moefold_cache))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000004"]
    # an interrupted checkpoint write must be ignored by resume=auto
    (tmp_path / "checkpoints" / ".tmp-step_0000008").mkdir()
    proc = _ok(run_cli(args, cache_dir=moefold_cache))
    assert "resumed from" in proc.stdout and "step_0000004" in proc.stdout
    ref, got = read_metrics(reference_run), read_metrics(tmp_path)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    # resuming at step 4 moved the records of steps 5 and 6 aside: no step is logged twice
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 13))
    (cut,) = tmp_path.glob("metrics.jsonl.rolled-back-*")
    assert [json.loads(ln)["step"] for ln in cut.read_text().splitlines()] == [5, 6]


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_config_fails_before_launch(tmp_path, moefold_cache):
    proc = run_cli([*FAST, f"run_dir={tmp_path}", "model.num_kv_heads=3"], cache_dir=moefold_cache)
    _one_error_line(proc, "model.num_kv_heads=3", "model.num_heads=4", "valid: 1, 2, 4")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_preset_is_named(tmp_path, moefold_cache):
    proc = run_cli([*FAST, f"run_dir={tmp_path}", "model=moe_huge"], cache_dir=moefold_cache)
    assert proc.returncode != 0 and "moe_huge" in proc.stderr


def test_missing_data_is_named(tmp_path, moefold_cache):
    missing = tmp_path / "nowhere" / "corpus_text_document"
    proc = run_cli(
        [
            *FAST,
            f"run_dir={tmp_path}",
            "data=indexed",
            f"data.blend=[{missing}]",
            f"data.tokenizer_model={tmp_path / 'tok.model'}",
        ],
        cache_dir=moefold_cache,
    )
    _one_error_line(proc, str(tmp_path))


def test_bad_checkpoints_are_named_and_untouched(tmp_path, reference_run, moefold_cache):
    src = reference_run / "checkpoints" / "step_0000004"
    before = _tree_digest(reference_run / "checkpoints")
    # 1. a path that is not a checkpoint
    proc = run_cli(
        [*FAST, f"run_dir={tmp_path}", f"checkpoint.resume={tmp_path}"], cache_dir=moefold_cache
    )
    _one_error_line(proc, str(tmp_path), "not a complete checkpoint")
    # 2. a checkpoint for another model shape
    proc = run_cli(
        [*FAST, f"run_dir={tmp_path}", "model.hidden_size=32", f"checkpoint.resume={src}"],
        cache_dir=moefold_cache,
    )
    _one_error_line(proc, str(src), "model.hidden_size")
    # 3. a corrupt shard
    broken = tmp_path / "broken" / "step_0000004"
    shutil.copytree(src, broken)
    for shard in broken.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    proc = run_cli(
        [*FAST, f"run_dir={tmp_path}/r3", f"checkpoint.resume={broken}"], cache_dir=moefold_cache
    )
    _one_error_line(proc, str(broken))
    # 4. resume=none onto a directory that already holds checkpoints
    proc = run_cli(
        [*FAST, f"run_dir={reference_run}", "checkpoint.resume=none", "trainer.max_steps=4"],
        cache_dir=moefold_cache,
    )
    _one_error_line(proc, "already holds", "checkpoint.resume=auto")
    assert _tree_digest(reference_run / "checkpoints") == before


def test_bf16_autocast_tracks_fp32(reference_run, single_run):
    """The mixed-precision path (bf16 autocast, fp32 master weights, fp32 router and loss)
    stays within bf16 rounding of the fp32 run; on GPUs this is the default precision."""
    run_dir = single_run([*FAST, "trainer.max_steps=12", "trainer.precision=bf16",
                          "checkpoint.save_final=false"])
    ref, got = read_metrics(reference_run), read_metrics(run_dir)
    for step in range(1, 13):
        assert got[step]["lm_loss"] == pytest.approx(ref[step]["lm_loss"], rel=2e-2), step
        assert got[step]["lm_loss"] != ref[step]["lm_loss"]  # really ran in bf16
    assert got[12]["mfu"] < 1.0
