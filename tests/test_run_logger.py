import io
import json
import logging
import socket
import sys
import time

import matplotlib.image as mpimg
import pytest
import torch
from omegaconf import OmegaConf

from scripts import plot_metrics
from trainer.config import LoggerConfig
from trainer.run_logger import RunLogger, render_expert_load


def make_cfg(console="plain", tensorboard=False, wandb_mode="disabled"):
    cfg = OmegaConf.structured(LoggerConfig(console=console, tensorboard=tensorboard))
    cfg.wandb.mode = wandb_mode
    return cfg


def read_lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_metrics_jsonl_and_resume_appends(tmp_path, capsys):
    with RunLogger(make_cfg(), tmp_path, is_main=True, total_steps=10, start_step=0) as lg:
        lg.log_step(1, {"loss": 3.5, "lm_loss": torch.tensor(3.25), "lr": 1e-3, "n": 7})
        lg.log_step(2, {"loss": float("nan"), "lm_loss": float("inf"), "lr": 2e-3})
        lg.log_step(3, {"loss": 2.5})
    # A resumed run (checkpoint at step 2) re-logs step 3 into the same file.
    with RunLogger(make_cfg(), tmp_path, is_main=True, total_steps=10, start_step=2) as lg:
        lg.log_step(3, {"loss": 2.4})
        lg.log_step(4, {"loss": 2.0})
    lines = read_lines(tmp_path)
    assert all(line.startswith('{"step": ') for line in lines)  # step first
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 3, 3, 4]
    assert recs[0] == {"step": 1, "loss": 3.5, "lm_loss": 3.25, "lr": 1e-3, "n": 7}
    assert recs[1]["loss"] is None and recs[1]["lm_loss"] is None  # non-finite -> null
    assert {r["step"]: r["loss"] for r in recs}[3] == 2.4  # last record of a step wins
    out = capsys.readouterr().out
    assert "step 1/10 | loss 3.5000 | lm_loss 3.2500 | lr 1.00e-03" in out
    assert "step 4/10" in out


def test_partial_last_line_does_not_swallow_the_next_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    with RunLogger(make_cfg(), tmp_path, is_main=True, total_steps=5, start_step=1) as lg:
        lg.log_step(2, {"loss": 2.0})
    assert json.loads(read_lines(tmp_path)[-1]) == {"step": 2, "loss": 2.0}
    recs = plot_metrics.read_metrics(tmp_path)  # the broken line is skipped
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 3.0), (2, 2.0)]


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = make_cfg(console="rich", tensorboard=True, wandb_mode="offline")
    with RunLogger(cfg, run_dir, is_main=False, total_steps=10, start_step=0) as lg:
        lg.info("hello")
        lg.log_step(1, {"loss": 1.0})
        lg.log_expert_load(1, torch.ones(2, 4), [0, 1])
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_rich_console_without_tty_prints_periodic_lines_without_control_codes(tmp_path, capsys):
    with RunLogger(make_cfg("rich"), tmp_path, is_main=True, total_steps=40, start_step=0) as lg:
        lg.info("model [bold]x[/bold]: 1.0M parameters")  # no markup interpretation
        for step in range(1, 6):
            lg.log_step(step, {"loss": 1.0 / step, "tokens_per_s": 12345.0, "mfu": 0.0123})
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "model [bold]x[/bold]: 1.0M parameters" in out
    steps = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("step ")]
    # first logged step, then every total//20 = 2 steps
    assert steps == ["step 1/40", "step 2/40", "step 4/40"]
    assert "tok/s 12.3k | mfu 1.23%" in out
    # Logging every 3 steps with a print period of 5 (total 100): a line per period anyway.
    with RunLogger(make_cfg("rich"), tmp_path, is_main=True, total_steps=100, start_step=0) as lg:
        for step in range(3, 31, 3):
            lg.log_step(step, {"loss": 1.0})
    out = capsys.readouterr().out
    steps = [
        int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("step ")
    ]
    assert steps == [3, 6, 12, 15, 21, 27, 30]


def test_none_console_is_silent_and_info_goes_to_log_files_only(tmp_path, capsys):
    lg_py = logging.getLogger("moefold")
    file_like, console = io.StringIO(), logging.StreamHandler(sys.stderr)
    handlers = [logging.StreamHandler(file_like), console]
    for h in handlers:
        lg_py.addHandler(h)
    old_level = lg_py.level
    lg_py.setLevel(logging.INFO)
    try:
        with RunLogger(
            make_cfg("plain"), tmp_path, is_main=True, total_steps=4, start_step=0
        ) as lg:
            lg.info("saved checkpoint X")
        assert capsys.readouterr().err == ""  # plain already printed it: no duplicate
        assert "saved checkpoint X" in file_like.getvalue()
        with RunLogger(make_cfg("none"), tmp_path, is_main=True, total_steps=4, start_step=0) as lg:
            lg.log_step(1, {"loss": 1.0})
        assert capsys.readouterr().out == ""
    finally:
        for h in handlers:
            lg_py.removeHandler(h)
        lg_py.setLevel(old_level)


def test_expert_load_heatmap_png_and_tensorboard(tmp_path):
    counts = torch.tensor(
        [[10.0, 10, 10, 10, 10, 10, 10, 10], [80, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]]
    )
    cfg = make_cfg(tensorboard=True)
    with RunLogger(cfg, tmp_path, is_main=True, total_steps=100, start_step=0) as lg:
        lg.log_expert_load(50, counts, [1, 3, 5])
    img = mpimg.imread(tmp_path / "expert_load" / "step_0000050.png")
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 150 < img.shape[0] < img.shape[1] < 2500  # landscape, a few rows
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # Row labels carry the per-layer imbalance: uniform 1.00x, all-on-one 8.00x.
    fig = render_expert_load(counts, [1, 3, 5], 50)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "layer 1  max 1.00x  min 1.00x"
    assert labels[1] == "layer 3  max 8.00x  min 0.00x"
    with pytest.raises(ValueError, match="3 layers"):
        render_expert_load(counts[:2], [1, 3, 5], 50)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any socket connection that is not loopback or a Unix socket."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise OSError(f"test forbids network access to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_wandb_offline_writes_under_run_dir_and_resumes_same_id(tmp_path, monkeypatch, no_network):
    for var, sub in (
        ("WANDB_CACHE_DIR", "c"),
        ("WANDB_CONFIG_DIR", "cfg"),
        ("WANDB_DATA_DIR", "d"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = make_cfg("none", wandb_mode="offline")
    first_start = int(time.time())
    with RunLogger(
        cfg,
        run_dir,
        is_main=True,
        total_steps=4,
        start_step=0,
        run_config={"model": {"name": "tiny"}},
    ) as lg:
        assert lg._wandb is not None
        lg.log_step(1, {"loss": 2.0})
        lg.log_expert_load(1, torch.ones(2, 4), [0, 1])
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(run_id) == 8
    # wandb names a session's directory by its start second: a resumed session that
    # starts within the first one's second would share (and overwrite) its directory
    while int(time.time()) <= first_start:
        time.sleep(0.05)
    with RunLogger(cfg, run_dir, is_main=True, total_steps=4, start_step=1) as lg:
        assert lg._wandb.id == run_id
        lg.log_step(2, {"loss": 1.5})
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # both sessions logged into the same run id
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)


def test_wandb_init_failure_warns_and_training_continues(tmp_path, monkeypatch, capsys):
    import wandb

    def boom(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", boom)
    cfg = make_cfg("plain", wandb_mode="online")
    with RunLogger(cfg, tmp_path, is_main=True, total_steps=2, start_step=0) as lg:
        lg.log_step(1, {"loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb init failed" in err and "api_key" in err
    assert json.loads(read_lines(tmp_path)[0]) == {"step": 1, "loss": 1.0}


def test_dedup_steps_keeps_last_record():
    recs = [
        {"step": 1, "loss": 5.0},
        {"step": 3, "loss": 3.0},
        {"step": 2, "loss": 4.0},
        {"step": 3, "loss": 2.9},
        {"step": 4, "loss": 2.5},
    ]
    out = plot_metrics.dedup_steps(recs)
    assert [(r["step"], r["loss"]) for r in out] == [(1, 5.0), (2, 4.0), (3, 2.9), (4, 2.5)]


def test_plot_metrics_main_writes_png(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": s, "loss": scale / s, "lm_loss": scale / s - 0.1} for s in range(1, 21)]
        lines.append({"step": 10, "loss": scale / 10, "val_loss": scale / 9})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "plots" / "loss.png"
    assert plot_metrics.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 300 and img[..., :3].std() > 0.05
    assert plot_metrics.main([str(tmp_path / "a"), "--out", str(out), "--keys", "nope"]) == 2
    assert plot_metrics.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "none of the keys" in capsys.readouterr().err
