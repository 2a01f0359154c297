"""Entry point: ``python -m trainer.train [hydra overrides]`` (also ``moefold-train``).

Order of work, so that mistakes are cheap: compose + validate the config (before any
process group), then set up processes, data, model, optimizer, resume, and loop.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from models.config import MODALITY_ARCHS
from parallel.dims import ParallelDims
from trainer import checkpoint as ckpt
from trainer.config import moe_layer_pattern, register_configs, validate
from trainer.errors import UserError

register_configs()


def _device(cfg: DictConfig) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but torch.cuda.is_available() is False")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


class Trainer:
    """Holds everything for one run; ``fit()`` runs the loop."""

    def __init__(self, cfg: DictConfig):
        # Imports that pull in heavy packages stay here so `--help`/validation is fast.
        from models.flops import param_counts, training_flops_per_token
        from models.moe import set_aux_loss_scale
        from parallel.parallelize import parallelize
        from trainer.data import build_data
        from trainer.optim import build_optimizer, build_scheduler
        from trainer.perf import Throughput, peak_flops_per_device, reuse_freed_cpu_memory
        from trainer.run_logger import RunLogger

        self.cfg = cfg
        t = cfg.trainer
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = _device(cfg)
        if self.device.type == "cpu":
            reuse_freed_cpu_memory()  # no unmap/page-fault of big activations every step
        self.amp_dtype = _autocast_dtype(cfg, self.device)
        self.run_dir = Path(cfg.run_dir)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world_size, rank=self.rank)
        if self.world_size > 1:
            init_distributed(self.device)
            self.dims.build_meshes(self.device.type)
        self.dp_size, self.dp_rank = self.dims.dp_size, self.dims.dp_rank
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)

        # Resume target first: a bad checkpoint path must fail before data/model work.
        self.resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.dir)

        valid_batches = 0
        if t.eval_every:
            valid_batches = (t.max_steps // t.eval_every + 1) * t.eval_iters
        if cfg.data.source == "multimodal":
            from trainer.multimodal import build_multimodal

            self.data = build_multimodal(cfg.data, seq_len=t.seq_len, seed=t.seed,
                                         global_batch_size=t.global_batch_size,
                                         model_cfg=cfg.model)
        else:
            self.data = build_data(
                cfg.data,
                seq_len=t.seq_len,
                seed=t.seed,
                global_batch_size=t.global_batch_size,
                train_samples=t.max_steps * t.global_batch_size,
                valid_samples=valid_batches * t.global_batch_size,
                model_vocab_size=cfg.model.vocab_size,
                rank=self.rank,
                world_size=self.world_size,
            )
        from trainer.objective import Objective

        multimodal = cfg.data.source == "multimodal"
        self.modalities = list(cfg.data.modalities) if multimodal else []
        diffusion = cfg.model.diffusion
        self.objective = Objective(
            self.modalities or ["text"],
            diffusion.loss_weight if cfg.model.arch in MODALITY_ARCHS and diffusion.patch_dim
            else None,
            tp=self.dims.tp > 1,
            no_lm=("image",) if cfg.data.get("setting") == "transfusion" else ())

        model_cfg = OmegaConf.to_object(cfg.model)
        pm = parallelize(model_cfg, cfg.parallel, self.dims, device=self.device, seed=t.seed,
                         seq_len=t.seq_len, num_micro=self.num_micro,
                         moe_pattern=moe_layer_pattern(cfg.model))
        self.model, self.dp, self.pp_split = pm.model, pm.dp, pm.pp_split
        self.moe_layer_ids, self.moe_local_pos = pm.moe_layer_ids, pm.moe_local_pos
        model = self.model
        self.moe_layers = model.moe_layers()
        set_aux_loss_scale(model, 1.0 / (self.num_micro * self.dp_size))

        self.optimizer = build_optimizer(model, cfg.optim)
        self.pipeline = None
        if self.pp_split is not None:
            from parallel.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(
                pm.chunks, self.pp_split, schedule=cfg.parallel.pp_schedule,
                n_microbatches=self.num_micro, objective=self.objective,
                arch=cfg.model.arch,
                discard=self._discard_pass, device=self.device, group=self.dims.group("pp"),
            )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.state = ckpt.TrainState()
        if self.resume_from is not None:
            self.state = ckpt.load(
                self.resume_from,
                model=model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                expected_model=OmegaConf.to_container(cfg.model, resolve=True),
                dims=self.dims,
            )

        self.flops_per_token = training_flops_per_token(model_cfg, t.seq_len)
        peak, peak_src = peak_flops_per_device(
            self.device, self.amp_dtype or torch.float32, t.peak_tflops
        )
        self.throughput = Throughput(
            flops_per_token=self.flops_per_token, peak_flops=peak, world_size=self.world_size
        )
        self.logger = RunLogger(
            cfg.logger,
            self.run_dir,
            is_main=self.rank == 0,
            total_steps=t.max_steps,
            start_step=self.state.step,
            run_config=OmegaConf.to_container(cfg, resolve=True),
        )
        total, active = param_counts(model_cfg)  # analytic: shards would undercount
        self.logger.info(
            f"model {cfg.model.name}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M "
            f"active), {len(self.moe_layers)} MoE layers; "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token; peak {peak / 1e12:.2f} TFLOP/s "
            f"({peak_src}); device {self.device}"
        )
        if cfg.model.arch in MODALITY_ARCHS:
            from models.flops import flops_per_token_by_modality

            per = flops_per_token_by_modality(model_cfg, t.seq_len)
            self.logger.info("MFLOP/token per modality: " + ", ".join(
                f"{k} {v / 1e6:.2f}" for k, v in per.items()))
        if self.world_size > 1:
            self.logger.info(self.dims.describe())
        if pm.pp_report:
            self.logger.info(pm.pp_report)
        if self.resume_from is not None:
            self.logger.info(
                f"resumed from {self.resume_from} at step {self.state.step} "
                f"({self.state.consumed_samples} samples consumed)"
            )

    # -- one step -------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _forward_sums(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's sums [G + 1] of one micro-batch (trainer/objective.py)."""
        from trainer.objective import model_kwargs

        with self._autocast():
            out = self.model(mb["tokens"], **model_kwargs(mb, self.cfg.model.arch))
        return self.objective.sums(out, mb)

    def _modality_tokens(self, mbs: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """Input positions per modality in the global batch (for tokens/s per modality)."""
        if not self.modalities:
            return None
        M = len(self.modalities)
        c = sum(torch.bincount(mb["modality_ids"].flatten(), minlength=M)[:M] for mb in mbs)
        return self._sum_over(c.float(), "dp_cp")

    def _discard_pass(self) -> None:
        """Undo a pass whose results must not count (the pipeline's shape-inference pass)."""
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.moe_layers:
            layer.pop_stats()

    def _to_device(self, mbs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Move a step's micro-batches to the device; under CP keep this rank's part of
        every sequence (parallel/context_parallel.py)."""
        out = [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in mbs]
        if self.dims.cp > 1:
            from parallel.context_parallel import shard_batch

            cp_rank = self.dims.coords()["cp"]
            out = [shard_batch(mb, self.dims.cp, cp_rank) for mb in out]
        return out

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.trainer
        self.model.train()
        mbs = self._to_device(
            self.data.train_microbatches(
                self.state.consumed_samples, t.micro_batch_size, self.dp_rank, self.dp_size
            )
        )
        # Normalise by the counts of the whole global batch, so the objective (and its
        # gradient) does not depend on how the batch is split into micro-batches/ranks.
        norm = self._sum_over(self.objective.counts(mbs), "dp_cp")
        sums = torch.zeros_like(norm)
        sent = 0  # activation bytes this rank's dispatchers sent (host ints, no sync)
        if self.pipeline is not None:
            sums = self._sum_over(
                self.pipeline.run(mbs, norm, train=True, autocast=self._autocast), "pp")
            # the dispatchers keep the last micro-batch's counts: an estimate under PP
            sent = len(mbs) * sum(layer.dispatcher.bytes_sent for layer in self.moe_layers)
        else:
            for mb in mbs:
                mb_sums = self._forward_sums(mb)
                self.objective.value(mb_sums, norm).backward()
                sums += mb_sums.detach()
                sent += sum(layer.dispatcher.bytes_sent for layer in self.moe_layers)
        sums = self._sum_over(sums, "dp_cp")
        modality_tokens = self._modality_tokens(mbs)
        lr = self.scheduler.get_last_lr()[0]
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        self.dp.reduce_gradients()
        grad_norm = self.dp.clip_grad_norm_(max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        moe = self._pop_moe_stats()
        if self.moe_layer_ids:
            for pos, layer in zip(self.moe_local_pos, self.moe_layers):
                layer.update_expert_bias(moe["counts_LE"][pos])
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        metrics = {
            **self.objective.metrics(sums, norm),
            "objective": self.objective.value(sums, norm),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": self.objective.tokens(norm, max(1, self.cfg.model.diffusion.patch_dim)),
            "dispatch_mb_sent": sent / 2**20,
            **moe,
        }
        if modality_tokens is not None:
            metrics["modality_tokens"] = modality_tokens
        return metrics

    _STAT_KEYS = ("dropped", "assignments", "aux_loss", "seq_aux_loss", "z_loss")

    def _pop_moe_stats(self) -> dict[str, Any]:
        """Every MoE layer's statistics since the last call, summed over the ranks holding
        different tokens and gathered over pipeline stages: one collective per group."""
        if not self.moe_layer_ids:
            return {"aux_loss": 0.0}
        E, keys = self.cfg.model.moe.num_experts, self._STAT_KEYS
        table = torch.zeros(len(self.moe_layer_ids), E + len(keys), device=self.device)
        for pos, layer in zip(self.moe_local_pos, self.moe_layers):
            s = layer.pop_stats()
            table[pos] = torch.cat([s["counts"], torch.stack([s[k].float() for k in keys])])
        # The router sums its statistics over its token group (TP, and CP, ranks), so
        # each is complete on every member: add up the data-parallel replicas only.
        table = self._sum_over(self._sum_over(table, "dp"), "pp")
        counts = table[:, :E]
        col = {k: table[:, E + i] for i, k in enumerate(keys)}
        per_layer_max_over_mean = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        return {
            "aux_loss": (col["aux_loss"] + col["seq_aux_loss"] + col["z_loss"]).sum(),
            "load_balance_loss": col["aux_loss"].sum(),
            "seq_aux_loss": col["seq_aux_loss"].sum(),
            "z_loss": col["z_loss"].sum(),
            "expert_load_max": per_layer_max_over_mean.max(),
            "expert_load_mean_max": per_layer_max_over_mean.mean(),
            "dropped_frac": col["dropped"].sum() / col["assignments"].sum().clamp_min(1),
            "counts_LE": counts,
        }

    def _sum_over(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """Sum over a rank group: ``dp_cp`` (ranks holding different tokens), ``dp`` (token
        groups: TP/CP members already hold the group's sums) or ``pp`` (different layers)."""
        if self.dims.size(group) > 1:
            x = x.clone()
            dist.all_reduce(x, group=self.dims.group(group))
        return x

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val_loss`` (the objective without aux losses) and, for multimodal data, the
        per-modality ``val_loss_<m>`` / ``val_diffusion_loss``."""
        t = self.cfg.trainer
        self.model.eval()
        sums = norm = 0
        for it in range(t.eval_iters):
            mbs = self._to_device(
                self.data.valid_microbatches(it, t.micro_batch_size, self.dp_rank, self.dp_size)
            )
            counts = self.objective.counts(mbs)
            if self.pipeline is not None:  # the loss lands on the last stage only
                sums = sums + self.pipeline.run(mbs, torch.ones_like(counts), train=False,
                                                autocast=self._autocast)
            else:
                sums = sums + sum(self._forward_sums(mb) for mb in mbs)
            norm = norm + counts
        self._pop_moe_stats()  # validation routing is not training load
        sums = self._sum_over(self._sum_over(sums, "pp"), "dp_cp")
        norm = self._sum_over(norm, "dp_cp")
        out = {"val_loss": self.objective.value(sums, norm)}
        if self.modalities or self.objective.diffusion_weight is not None:
            out.update(self.objective.metrics(sums, norm, prefix="val_"))
            out.pop("val_lm_loss")
        return {k: float(v) for k, v in out.items()}

    # -- loop -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        path = ckpt.save(
            self.cfg.checkpoint.dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_state=self.state,
            meta={
                "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "world_size": self.world_size,
            },
            keep_last=self.cfg.checkpoint.keep_last,
            dims=self.dims,
        )
        self.logger.info(f"saved checkpoint {path}")

    def fit(self) -> None:
        from trainer.perf import peak_memory

        t, c = self.cfg.trainer, self.cfg.checkpoint
        steps_this_run = 0
        with self.logger:
            if self.state.step >= t.max_steps:
                self.logger.info(f"already at step {self.state.step} >= trainer.max_steps")
            while self.state.step < t.max_steps:
                self.throughput.start_step()
                m = self.train_step()
                step = self.state.step
                m["tokens"] = m["tokens"].item()  # one host sync per step
                perf = self.throughput.end_step(int(m["tokens"]))
                counts = m.pop("counts_LE", None)
                modality_tokens = m.pop("modality_tokens", None)
                last = step == t.max_steps
                if step % t.log_every == 0 or last:
                    record = {k: float(v) for k, v in m.items()}
                    record["loss"] = record.pop("objective") + record["aux_loss"]
                    record.update(perf)
                    if modality_tokens is not None:
                        for name, n in zip(self.modalities, modality_tokens.tolist()):
                            record[f"tokens_per_s_{name}"] = n / perf["step_time_s"]
                    record.update(peak_memory())
                    if t.eval_every and (step % t.eval_every == 0 or last):
                        record.update(self.evaluate())
                    self.logger.log_step(step, record)
                every = self.cfg.logger.expert_load_every
                if counts is not None and every and (step % every == 0 or last):
                    self.logger.log_expert_load(step, counts.float().cpu(), self.moe_layer_ids)
                if (c.every and step % c.every == 0) or (last and c.save_final):
                    self.save_checkpoint()
                steps_this_run += 1
                if t.stop_after_steps and steps_this_run >= t.stop_after_steps:
                    self.logger.info(f"stopping after {steps_this_run} steps (stop_after_steps)")
                    break


def init_distributed(device: torch.device) -> None:
    """NCCL on CUDA, gloo on CPU: the same code path either way."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def run(cfg: DictConfig) -> None:
    # megatron's dataset builder is chatty at INFO; its warnings still show.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate(cfg, world_size)  # before any process group or heavy work
    # Destroy only a process group this run created (a caller may run several trainings
    # in one group, e.g. the in-process test harness).
    created = world_size > 1 and not dist.is_initialized()
    try:
        Trainer(cfg).fit()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

