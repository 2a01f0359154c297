"""The folding planner: every valid folded layout for a model and a cluster, ranked by the
estimated step time (``parallel.cost_model``) among those whose per-rank memory (the dry
run's ``parallel.memory.estimate_memory`` on the meta model built by
``trainer.dry_run.dry_run_model``) fits. Used by ``python -m scripts.plan`` and by
``parallel.auto=true`` (docs/planner.md).

Search space (pruned; every candidate then goes through ``trainer.config.validate``):
tp divides gpus_per_node (TP stays inside a node) and cp*tp <= gpus_per_node; pp any
divisor of the world with pp <= num_layers; schedules 1f1b (vpp 1), interleaved_1f1b
(vpp 2, 4), interleaved_zb (vpp 1, 2) and zbv (vpp 2) — gpipe is left out, it has 1F1B's
bubble and holds every micro-batch; ep any divisor of num_experts, etp a divisor of
gpus_per_node; micro-batch sizes 1, 2, 4; recompute off/on; dispatcher alltoall (dedup)
and allgather; the two-batch overlap off/on where it can run (ep > 1, alltoall,
``parallel.overlap``; it needs 2 micro-batches, an even count under PP, which
validation checks);
sequence parallel on whenever tp > 1. Memory is computed lazily in order
of estimated time, and only until ``plan.top`` candidates fit: the meta model is built
once per (pp, vpp, placement, tp, cp, ep, etp, dispatcher, rank) and reused for every
micro-batch size and recompute setting; ranks 0 and the first rank of the last stage are
checked (the first stage holds the most micro-batches, the last one the logits).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from models.config import experts_per_layer
from parallel.cost_model import Hardware, Layout, StepEstimate, step_time
from parallel.memory import GIB, estimate_memory
from parallel.pipeline import SCHEDULES
from trainer.config import Config, validate
from trainer.errors import ConfigError, UserError

__all__ = ["GPUS", "Candidate", "hardware", "parse_layout", "plan", "plan_from_config"]

log = logging.getLogger(__name__)

# Per GPU type: (trainer.perf GPU_PEAK_TFLOPS name, memory GiB, achievable fraction of
# the dense bf16 peak, NVLink GB/s per direction achievable, NIC GB/s achievable).
# Peaks: trainer.perf.GPU_PEAK_TFLOPS (NVIDIA datasheets, dense). Memory: H100 SXM 80 GB,
# H200 141 GB, HGX B200 180 GB, A100 80 GB (NVIDIA datasheets). NVLink: H100/H200 NVLink 4
# 900 GB/s and B200 NVLink 5 1.8 TB/s bidirectional per GPU, A100 NVLink 3 600 GB/s
# (datasheets) -> 450 / 900 / 300 GB/s per direction, times 0.8 for what NCCL's
# all-gather / reduce-scatter / all-to-all reach (nccl-tests busbw on DGX H100 ~360 GB/s).
# Inter-node: one 400 Gb/s ConnectX-7 NIC per GPU on DGX H100/H200/B200 (50 GB/s), one
# 200 Gb/s HDR NIC per GPU on DGX A100 (25 GB/s), times 0.8. Achievable matmul fraction:
# an assumption (cuBLAS reaches ~0.7-0.8 of the dense peak on large bf16 GEMMs; attention,
# grouped GEMMs and elementwise work pull it down; the MoE Parallel Folding paper's
# end-to-end 49.3% MFU on H100 for Mixtral-8x22B includes all communication).
# cpu: assumed numbers (fixed so that every rank of a parallel.auto run plans the same).
GPUS: dict[str, tuple[str, float, float, float, float]] = {
    "h100_80gb": ("H100", 80.0, 0.6, 360.0, 40.0),
    "h200": ("H200", 131.0, 0.6, 360.0, 40.0),
    "b200": ("B200", 167.0, 0.55, 720.0, 40.0),
    "a100_80gb": ("A100", 80.0, 0.65, 240.0, 20.0),
    "cpu": ("", 64.0, 1.0, 2.0, 1.0),
}
CPU_PEAK_TFLOPS = 0.1  # assumed; the trainer measures its own for MFU
SCHEDULE_VPP = [("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4),
                ("interleaved_zb", 1), ("interleaved_zb", 2), ("zbv", 2)]
MBS = (1, 2, 4)
LAYOUT_KEYS = ("tp", "cp", "pp", "vpp", "pp_schedule", "ep", "etp", "micro_batch_size",
               "recompute", "dispatcher", "two_batch")


def hardware(cluster: Any) -> Hardware:
    from trainer.perf import GPU_PEAK_TFLOPS

    if cluster.gpu not in GPUS:
        raise ConfigError(f"cluster.gpu={cluster.gpu!r} is not one of {', '.join(GPUS)} "
                          "(or set cluster.peak_tflops/memory_gib/*_gbps for another)")
    name, mem, ach, intra, inter = GPUS[cluster.gpu]
    peak = CPU_PEAK_TFLOPS
    if name:
        peak = next(p[0] for pat, _, p in GPU_PEAK_TFLOPS if re.search(pat, name))
    return Hardware(peak_flops=(cluster.peak_tflops or peak) * 1e12,
                    achievable=cluster.achievable_fraction or ach,
                    gpus_per_node=cluster.gpus_per_node,
                    intra_gbps=cluster.intra_node_gbps or intra,
                    inter_gbps=cluster.inter_node_gbps or inter,
                    memory_gib=cluster.memory_gib or mem)


@dataclasses.dataclass
class Candidate:
    layout: Layout
    estimate: StepEstimate
    memory_gib: Optional[float] = None
    fits: Optional[bool] = None
    memory: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"tp": lay.tp, "cp": lay.cp, "dp": lay.dp, "pp": lay.pp, "vpp": lay.vpp,
                "pp_schedule": lay.pp_schedule, "ep": lay.ep, "etp": lay.etp,
                "edp": lay.edp, "micro_batch_size": lay.micro_batch_size,
                "recompute": lay.recompute, "dispatcher": lay.dispatcher,
                "two_batch": lay.two_batch,
                "memory_gib": None if self.memory_gib is None else round(self.memory_gib, 3),
                "step_time_s": self.estimate.step_time_s, "mfu": self.estimate.mfu,
                "fits": self.fits,
                "breakdown": {k: v for k, v in self.estimate.breakdown.items()},
                "hidden": dict(self.estimate.hidden),
                "memory": self.memory}

    def short(self) -> str:
        lay = self.layout
        return (f"tp={lay.tp} cp={lay.cp} dp={lay.dp} pp={lay.pp} vpp={lay.vpp} "
                f"pp_schedule={lay.pp_schedule} ep={lay.ep} etp={lay.etp} edp={lay.edp} "
                f"micro_batch_size={lay.micro_batch_size} recompute={lay.recompute} "
                f"dispatcher={lay.dispatcher} two_batch={lay.two_batch}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def apply_layout(base: Config, lay: Layout) -> Config:
    """``base`` with the layout's keys set (a new Config; base untouched)."""
    p = dataclasses.replace(
        base.parallel, tp=lay.tp, cp=lay.cp, pp=lay.pp, vpp=lay.vpp,
        pp_schedule=lay.pp_schedule, ep=lay.ep, etp=lay.etp, dispatcher=lay.dispatcher,
        activation_checkpointing=lay.recompute, sequence_parallel=lay.tp > 1,
        two_batch_overlap=lay.two_batch,
        world_size=lay.world, dry_run_rank=0, pp_layers=None, auto=False)
    t = dataclasses.replace(base.trainer, micro_batch_size=lay.micro_batch_size)
    return dataclasses.replace(base, parallel=p, trainer=t)


def enumerate_layouts(base: Config, world: int, gpus_per_node: int,
                      fixed: dict[str, Any] | None = None) -> Iterator[Layout]:
    """The pruned grid (module docstring); ``fixed`` keys keep their value."""
    fixed = fixed or {}
    m = base.model
    # ep must divide every MoE layer's expert count (pyramid MoE): divisors of their gcd
    E = math.gcd(*experts_per_layer(m))
    G = min(gpus_per_node, world)

    def opts(key: str, values):
        return [fixed[key]] if key in fixed else list(values)

    tps = opts("tp", _divisors(G))
    cps = opts("cp", _divisors(G))
    pps = opts("pp", [d for d in _divisors(world) if d <= m.num_layers])
    eps = opts("ep", _divisors(E) if E else [1])
    etps = opts("etp", _divisors(G) if E else [1])
    mbss = opts("micro_batch_size", MBS)
    recs = opts("recompute", (False, True))
    disps = opts("dispatcher", ("alltoall", "allgather") if E else ("alltoall",))
    overlap = bool(base.parallel.overlap)
    can_pair = overlap
    pairs = opts("two_batch", (False, True))
    sched = [(s, v) for s, v in SCHEDULE_VPP
             if fixed.get("pp_schedule", s) == s and fixed.get("vpp", v) == v]
    if "pp_schedule" in fixed and not sched:
        sched = [(fixed["pp_schedule"], fixed.get("vpp", 1))]
    for pp, tp, cp, ep, etp in itertools.product(pps, tps, cps, eps, etps):
        if world % pp or (world // pp) % (tp * cp) or (world // pp) % (ep * etp):
            continue
        if "tp" not in fixed and "cp" not in fixed and tp * cp > G:
            continue
        scheds = [("1f1b", 1)] if pp == 1 else sched
        if pp == 1 and ("pp_schedule" in fixed or "vpp" in fixed):
            scheds = [(fixed.get("pp_schedule", "1f1b"), fixed.get("vpp", 1))]
        for (s, v), mbs, rec, disp, tb in itertools.product(scheds, mbss, recs, disps, pairs):
            if ep == 1 and disp != "alltoall":
                continue
            if tb and "two_batch" not in fixed and not (
                    can_pair and ep > 1 and disp == "alltoall"):
                continue  # nothing for it to overlap, or a layout it does not run on
            yield Layout(world=world, tp=tp, cp=cp, pp=pp, vpp=v, pp_schedule=s, ep=ep,
                         etp=etp, micro_batch_size=mbs, recompute=rec, dispatcher=disp,
                         overlap=overlap, two_batch=tb)


class MemoryModel:
    """Per-rank memory of a layout: ``estimate_memory`` on the dry run's meta model, one
    build per shape (module docstring), max over the checked ranks."""

    def __init__(self, base: Config):
        self.base, self.builds, self._cache = base, 0, {}
        self.build_s = 0.0

    def _pm(self, cand_cfg: Config, rank: int):
        from trainer.dry_run import dry_run_model

        p = cand_cfg.parallel
        style = SCHEDULES[p.pp_schedule].style if p.pp > 1 else "single"
        key = (p.pp, p.vpp, style, p.tp, p.cp, p.ep, p.etp, p.dispatcher, rank)
        if key not in self._cache:
            start = time.perf_counter()
            c = dataclasses.replace(cand_cfg, parallel=dataclasses.replace(p, dry_run_rank=rank))
            self._cache[key] = dry_run_model(OmegaConf.structured(c))
            self.builds += 1
            self.build_s += time.perf_counter() - start
        return self._cache[key]

    def __call__(self, cand_cfg: Config, lay: Layout) -> tuple[float, dict]:
        ranks = [0] if lay.pp == 1 else [0, lay.world - lay.world // lay.pp]
        worst, rep = -1.0, None
        for r in ranks:
            model_cfg, pm = self._pm(cand_cfg, r)
            num_micro = cand_cfg.trainer.global_batch_size // (lay.micro_batch_size * lay.dp)
            view = SimpleNamespace(dims=pm.dims, model=pm.model, pp_split=pm.pp_split,
                                   num_micro=num_micro)
            report = estimate_memory(model_cfg, cand_cfg.parallel, cand_cfg.trainer, view)
            if report.total_bytes > worst:
                worst, rep = report.total_bytes, report
        d = {k: getattr(rep, k) for k in ("rank", "params_bytes", "grads_bytes",
                                          "optimizer_bytes", "activations_bytes",
                                          "buffers_bytes", "total_bytes")}
        return worst / GIB, d


def _reason(err: str) -> str:
    """A short bucket for a validation message: the first config key it names."""
    keys = re.findall(r"\b(?:parallel|trainer|model)\.[a-z_.]+", err)
    return keys[0].rstrip(".") if keys else err[:40]


def parse_layout(text: str, base: Config, world: int) -> Layout:
    """``"tp=2 pp=8 vpp=1 ep=8 etp=1 cp=1 micro_batch_size=1 recompute=false
    pp_schedule=1f1b dispatcher=alltoall two_batch=false"`` (aliases: mbs, schedule, ac,
    two_batch_overlap); missing keys take the config's values."""
    alias = {"mbs": "micro_batch_size", "schedule": "pp_schedule", "ac": "recompute",
             "activation_checkpointing": "recompute", "two_batch_overlap": "two_batch"}
    p, t = base.parallel, base.trainer
    vals: dict[str, Any] = dict(tp=p.tp, cp=p.cp, pp=p.pp, vpp=p.vpp, pp_schedule=p.pp_schedule,
                                ep=p.ep, etp=p.etp, micro_batch_size=t.micro_batch_size,
                                recompute=p.activation_checkpointing, dispatcher=p.dispatcher,
                                two_batch=p.two_batch_overlap)
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise ConfigError(f"plan.layout: {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = alias.get(k, k)
        if k in ("dp", "edp"):
            continue  # derived; accepted for copy-paste from the table
        if k not in vals:
            raise ConfigError(f"plan.layout: unknown key {k!r} (valid: {', '.join(LAYOUT_KEYS)})")
        if k in ("pp_schedule", "dispatcher"):
            vals[k] = v
        elif k in ("recompute", "two_batch"):
            vals[k] = v.lower() in ("1", "true", "yes", "on")
        else:
            vals[k] = int(v)
    return Layout(world=world, overlap=bool(p.overlap), **vals)


def _base_config(cfg: DictConfig | Config) -> Config:
    if isinstance(cfg, Config):
        return cfg
    c = OmegaConf.to_object(cfg)
    return c


def plan(cfg: DictConfig | Config, world: int, *, layout: str = "", top: int = 10,
         fixed: dict[str, Any] | None = None, check_memory: bool = True) -> dict[str, Any]:
    """The plan (``plan.json``'s content, see docs/planner.md)."""
    base = _base_config(cfg)
    hw = hardware(base.cluster)
    usable = hw.memory_gib * base.plan.usable_memory_fraction
    mem = MemoryModel(base)
    t = base.trainer
    out: dict[str, Any] = {"world": world, "gpus_per_node": hw.gpus_per_node,
                           "gpu": base.cluster.gpu, "model": base.model.name,
                           "seq_len": t.seq_len, "global_batch_size": t.global_batch_size,
                           "memory_budget_gib": usable,
                           "hardware": dataclasses.asdict(hw)}
    start = time.perf_counter()

    def evaluate(lay: Layout) -> tuple[Optional[Candidate], Optional[str]]:
        c = apply_layout(base, lay)
        try:
            validate(c, world)
        except ConfigError as e:
            return None, str(e)
        est = step_time(base.model, lay, hw, t.seq_len, t.global_batch_size)
        return Candidate(lay, est), None

    if layout:
        lay = parse_layout(layout, base, world)
        cand, err = evaluate(lay)
        if cand is None:
            raise ConfigError(f"plan.layout {layout!r} is not valid for {world} ranks: {err}")
        cand.memory_gib, cand.memory = mem(apply_layout(base, lay), lay)
        cand.fits = cand.memory_gib <= usable
        out["evaluated"] = cand.to_dict()
        out["wall_s"] = round(time.perf_counter() - start, 2)
        return out

    ruled: Counter = Counter()
    valid: list[Candidate] = []
    n = 0
    for lay in enumerate_layouts(base, world, hw.gpus_per_node, fixed):
        n += 1
        cand, err = evaluate(lay)
        if cand is None:
            ruled[f"invalid: {_reason(err)}"] += 1
        else:
            valid.append(cand)
    # deterministic order: time, then the layout's fields
    valid.sort(key=lambda c: (c.estimate.step_time_s, dataclasses.astuple(c.layout)))
    fitting: list[Candidate] = []
    too_big: list[Candidate] = []
    stopped = ""
    for i, cand in enumerate(valid):
        if len(fitting) >= top:
            ruled["not checked: slower than the top candidates"] += len(valid) - i
            break
        if not check_memory:
            cand.fits = True
            fitting.append(cand)
            continue
        if mem.builds >= base.plan.max_builds:
            stopped = (f"stopped after {mem.builds} meta-model builds (plan.max_builds); "
                       f"{len(valid) - i} candidates not checked")
            ruled["not checked: plan.max_builds reached"] += len(valid) - i
            break
        cand.memory_gib, cand.memory = mem(apply_layout(base, cand.layout), cand.layout)
        cand.fits = cand.memory_gib <= usable
        if cand.fits:
            fitting.append(cand)
        else:
            too_big.append(cand)
            ruled[f"does not fit in {usable:g} GiB"] += 1
    out.update(enumerated=n, valid=len(valid), ruled_out=dict(sorted(ruled.items())),
               builds=mem.builds, build_s=round(mem.build_s, 2),
               candidates=[c.to_dict() for c in fitting],
               too_big=[c.to_dict() for c in too_big[:top]],
               stopped=stopped, wall_s=round(time.perf_counter() - start, 2))
    if not fitting:
        smallest = min(too_big, key=lambda c: c.memory_gib, default=None)
        why = (f"; the smallest needs {smallest.memory_gib:.1f} GiB per GPU "
               f"({smallest.short()})" if smallest else
               f" ({len(valid)} valid layouts of {n})")
        out["error"] = (f"{base.model.name} fits no layout on {world} x {base.cluster.gpu} "
                        f"(budget {usable:.1f} GiB per GPU){why}")
    return out


def table(result: dict[str, Any]) -> str:
    """The console view of a plan."""
    lines = []
    head = (f"{'#':>3} {'tp':>3} {'cp':>3} {'dp':>4} {'pp':>3} {'vpp':>3} {'schedule':<16} "
            f"{'ep':>3} {'etp':>3} {'edp':>4} {'mbs':>3} {'ac':>3} {'disp':<9} {'2mb':>3} "
            f"{'GiB':>7} {'step s':>8} {'MFU':>6}  top terms")

    def row(i, c):
        b = sorted(c["breakdown"].items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k} {v:.3g}" for k, v in b)
        mem = "-" if c["memory_gib"] is None else f"{c['memory_gib']:.1f}"
        return (f"{i:>3} {c['tp']:>3} {c['cp']:>3} {c['dp']:>4} {c['pp']:>3} {c['vpp']:>3} "
                f"{c['pp_schedule']:<16} {c['ep']:>3} {c['etp']:>3} {c['edp']:>4} "
                f"{c['micro_batch_size']:>3} {'on' if c['recompute'] else 'off':>3} "
                f"{c['dispatcher']:<9} {'on' if c['two_batch'] else 'off':>3} {mem:>7} "
                f"{c['step_time_s']:>8.3f} "
                f"{100 * c['mfu']:>5.1f}%  {terms}")

    lines.append(f"plan for {result['model']} on {result['world']} x {result['gpu']} "
                 f"({result['gpus_per_node']} per node), seq {result['seq_len']}, global "
                 f"batch {result['global_batch_size']}, memory budget "
                 f"{result['memory_budget_gib']:.1f} GiB")
    if "evaluated" in result:
        c = result["evaluated"]
        lines += [head, row(1, c), "step time breakdown (s): " + ", ".join(
            f"{k} {v:.4g}" for k, v in c["breakdown"].items()),
            "hidden behind compute (s, not in the step time): " + (", ".join(
                f"{k} {v:.4g}" for k, v in c["hidden"].items()) or "none"),
            "memory (GiB, worst checked rank {}): ".format(c["memory"].get("rank")) + ", ".join(
                f"{k.removesuffix('_bytes')} {v / GIB:.2f}" for k, v in c["memory"].items()
                if k.endswith("_bytes")),
            f"fits: {c['fits']}"]
        return "\n".join(lines)
    lines.append(head)
    for i, c in enumerate(result["candidates"], 1):
        lines.append(row(i, c))
    lines.append(f"{result['enumerated']} layouts enumerated, {result['valid']} valid; "
                 f"{result['builds']} meta-model builds ({result['build_s']} s); "
                 f"{result['wall_s']} s")
    for k, v in result["ruled_out"].items():
        lines.append(f"  ruled out: {v:>6}  {k}")
    if result.get("stopped"):
        lines.append("  " + result["stopped"])
    return "\n".join(lines)


def plan_from_config(cfg: DictConfig, world: int) -> dict[str, Any]:
    """What ``scripts.plan`` computes for ``cfg`` (cluster.gpus or ``world``)."""
    base = _base_config(cfg)
    return plan(base, world, layout=base.plan.layout, top=base.plan.top)


def fixed_keys(p: Any, t: Any) -> dict[str, Any]:
    """parallel.auto: the sizes the user set (differ from the schema default) stay fixed."""
    fixed = {k: getattr(p, k) for k in ("tp", "cp", "pp", "vpp", "ep", "etp")
             if getattr(p, k) != 1}
    if p.pp_schedule != "1f1b":
        fixed["pp_schedule"] = p.pp_schedule
    fixed["micro_batch_size"] = t.micro_batch_size  # the numerics of a run stay the user's
    if p.two_batch_overlap:
        fixed["two_batch"] = True
    return fixed


def auto_layout(cfg: DictConfig, world: int) -> str:
    """``parallel.auto=true``: choose the best layout for ``world`` ranks and write it into
    ``cfg.parallel`` (in place); returns the log line. Every rank computes the same plan
    (no communication; the CPU type's throughput is a fixed assumption). Memory is checked
    on the dry run's meta model unless a process group already exists (a test harness):
    then only the cost model ranks."""
    import torch.distributed as dist

    base = _base_config(cfg)
    base = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel,
                                                                  world_size=world))
    fixed = fixed_keys(base.parallel, base.trainer)
    result = plan(base, world, top=1, fixed=fixed, check_memory=not dist.is_initialized())
    if not result["candidates"]:
        raise UserError(result.get("error") or f"parallel.auto: no valid layout for {world} "
                        f"ranks with {fixed}")
    best = result["candidates"][0]
    with_flag = OmegaConf.is_struct(cfg)
    OmegaConf.set_struct(cfg, False)
    try:
        p = cfg.parallel
        for k in ("tp", "cp", "pp", "vpp", "pp_schedule", "ep", "etp", "dispatcher"):
            p[k] = best[k]
        p.activation_checkpointing = best["recompute"]
        p.two_batch_overlap = best["two_batch"]
        p.sequence_parallel = best["tp"] > 1
        p.pp_layers = None
        cfg.trainer.micro_batch_size = best["micro_batch_size"]
    finally:
        OmegaConf.set_struct(cfg, with_flag)
    mem = "memory not checked" if best["memory_gib"] is None else \
        f"{best['memory_gib']:.2f} GiB"
    return (f"parallel.auto: {world} ranks of {base.cluster.gpu} -> "
            f"{Candidate(Layout(world=world, **{k: best[k] for k in LAYOUT_KEYS}), StepEstimate(0, 0)).short()}"
            f" (fixed: {fixed or 'none'}); estimated step {best['step_time_s']:.4g} s, "
            f"MFU {100 * best['mfu']:.1f}%, {mem}; {result['valid']} valid layouts")

