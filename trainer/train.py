"""Entry point: ``python -m trainer.train [hydra overrides]`` (also ``moefold-train``).

Order of work, so that mistakes are cheap: compose + validate the config (before any
process group), then set up processes, data, model, optimizer, resume, and loop. What the
layout means for a step lives behind ``parallel.parallelize.ParallelModel``: the trainer
orchestrates and knows no TP/EP/CP/PP internals.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from parallel.dims import ParallelDims
from trainer import checkpoint as ckpt
from trainer.config import moe_layer_pattern, register_configs, validate
from trainer.errors import ConfigError, UserError, report_user_error
from trainer.guards import RunStopped, StepGuard, Verdict
from trainer.reliability import collective_failure, end_of_step, exit_with, watch
from trainer.report import startup_report
from trainer.run_dir import owned_run_dir, precheck_run_dir, roll_back_metrics
from trainer.run_logger import per_rank_logging
from trainer.runtime import (
    autocast_dtype,
    autocast_factory,
    check_torch,
    init_distributed,
    pick_device,
)
from trainer.signals import StopRequest

register_configs()


def _to_host(scalars: list[torch.Tensor]) -> list[float]:
    """Scalar tensors as floats, in one device->host copy. The usual case (fp32 0-d
    tensors) is one ``stack``; others are cast and reshaped first (~2 ops each)."""
    if not scalars:
        return []
    with torch.no_grad():
        if not all(t.dtype == torch.float32 and t.dim() == 0 for t in scalars):
            scalars = [t.float().reshape(()) for t in scalars]
        return torch.stack(scalars).tolist()


class Trainer:
    """Holds everything for one run; ``fit()`` runs the loop."""

    def __init__(self, cfg: DictConfig):
        # Imports that pull in heavy packages stay here so `--help`/validation is fast.
        from parallel.expert_placement import PlacementError, RoutingTrace, resolve_placement
        from parallel.hf_load import InitSourceError
        from parallel.parallelize import parallelize
        from trainer.data import build_data
        from trainer.data.prefetch import Prefetcher
        from trainer.objective import Objective
        from trainer.optim import build_optimizer, build_scheduler
        from trainer.perf import reuse_freed_cpu_memory
        from trainer.run_logger import RunLogger

        self.cfg, t = cfg, cfg.trainer
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = pick_device(t)
        self.amp_dtype = autocast_dtype(t, self.device)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world_size, rank=self.rank)
        if self.world_size > 1:
            init_distributed(self.device, cfg.parallel.timeout_s)
            self.dims.build_meshes(self.device.type)
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dims.dp_size)
        # Resume target first: a bad checkpoint path must fail before data/model work.
        self.resume = ckpt.prepare_resume(
            cfg.checkpoint.resume, cfg.checkpoint.dir, OmegaConf.to_container(cfg, resolve=True),
            list(cfg.checkpoint.allow_changes), rank=self.rank)
        self.resume_from = self.resume.path
        valid_batches = (t.max_steps // t.eval_every + 1) * t.eval_iters if t.eval_every else 0
        self.data = build_data(cfg.data, seq_len=t.seq_len, seed=t.seed,
                               global_batch_size=t.global_batch_size,
                               train_samples=t.max_steps * t.global_batch_size,
                               valid_samples=valid_batches * t.global_batch_size,
                               model_cfg=cfg.model, rank=self.rank, world_size=self.world_size)

        cuda, micro = self.device.type == "cuda", int(t.micro_batch_size)
        self.prefetch = Prefetcher(
            lambda consumed: self.data.train_microbatches(
                consumed, micro, self.dims.dp_rank, self.dims.dp_size),
            pin_memory=cuda, enabled=t.prefetch == "on" or (t.prefetch == "auto" and cuda))

        self.model_cfg = OmegaConf.to_object(cfg.model)
        try:  # model.init_from / moe.upcycle_from / a placement file: a bad source is a user error
            placement = resolve_placement(cfg.parallel.expert_placement, cfg.run_dir, self.dims,
                                          cfg.cluster.gpus_per_node)
            self.pm = parallelize(self.model_cfg, cfg.parallel, self.dims, device=self.device,
                                  seed=t.seed, seq_len=t.seq_len, num_micro=self.num_micro,
                                  moe_pattern=moe_layer_pattern(cfg.model), placement=placement,
                                  amp_dtype=self.amp_dtype)
        except (InitSourceError, PlacementError) as e:
            raise ConfigError(str(e)) from None
        self.model = self.pm.model
        self.trace = None  # which experts tokens choose, for parallel.expert_placement=auto
        if cfg.logger.routing_trace_every:
            self.trace = RoutingTrace(self.model, Path(cfg.run_dir) / "routing",
                                      cfg.logger.routing_trace_every, self.rank)
        # CPU allocator: keep freed blocks (no unmap + page-fault of the big activations
        # every step, ~12% tokens/s) unless FSDP shards the model: its per-layer
        # all-gathered parameters then stay in the heap too (+1-2.4 GB per rank measured)
        dp, reuse = self.pm.dp, t.reuse_cpu_memory
        if reuse == "auto":
            reuse = "off" if dp.engine == "fsdp" and max(dp.dense_size, dp.expert_size) > 1 \
                else "on"
        if self.device.type == "cpu" and reuse == "on":
            reuse_freed_cpu_memory()
        self.objective = Objective.from_config(cfg, self.pm.loss_sum)
        self.runner = self.pm.step_runner(self.objective,
                                          autocast_factory(self.device, self.amp_dtype))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.state = ckpt.TrainState()
        self.guard, self.verdict = StepGuard(t, self.world_size), Verdict()
        self.stop = StopRequest(announce=self.rank == 0)
        self.saver = ckpt.Saver(background=cfg.checkpoint.async_save)
        if self.resume_from is not None:
            self.state = ckpt.load(
                self.resume_from, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler,
                expected_model=OmegaConf.to_container(cfg.model, resolve=True), dims=self.dims,
                allow_changes=list(cfg.checkpoint.allow_changes),
                run_optim_wins=self.resume.optim_changed)
        if self.rank == 0:  # metrics.jsonl continues at the resumed step: no duplicates
            self.resume.notes.append(roll_back_metrics(cfg.run_dir, self.state.step))
        self.logger = RunLogger(cfg.logger, Path(cfg.run_dir), is_main=self.rank == 0,
                                total_steps=t.max_steps, start_step=self.state.step,
                                run_config=OmegaConf.to_container(cfg, resolve=True),
                                show_aux=any(moe_layer_pattern(cfg.model)))
        self.throughput = startup_report(self)
        # What the loop reads every step, as plain values (a DictConfig attribute read
        # costs ~10-30 us; the loop reads ~30 of them per step).
        self.tcfg, self.ccfg = OmegaConf.to_object(t), OmegaConf.to_object(cfg.checkpoint)
        self.expert_load_every = int(cfg.logger.expert_load_every)
        self.patch_dim = max(1, int(cfg.model.diffusion.patch_dim))

    # -- one step -------------------------------------------------------------------
    def _batches(self, mbs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """A step's micro-batches on the device, cut to this rank's part (CP)."""
        return [self.pm.shard_batch({k: v.to(self.device, non_blocking=True)
                                     for k, v in mb.items()}) for mb in mbs]

    def train_step(self) -> dict[str, Any]:
        t = self.tcfg
        if not self.model.training:  # .train() walks every module: only after evaluate()
            self.model.train()
        consumed = self.state.consumed_samples
        last = self.state.step + 1 >= t.max_steps
        mbs = self._batches(self.prefetch.get(
            consumed, None if last else consumed + t.global_batch_size))
        # Normalise by the counts of the whole global batch, so the objective (and its
        # gradient) does not depend on how the batch is split into micro-batches/ranks.
        norm = self.dims.all_reduce_sum(self.objective.counts(mbs), "dp_cp")
        sums = self.dims.all_reduce_sum(self.runner.run(mbs, norm, train=True), "dp_cp")
        modality_tokens = self.objective.modality_tokens(mbs)
        if modality_tokens is not None:
            modality_tokens = self.dims.all_reduce_sum(modality_tokens, "dp_cp")
        lr = self.scheduler.get_last_lr()[0]
        self.pm.dp.reduce_gradients()
        grad_norm = self.pm.dp.clip_grad_norm_(t.grad_clip if t.grad_clip > 0 else float("inf"))
        tokens = self.objective.tokens(norm, self.patch_dim)
        objective = self.objective.value(sums, norm)
        # NaN/Inf or spike: skip the update (all ranks agree); also reads the stop request.
        # The step's one host sync; the token count rides along (tokens/s every step).
        self.verdict = self.guard.check(self.state.step + 1, objective, grad_norm,
                                        self.stop.requested, tokens)
        if not self.verdict.skip:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # reduced over the layout's groups; updates expert biases (not on a skipped step)
        moe = self.pm.moe.pop(update_expert_bias=not self.verdict.skip)
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        metrics = {
            **self.objective.metrics(sums, norm),
            "objective": objective,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": self.verdict.tokens,
            "dispatch_mb_sent": moe.pop("dispatch_mb_sent"),
            **moe,
        }
        if modality_tokens is not None:
            metrics["modality_tokens"] = modality_tokens
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val_loss`` (the objective without aux losses) and, for multimodal data, the
        per-modality ``val_loss_<m>`` / ``val_diffusion_loss``."""
        t = self.cfg.trainer
        self.model.eval()
        sums = norm = 0
        for it in range(t.eval_iters):
            mbs = self._batches(self.data.valid_microbatches(
                it, t.micro_batch_size, self.dims.dp_rank, self.dims.dp_size))
            counts = self.objective.counts(mbs)
            sums = sums + self.runner.run(mbs, torch.ones_like(counts), train=False)
            norm = norm + counts
        self.pm.moe.reset()  # validation routing is not training load
        sums = self.dims.all_reduce_sum(sums, "dp_cp")
        norm = self.dims.all_reduce_sum(norm, "dp_cp")
        out = {"val_loss": self.objective.value(sums, norm)}
        if len(self.objective.groups) > 1 or self.objective.diffusion_weight is not None:
            out.update(self.objective.metrics(sums, norm, prefix="val_"))
            out.pop("val_lm_loss")
        return {k: float(v) for k, v in out.items()}

    # -- loop -----------------------------------------------------------------------
    def save_checkpoint(self, sync: bool = True) -> Path | None:
        """Checkpoint this step (in the background when ``checkpoint.async_save`` and not
        ``sync``); returns its path, None for non-finite parameters."""
        if self.trace is not None:  # the routing recorded so far survives a crash
            self.trace.flush()
        meta = {"model": OmegaConf.to_container(self.cfg.model, resolve=True),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "world_size": self.world_size}
        path = self.saver.save(sync=sync, ckpt_dir=self.cfg.checkpoint.dir, model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler,
                               train_state=self.state, meta=meta,
                               keep_last=self.cfg.checkpoint.keep_last, dims=self.dims)
        how = "writing checkpoint {} in the background" if self.saver.pending else (
            "saved checkpoint {}")
        self.logger.info(how.format(path) if path else
                         f"not saving step {self.state.step}: non-finite parameters")
        return path

    def _record(self, m: dict[str, Any], perf: dict[str, float], step: int, last: bool
                ) -> dict[str, float]:
        """The metrics.jsonl record of a step (validation included when due)."""
        from models.flops import training_flops_per_token
        from trainer.perf import at_flops_per_token, peak_memory

        t = self.tcfg
        modality_tokens = m.pop("modality_tokens", None)
        # every tensor metric in one device->host copy (a float() each would sync each)
        tensors = {k: v for k, v in m.items() if isinstance(v, torch.Tensor)}
        values = _to_host(list(tensors.values()))
        host = dict(zip(tensors, values))
        record = {k: host[k] if k in host else float(v) for k, v in m.items()}
        record["loss"] = record.pop("objective") + record["aux_loss"]
        if self.model_cfg.moe.num_null_experts and "real_experts_per_token" in record:
            # FLOPs of the real experts this step's tokens picked, not top_k's
            perf = at_flops_per_token(perf, self.throughput, training_flops_per_token(
                self.model_cfg, t.seq_len, record["real_experts_per_token"]))
        record.update(perf)
        if modality_tokens is not None:
            for name, n in zip(self.objective.groups, modality_tokens.tolist()):
                record[f"tokens_per_s_{name}"] = n / perf["step_time_s"]
        record.update(peak_memory(self.device))
        if self.verdict.skip:
            record.update(skipped=True, skip_cause=self.verdict.skip)
        if t.eval_every and (step % t.eval_every == 0 or last):
            self.watchdog.beat(f"validation at step {step}")
            record.update(self.evaluate())
        return record

    def fit(self) -> None:
        t, c = self.tcfg, self.ccfg
        steps_this_run = 0
        with self.logger, watch(self) as self.watchdog, collective_failure(self):
            if self.state.step >= t.max_steps:
                self.logger.info(f"already at step {self.state.step} >= trainer.max_steps")
            while self.state.step < t.max_steps:
                self.watchdog.beat(f"step {self.state.step + 1}", self.state.step)
                self.throughput.start_step()
                if self.trace is not None:
                    self.trace.before_step(self.state.step + 1)
                m = self.train_step()
                step = self.state.step
                perf = self.throughput.end_step(int(m["tokens"]))
                counts = m.pop("counts_LE", None)
                last = step == t.max_steps
                if step % t.log_every == 0 or last or self.verdict.skip:
                    self.logger.log_step(step, self._record(m, perf, step, last))
                every = self.expert_load_every
                if counts is not None and every and (step % every == 0 or last):
                    self.logger.log_expert_load(step, counts.float().cpu(), self.pm.moe.layer_ids)
                saved = (c.every and step % c.every == 0) or (last and c.save_final)
                if saved:
                    self.watchdog.beat(f"checkpoint at step {step}")
                    saved = self.save_checkpoint(sync=last)
                end_of_step(self, step, saved)  # divergence / preemption: RunStopped
                steps_this_run += 1
                if t.stop_after_steps and steps_this_run >= t.stop_after_steps:
                    self.logger.info(f"stopping after {steps_this_run} steps (stop_after_steps)")
                    break
            if self.trace is not None:
                self.trace.close()
            self.prefetch.close()
            path = self.saver.finish()  # a periodic checkpoint still written in the background
            if path is not None:
                self.logger.info(f"saved checkpoint {path}")


def run(cfg: DictConfig) -> None:
    """Validate ``cfg`` and train. A process group that exists already (a launcher's, a
    test harness's) is used and left alone; one this run creates is destroyed at the end."""
    check_torch()  # one line naming the version needed, before anything else
    # megatron's dataset builder is chatty at INFO; its warnings still show.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if cfg.trainer.dry_run:  # rank parallel.dry_run_rank on meta, memory.json, exit
        from trainer.dry_run import dry_run
        dry_run(cfg)
        return
    if cfg.parallel.auto:  # the planner picks the layout (trainer/planner.py)
        from trainer.planner import auto_layout
        line = auto_layout(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        if int(os.environ.get("RANK", 0)) == 0:
            print(line, flush=True)
    validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # before any process group
    had_group = dist.is_initialized()
    rank = int(os.environ.get("RANK", 0))
    try:  # one live run per run_dir
        with owned_run_dir(cfg.run_dir, cfg.checkpoint.lock_stale_after_s, rank):
            Trainer(cfg).fit()
    finally:
        if dist.is_initialized() and not had_group:
            dist.destroy_process_group()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    per_rank_logging(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    try:
        run(cfg)
    except UserError as e:
        report_user_error(e)
        sys.exit(2)
    except RunStopped as e:  # preempted (75), diverged (3), hung peer (4): docs/reliability.md
        exit_with(e)


def main() -> None:
    precheck_run_dir(sys.argv[1:])  # Hydra creates run_dir before run(): check it first
    _hydra_main()


if __name__ == "__main__":
    main()
