"""Trainer step overhead: the ``Trainer`` loop vs a hand-written loop of the same model.

Both loops train the same model (``parallelize`` on one process: same init), on the same
micro-batches (the run's ``TrainData``, same order), with the same AdamW
(``build_optimizer``), LR schedule, precision, grad clipping and micro-batch split. The
hand loop does only what a minimal script must: forward, CE / tokens, backward, clip,
optimizer + scheduler step, zero_grad, and reset the MoE layers' statistics; it never
syncs with the host. The Trainer runs its whole ``fit()`` loop (guards, metrics,
metrics.jsonl every ``trainer.log_every`` steps, console) with the given overrides.

The two run in lockstep in one process (one hand step, one Trainer step, ...), so that
a busy machine slows both alike; each repeat times ``--steps`` step pairs after
``--warmup``. Prints the median step times and the median per-pair ratio (trainer /
hand; 1.02 = 2% overhead).

    python scripts/bench_trainer_overhead.py [--repeats 3 --steps 40] [override ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from models.inputs import model_kwargs  # noqa: E402
from models.loss import lm_loss_sum  # noqa: E402
from tests.helpers import compose_config  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def build_trainer(overrides: list[str], run_dir: str, steps: int) -> Trainer:
    cfg = compose_config([*overrides, f"trainer.max_steps={steps}", f"run_dir={run_dir}",
                          f"checkpoint.dir={run_dir}/ckpt", "checkpoint.save_final=false",
                          "checkpoint.every=0"])
    return Trainer(cfg)


class HandLoop:
    """The hand-written loop over a second Trainer's model, data, optimizer and schedule
    (same seed: the same initial weights and batches as the Trainer's)."""

    def __init__(self, tr: Trainer):
        self.model, self.opt, self.sched, self.data = tr.model, tr.optimizer, tr.scheduler, tr.data
        t = tr.cfg.trainer
        self.mbs, self.gbs, self.clip = t.micro_batch_size, t.global_batch_size, t.grad_clip
        self.arch, self.autocast = tr.cfg.model.arch, tr.runner.autocast
        self.moe_layers = list(self.model.moe_layers())
        self.consumed = 0
        self.model.train()

    def step(self) -> None:
        mbs = self.data.train_microbatches(self.consumed, self.mbs, 0, 1)
        n = sum(mb["loss_mask"].sum() for mb in mbs)
        for mb in mbs:
            with self.autocast():
                logits = self.model(mb["tokens"], **model_kwargs(mb, self.arch))
            loss = lm_loss_sum(logits, mb["labels"], mb["loss_mask"].unsqueeze(-1)).sum()
            (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        for layer in self.moe_layers:
            layer.pop_stats()
        self.consumed += self.gbs


def lockstep(overrides: list[str], warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Per-step seconds of the hand loop and of the Trainer, one step of each in turn:
    ``Trainer.fit`` runs its loop; before each of its steps the hand loop does one. A
    Trainer step is timed from after that hand step to the start of the next one (its
    whole loop body: step, metrics, logging, guards)."""
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d2:
        total = warmup + steps + 1
        tr, hand = build_trainer(overrides, d, total), HandLoop(build_trainer(overrides, d2, total))
        hand_s: list[float] = []
        trainer_s: list[float] = []
        last = [0.0]
        step_fn = tr.train_step

        def timed_step():
            t0 = time.perf_counter()
            if last[0]:
                trainer_s.append(t0 - last[0])
            hand.step()
            t1 = time.perf_counter()
            hand_s.append(t1 - t0)
            last[0] = t1
            return step_fn()

        tr.train_step = timed_step
        tr.fit()
        return hand_s[warmup:warmup + steps], trainer_s[warmup:warmup + steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both loops")
    args = ap.parse_args()
    overrides = ["logger.console=none", "logger.tensorboard=false",
                 "trainer.eval_every=0", *args.overrides]
    print(f"overrides: {' '.join(overrides)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(OmegaConf.to_yaml(compose_config(overrides).trainer).replace("\n", "; ")[:300])
    ratios, hands, trains = [], [], []
    for i in range(args.repeats):
        h, tr = lockstep(overrides, args.warmup, args.steps)
        hands += h
        trains += tr
        r = [b / a for a, b in zip(h, tr)]
        ratios += r
        print(f"repeat {i}: hand {statistics.median(h) * 1e3:.2f} ms/step, trainer "
              f"{statistics.median(tr) * 1e3:.2f} ms/step (medians), median per-step ratio "
              f"{statistics.median(r):.3f}", flush=True)
    print(f"all {len(ratios)} step pairs: hand {statistics.median(hands) * 1e3:.2f} ms/step, "
          f"trainer {statistics.median(trains) * 1e3:.2f} ms/step (medians); median per-step "
          f"ratio {statistics.median(ratios):.3f} (trainer / hand), ratio of sums "
          f"{sum(trains) / sum(hands):.3f}")

if __name__ == "__main__":
    main()
