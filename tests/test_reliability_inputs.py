"""Bad inputs and unsafe state from a run directory (issue "Long runs survive a real
cluster", cases 3-6 and 8-10): each reproduced and checked for the promised behaviour —
one line naming the key or file, no code run from a checkpoint, no silent fallback, no
second run in one run_dir, no duplicate metrics steps.

In-process calls where possible; a few CLI runs (tests/helpers.run_cli) where the entry
point itself is the subject.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import build_model
from models.config import ModelConfig, MoEConfig
from tests.helpers import FAST, compose_config, read_metrics, run_cli
from trainer import checkpoint as ckpt
from trainer.config import validate
from trainer.data.corpus import check_indexed_dataset, check_tokens, write_indexed_dataset
from trainer.errors import CheckpointError, ConfigError, DataError, report_user_error
from trainer.optim import build_optimizer, build_scheduler
from trainer.run_dir import RunLock, RunLockError, check_run_dir, roll_back_metrics


# -- 8/9: every bad value is one line naming the key ----------------------------------------
@pytest.fixture(scope="module")
def base_cfg():
    return compose_config(FAST)


BAD_VALUES = [
    ("model.init_std", -1), ("model.norm_eps", 0.0), ("model.rope_theta", -5.0),
    ("model.moe.topk_scaling_factor", -1.0), ("optim.beta1", 1.5), ("optim.beta2", -0.1),
    ("optim.eps", -1.0), ("optim.weight_decay", -0.1), ("optim.decay_steps", -5),
    ("trainer.seed", -1), ("trainer.grad_clip", -1.0), ("trainer.eval_every", -1),
    ("trainer.peak_tflops", -1.0), ("checkpoint.lock_stale_after_s", 0.0),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(base_cfg, key, value):
    cfg = copy.deepcopy(base_cfg)
    section, _, leaf = key.rpartition(".")
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    if key.startswith("model.moe."):
        cfg.model.moe.num_experts = max(cfg.model.moe.num_experts, 4)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_eval_iters_zero_with_eval_on(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg.trainer.eval_every, cfg.trainer.eval_iters = 5, 0
    with pytest.raises(ConfigError, match="trainer.eval_iters=0"):
        validate(cfg)
    cfg.trainer.eval_every = 0  # validation off: eval_iters is not used
    validate(cfg)
    cfg.checkpoint.allow_changes = ["lr"]
    with pytest.raises(ConfigError, match="checkpoint.allow_changes"):
        validate(cfg)


def test_run_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "afile")
    with pytest.raises(ConfigError, match="cannot be created"):
        check_run_dir(tmp_path / "afile" / "sub")
    assert check_run_dir(tmp_path / "new" / "dir").is_dir()


# -- 5: one run per directory --------------------------------------------------------------
def test_second_live_run_is_refused_and_stale_locks_are_taken_over(tmp_path):
    with RunLock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "run.lock").exists()  # released
    # same host, owner pid gone: taken over with a warning
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                   "pid": 2**22 + 12345}))
    lock = RunLock(tmp_path).acquire()
    assert lock.warnings and "stale" in lock.warnings[0]
    lock.release()
    # another host: refused while its heartbeat is fresh, taken over once it is old
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunLockError, match="host elsewhere"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / "run.lock", (old, old))
    lock = RunLock(tmp_path, stale_after_s=60).acquire()
    assert "elsewhere" in lock.warnings[0]
    lock.release()


# -- 6: metrics.jsonl continues at the resumed step ------------------------------------------
def test_roll_back_metrics_moves_later_steps_aside(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
    msg = roll_back_metrics(tmp_path, 5)
    assert "moved 4 records" in msg
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3, 4, 5]
    (backup,) = tmp_path.glob("metrics.jsonl.rolled-back-*")
    assert backup.read_text().splitlines()[:3] == lines[5:8]
    assert roll_back_metrics(tmp_path, 5) is None  # nothing more to move


# -- checkpoints: a tiny model, saved in-process ---------------------------------------------
MODEL = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    ffn_hidden_size=32, max_seq_len=16,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16))


def _objects(lr: float = 1e-3):
    torch.manual_seed(0)
    model = build_model(MODEL)
    model.init_weights()
    ocfg = compose_config(FAST).optim
    ocfg.lr, ocfg.min_lr = lr, lr / 10
    opt = build_optimizer(model, ocfg)
    return model, opt, build_scheduler(opt, ocfg, 10)


def _run_config(**optim) -> dict:
    return {"model": asdict(MODEL), "data": {"name": "pydoc", "split": "98,2,0"},
            "optim": {"lr": 1e-3, "decay_steps": 10, "eps": 1e-8, "beta1": 0.9,
                      "weight_decay": 0.1, "min_lr": 1e-4, **optim},
            "trainer": {"seed": 1, "seq_len": 16, "global_batch_size": 4, "max_steps": 10}}


def _save(root: Path, step: int, config: dict | None = None) -> Path:
    model, opt, sched = _objects()
    config = config or _run_config()
    return ckpt.save(root, model=model, optimizer=opt, scheduler=sched,
                     train_state=ckpt.TrainState(step=step, consumed_samples=4 * step),
                     meta={"model": config["model"], "config": config})


def _load(path: Path, **kw):
    model, opt, sched = _objects(kw.pop("lr", 1e-3))
    return ckpt.load(path, model=model, optimizer=opt, scheduler=sched,
                     expected_model=asdict(MODEL), **kw), opt


class _RunsCode:  # what a crafted pickle would execute on a weights_only=False load
    def __reduce__(self):
        return (os.system, (f"touch {_MARKER}",))


_MARKER = Path("/tmp/moefold-crafted-rng-ran")


def test_crafted_rng_pickle_runs_no_code(tmp_path):
    path = _save(tmp_path, 2)
    _MARKER.unlink(missing_ok=True)
    with open(path / "rng_rank0.pt", "wb") as f:
        pickle.dump({"torch": _RunsCode()}, f)
    torch.save({"torch": _RunsCode()}, tmp_path / "zip.pt")
    shutil.copyfile(tmp_path / "zip.pt", path / "rng_rank0.pt")  # torch's zip format too
    with pytest.raises(CheckpointError, match="rng_rank0.pt is corrupt or not a plain RNG"):
        _load(path)
    assert not _MARKER.exists()


def test_rng_round_trip_and_old_format_still_loads(tmp_path):
    path = _save(tmp_path, 2)
    state = torch.load(path / "rng_rank0.pt", weights_only=True)
    assert state["format"] == ckpt.RNG_FORMAT
    np.random.seed(7)
    expect = np.random.rand()
    np.random.seed(7)
    old = {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    torch.save(old, path / "rng_rank0.pt")  # format 1: numpy arrays inside
    np.random.seed(99)
    _load(path)
    assert np.random.rand() == expect


@pytest.mark.parametrize("damage", ["meta", "rng", "metadata"])
def test_corrupt_checkpoint_files_are_named(tmp_path, capfd, damage):
    path = _save(tmp_path, 2)
    target = {"meta": "meta.json", "rng": "rng_rank0.pt", "metadata": ".metadata"}[damage]
    (path / target).write_bytes(b"\xff\xfe garbage" * 7)
    with pytest.raises(CheckpointError) as e:
        if damage == "meta":
            ckpt.resolve_resume("auto", tmp_path)
        else:
            _load(path)
    assert (target if damage != "metadata" else str(path)) in str(e.value)
    assert "\n" not in str(e.value)
    assert "Traceback" not in capfd.readouterr().err  # DCP's logged tracebacks are quiet


def test_disk_full_during_save_says_so_and_cleans_up(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(CheckpointError, match="no space left on device") as e:
        _save(tmp_path, 2)
    assert "step_0000002" in str(e.value)
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("step_*"))


# -- 4: no silent fallback; rolling back moves later checkpoints aside -----------------------
def test_unreadable_newest_is_an_error_and_rollback_moves_later_aside(tmp_path):
    five, ten = _save(tmp_path, 5), _save(tmp_path, 10)
    (ten / ".metadata").unlink()
    with pytest.raises(CheckpointError) as e:
        ckpt.resolve_resume("auto", tmp_path)
    assert str(ten) in str(e.value) and f"checkpoint.resume={five}" in str(e.value)
    res = ckpt.prepare_resume(str(five), tmp_path, _run_config())
    assert res.path == five and "rolled back" in res.notes[-1]
    (moved,) = (tmp_path / ckpt.ROLLED_BACK).glob("*/step_0000010")
    assert (moved / "meta.json").is_file()  # moved, not deleted
    assert [s for s, _ in ckpt.step_dirs(tmp_path)] == [5]
    assert (tmp_path / "latest").read_text().strip() == "step_0000005"
    _save(tmp_path, 10)  # training continues: no "refusing to overwrite"


# -- 9/10: changed settings on resume --------------------------------------------------------
def test_changed_settings_are_refused_with_a_short_list(tmp_path):
    path = _save(tmp_path, 2)
    run = _run_config(lr=3e-3)
    run["model"]["moe"]["num_experts"] = 16
    with pytest.raises(CheckpointError) as e:
        ckpt.prepare_resume("auto", tmp_path, run)
    msg = str(e.value)
    assert "model.moe.num_experts: checkpoint 4 vs run 16" in msg
    assert "optim.lr: checkpoint 0.001 vs run 0.003" in msg
    assert "checkpoint.allow_changes=[model.moe.num_experts,optim.lr]" in msg
    assert len(msg) < 400 and "\n" not in msg
    many = _run_config(lr=3e-3, eps=1.0, beta1=0.5, weight_decay=0.5, min_lr=1.0)
    msg = str(pytest.raises(CheckpointError, ckpt.prepare_resume, "auto", tmp_path, many).value)
    assert "(+1 more)" in msg and "allow_changes=[optim]" in msg and len(msg) < 500
    # allowed: the run's optimizer values win over the checkpoint's
    res = ckpt.prepare_resume("auto", tmp_path, _run_config(lr=3e-3), ["optim.lr"])
    assert res.optim_changed and "optim.lr" in res.notes[0]
    _, opt = _load(path, lr=3e-3, run_optim_wins=True)
    assert opt.param_groups[0]["initial_lr"] == 3e-3


# -- 8/9: data files -------------------------------------------------------------------------
def _dataset(tmp_path: Path) -> tuple[str, SimpleNamespace]:
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "d")
    docs = [rng.integers(4, 100, rng.integers(5, 50)).tolist() for _ in range(200)]
    write_indexed_dataset(prefix, docs, vocab_size=100, eod=2)
    return prefix, SimpleNamespace(vocab_size=100, sha256="abc", model_path="tok.model")


def test_bit_flipped_index_and_random_bin_are_named(tmp_path, capfd):
    prefix, tok = _dataset(tmp_path)
    check_indexed_dataset(prefix)
    check_tokens(prefix, tok, 128)
    idx = bytearray(Path(prefix + ".idx").read_bytes())
    for pos in (40, 300, 1000, len(idx) - 20):  # lengths, pointers, document indices
        bad = bytearray(idx)
        bad[pos] ^= 0x40
        Path(prefix + ".idx").write_bytes(bad)
        with pytest.raises(DataError, match=f"{prefix}.idx is corrupt"):
            check_indexed_dataset(prefix)
    Path(prefix + ".idx").write_bytes(idx)
    data = np.fromfile(prefix + ".bin", dtype=np.uint16)  # vocab 100 -> uint16
    flips = np.random.default_rng(1).integers(0, data.size, 200)
    data[flips] ^= 0x1234
    data.tofile(prefix + ".bin")
    with pytest.raises(DataError, match=f"{prefix}.bin holds token id"):
        check_tokens(prefix, tok, 128)
    assert "Exception ignored" not in capfd.readouterr().err  # no Megatron __del__ noise


def test_tokenizer_that_does_not_match_the_data(tmp_path):
    prefix, tok = _dataset(tmp_path)
    Path(prefix + ".tokenizer.json").write_text(json.dumps({"vocab_size": 100,
                                                            "tokenizer_sha256": "abc"}))
    check_tokens(prefix, tok, 128)
    other = SimpleNamespace(vocab_size=120, sha256="def", model_path="other.model")
    with pytest.raises(DataError, match="another tokenizer .*vocab 100.* other.model"):
        check_tokens(prefix, other, 128)
    small = SimpleNamespace(vocab_size=50, sha256="abc", model_path="small.model")
    Path(prefix + ".tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"outside \[0, 50\)"):
        check_tokens(prefix, small, 128)


# -- 3: sample_transfusion loads tensors only -------------------------------------------------
def test_sample_transfusion_loads_model_tensors_only(tmp_path, monkeypatch):
    from scripts import sample_transfusion

    path = _save(tmp_path, 2)
    model, _ = sample_transfusion.load_model(path)
    ref, _, _ = _objects()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    real_load = torch.load

    def only_weights(*a, **k):
        assert k.get("weights_only") is True, "an unrestricted torch.load"
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", only_weights)
    sample_transfusion.load_model(path)
    _load(path)  # a resume too: DCP's own weights_only=False for non-tensors is replaced


# -- torchrun: a user error printed once ------------------------------------------------------
def test_user_error_printed_once_per_job(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{os.getpid()}-{time.time()}")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for rank in (2, 0, 1, 3):  # whichever rank comes first prints
        monkeypatch.setenv("RANK", str(rank))
        report_user_error(ConfigError("optim.eps=-1 must be > 0"))
        report_user_error(CheckpointError("rng_rank0.pt is corrupt"))
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: optim.eps=-1 must be > 0", "error: rng_rank0.pt is corrupt"]


# -- through the CLI ---------------------------------------------------------------------------
def _one_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_cli_lock_and_run_dir(tmp_path, moefold_cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": "now"}))
    _one_error(run_cli([*FAST, f"run_dir={run}"], cache_dir=moefold_cache),
               "in use by another run", f"pid {os.getpid()}")
    (tmp_path / "afile").write_text("x")
    _one_error(run_cli([*FAST, f"run_dir={tmp_path}/afile"], cache_dir=moefold_cache),
               "is a file")


def test_cli_resume_rollback_and_metrics(tmp_path, moefold_cache):
    args = [*FAST, f"run_dir={tmp_path}", "trainer.max_steps=6", "checkpoint.every=3",
            "checkpoint.keep_last=0"]
    assert run_cli([*args, "trainer.stop_after_steps=4"], cache_dir=moefold_cache).returncode == 0
    ckpts = tmp_path / "checkpoints"
    # killed after step 4: the resumed run re-logs 4..6 without duplicates (case 6)
    proc = run_cli(args, cache_dir=moefold_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    first = read_metrics(tmp_path)
    # newest checkpoint unreadable: an error naming it, no silent fallback (case 4)
    (ckpts / "step_0000006" / ".metadata").unlink()
    _one_error(run_cli(args, cache_dir=moefold_cache), "step_0000006", "checkpoint.resume=")
    # rolling back continues training; step 6 is moved aside, then written again
    proc = run_cli([*args, f"checkpoint.resume={ckpts / 'step_0000003'}"],
                   cache_dir=moefold_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(ckpts.glob("rolled_back/*/step_0000006")) and (ckpts / "step_0000006").is_dir()
    again = read_metrics(tmp_path)
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and again[6]["loss"] == first[6]["loss"]


# -- 10: multirun jobs and Slurm jobs get their own run_dir ------------------------------------
def test_multirun_jobs_get_distinct_run_dirs(monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    assert compose_config(FAST).run_dir == "runs/moe_tiny"  # a normal run: unchanged
    dirs = []
    for num, name in enumerate(["optim.lr=0.001", "optim.lr=0.003", "x/y=" + "z" * 100]):
        job = SimpleNamespace(mode=RunMode.MULTIRUN,
                              job=SimpleNamespace(override_dirname=name, num=num))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda job=job: job))
        dirs.append(compose_config(FAST).run_dir)
    assert dirs[:2] == ["runs/moe_tiny/optim.lr=0.001", "runs/moe_tiny/optim.lr=0.003"]
    assert "/" not in dirs[2][len("runs/moe_tiny/"):] and len(dirs[2]) < 100
    sbatch = (Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch").read_text()
    assert "runs/$SLURM_JOB_NAME-$SLURM_JOB_ID" in sbatch
