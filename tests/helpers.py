"""Shared test utilities: compose configs and run the training CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainer.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")

# Small and fast: the tiny MoE with short sequences, plain console, no TensorBoard.
FAST = [
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.eval_every=0",
    "logger.console=plain",
    "logger.tensorboard=false",
    "logger.expert_load_every=0",
    "optim.warmup_steps=2",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides or []))


def run_cli(
    overrides: list[str], *, cache_dir: Path, nproc: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m trainer.train` (launch/torchrun.sh for nproc>1); returns the process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEFOLD_CACHE=str(cache_dir),
               WANDB_SILENT="true", PYTHON=sys.executable)
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer.train", *overrides]
    else:  # through the user-facing wrapper, so it is exercised too
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), str(nproc), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged twice (resumed run) keeps the last."""
    out: dict[int, dict] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out
