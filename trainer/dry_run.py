"""``python -m trainer.train trainer.dry_run=true parallel.world_size=N
[parallel.dry_run_rank=r] [parallel.gpu_memory_gib=G] <overrides>``.

Validates the config for ``N`` ranks, starts torch's fake process group as rank ``r`` of
``N`` (no communication, no other process), builds that rank's exact model through the
same ``parallelize()`` as training (PP stages, EP/ETP, TP, CP, AC, FSDP wrapping) on the
meta device without materialising anything, and writes the per-rank memory report of
``parallel/memory.py`` to ``<run_dir>/memory.json``. With ``G > 0`` it fails with
``error: needs X GiB on rank r, has G`` when the estimate does not fit.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from parallel.dims import ParallelDims
from parallel.memory import GIB, MemoryReport, estimate_memory
from trainer.config import moe_layer_pattern, validate
from trainer.errors import UserError

__all__ = ["dry_run", "dry_run_model", "dry_run_report"]


def dry_run_model(cfg: DictConfig) -> tuple[object, object]:
    """(model config, ``ParallelModel``) of rank ``parallel.dry_run_rank`` of
    ``parallel.world_size``, built on meta under a fake process group (destroyed again;
    the meta model and the pure rank math of its dims stay usable). The planner
    (trainer/planner.py) reuses this build for every micro-batch size and recompute
    setting of one layout shape."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.parallelize import parallelize

    p, t = cfg.parallel, cfg.trainer
    world = p.world_size or int(os.environ.get("WORLD_SIZE", 1))
    validate(cfg, world)
    if dist.is_initialized():
        raise UserError("trainer.dry_run=true runs in a single process, without a launcher")
    dist.init_process_group("fake", rank=p.dry_run_rank, world_size=world, store=FakeStore())
    try:
        dims = ParallelDims.from_config(p, world, rank=p.dry_run_rank)
        dims.build_meshes("cpu")
        num_micro = t.global_batch_size // (t.micro_batch_size * dims.dp_size)
        model_cfg = OmegaConf.to_object(cfg.model)
        pm = parallelize(model_cfg, p, dims, device=torch.device("cpu"), seed=t.seed,
                         seq_len=t.seq_len, num_micro=num_micro,
                         moe_pattern=moe_layer_pattern(cfg.model), materialize=False)
        return model_cfg, pm
    finally:
        dist.destroy_process_group()


def dry_run_report(cfg: DictConfig) -> MemoryReport:
    """Build rank ``parallel.dry_run_rank`` of ``parallel.world_size`` on meta under a fake
    process group and return its memory report (the group is destroyed again)."""
    model_cfg, pm = dry_run_model(cfg)
    return estimate_memory(model_cfg, cfg.parallel, cfg.trainer, pm)


def dry_run(cfg: DictConfig) -> MemoryReport:
    start = time.perf_counter()
    report = dry_run_report(cfg)
    out = report.to_dict()
    out["wall_s"] = round(time.perf_counter() - start, 3)
    out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(report.table())
    print(f"dry run: {out['wall_s']} s, max RSS {out['max_rss_mib']} MiB; "
          f"wrote {run_dir / 'memory.json'}")
    g = cfg.parallel.gpu_memory_gib
    if g and report.total_bytes > g * GIB:
        raise UserError(f"needs {report.total_bytes / GIB:.1f} GiB on rank "
                        f"{report.rank}, has {g:g}")
    return report
