"""Pipeline parallelism on ``torch.distributed.pipelining`` (no hand-written schedules).

The model is cut by layers into ``pp * vpp`` stages. Stage ``s`` runs on pipeline rank
``s % pp`` for the looped schedules (each rank holds ``vpp`` stages, Megatron's virtual
pipeline) and on ``s`` / ``2*pp-1-s`` for the V-shaped zero-bubble schedule, where rank 0
holds both the first and the last stage.

Modules. A rank's *stage module* is a ``Transformer`` holding only its own layers (the
``layers`` ModuleDict keeps the global keys, so parameter names — and
therefore checkpoints, seeded initialisation and the expert-load plots — are the same as in
the unsplit model), ``tok_embeddings`` only if it holds stage 0 and ``norm`` + ``output``
only if it holds the last stage. TP, EP, activation checkpointing, the optimizer and
checkpoints work on it exactly as on a whole model. With ``vpp > 1`` the schedule runs
*chunks*: one module per local stage that shares the stage module's submodules (no copy)
and runs the model's own ``forward`` over its layers. The DP engine makes each chunk an
FSDP root, so ``PipelineStage`` can defer the gradient reduce-scatter to the last
micro-batch, as it does for one stage per rank.

Loss: the last stage's ``loss_fn`` returns ``sum of token losses / tokens of the global
batch`` per micro-batch and the schedule does not rescale (``scale_grads=False``), the
same objective as without PP. MoE aux losses need nothing special: they enter the graph
through an identity autograd function on each MoE layer's output (models/moe.py), so the
stage backward — full, or split into input and weight halves by the zero-bubble
schedules — delivers their gradients to that stage's routers whatever order the schedule
runs it in; their logged values are summed over the pipeline ranks by
``parallel.moe_stats.MoEStats``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import nn

from models.inputs import model_kwargs
from parallel.moe_stats import MoEStats

__all__ = [
    "SCHEDULES",
    "PipelineRunner",
    "PipelineSplit",
    "bubble_fraction",
    "build_schedule",
    "check_microbatches",
    "check_pipeline",
    "split_layers",
    "stage_chunks",
    "stage_class",
    "stage_module",
]


class ScheduleInfo(NamedTuple):
    torch_class: str
    style: str  # "single" (one stage per rank), "loop" (stage s on rank s % pp) or "v"
    zero_bubble: bool = False


SCHEDULES = {
    "gpipe": ScheduleInfo("ScheduleGPipe", "single"),
    "1f1b": ScheduleInfo("Schedule1F1B", "single"),
    "interleaved_1f1b": ScheduleInfo("ScheduleInterleaved1F1B", "loop"),
    "interleaved_zb": ScheduleInfo("ScheduleInterleavedZeroBubble", "loop", zero_bubble=True),
    "zbv": ScheduleInfo("ScheduleZBVZeroBubble", "v", zero_bubble=True),
}


def check_microbatches(schedule: str, pp: int, vpp: int, n_microbatches: int) -> None:
    """The schedule's constraints on ``(pp, vpp, micro-batches)``, as ``ValueError``s that
    name the config keys (checked before launch)."""
    info = SCHEDULES.get(schedule)
    if info is None:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is not one of: {', '.join(SCHEDULES)}")
    if info.style == "single" and vpp != 1:
        raise ValueError(
            f"parallel.pp_schedule={schedule} runs one stage per rank; parallel.vpp={vpp} needs "
            "interleaved_1f1b, interleaved_zb or zbv"
        )
    if info.style == "v" and vpp != 2:
        raise ValueError(f"parallel.pp_schedule={schedule} needs parallel.vpp=2, got {vpp}")
    if n_microbatches < pp:
        raise ValueError(
            f"parallel.pp={pp} needs at least {pp} micro-batches per step, got "
            f"trainer.global_batch_size/(micro_batch_size*dp)={n_microbatches}"
        )
    if info.style == "loop":  # torch's rounds of pp micro-batches must divide evenly
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ValueError(
                f"parallel.pp_schedule={schedule} needs the micro-batches per step "
                f"({n_microbatches}) to be a multiple of {rounds} (rounds of pp={pp}); "
                f"use a multiple of parallel.pp"
            )


def check_pipeline(pp: int, vpp: int, schedule: str, n_microbatches: int, num_layers: int,
                   pp_layers: Optional[list[int]], tie_embeddings: bool) -> None:
    """Everything a pipeline layout needs, as one-line ``ValueError``s naming the keys."""
    if pp == 1 and (vpp > 1 or pp_layers):
        raise ValueError(f"parallel.vpp={vpp} / parallel.pp_layers need parallel.pp > 1")
    if pp == 1:
        return
    if tie_embeddings:
        raise ValueError("model.tie_embeddings=true cannot be pipelined (parallel.pp > 1)")
    check_microbatches(schedule, pp, vpp, n_microbatches)
    split_layers(num_layers, pp * vpp, pp_layers)


def split_layers(num_layers: int, stages: int, split: Optional[list[int]] = None) -> list[range]:
    """Layer ids of every stage. ``split``: layers per stage (must sum to ``num_layers``);
    default: as even as possible, the remainder going to the middle stages so the first
    (embedding) and last (head + loss) stages are never the heaviest."""
    if split:
        if len(split) != stages or sum(split) != num_layers or min(split) < 1:
            raise ValueError(
                f"parallel.pp_layers={list(split)} must list {stages} positive layer counts "
                f"(one per stage: pp*vpp) summing to model.num_layers={num_layers}"
            )
        counts = list(split)
    else:
        if num_layers < stages:
            raise ValueError(
                f"model.num_layers={num_layers} is fewer than the {stages} pipeline stages "
                "(parallel.pp * parallel.vpp)"
            )
        base, extra = divmod(num_layers, stages)
        counts = [base] * stages
        middle = list(range(1, stages - 1)) or list(range(stages))
        order = middle + [s for s in range(stages) if s not in middle]
        for s in order[:extra]:
            counts[s] += 1
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def stage_rank(stage: int, pp: int, style: str) -> int:
    """Pipeline rank that runs ``stage``: looped (``s % pp``) or V-shaped (down, then up)."""
    if style == "v":
        return stage if (stage // pp) % 2 == 0 else pp - 1 - stage % pp
    return stage % pp


class PipelineSplit:
    """Where this rank's stages sit in the pipeline."""

    def __init__(self, num_layers: int, pp: int, pp_rank: int, split=None, *, vpp: int = 1,
                 style: str = "loop"):
        self.pp, self.vpp, self.rank = pp, vpp, pp_rank
        self.num_stages = pp * vpp
        self.ranges = split_layers(num_layers, self.num_stages, split)
        self.owner = [stage_rank(s, pp, style) for s in range(self.num_stages)]
        self.stages = [s for s in range(self.num_stages) if self.owner[s] == pp_rank]
        self.layers = sorted(i for s in self.stages for i in self.ranges[s])
        self.has_first = 0 in self.stages
        self.has_last = self.num_stages - 1 in self.stages


def stage_module(model: nn.Module, split: PipelineSplit) -> nn.Module:
    """``model`` (best built on the meta device) reduced to this rank's stages: a module of
    its class holding the rank's layers, the embedding if it holds stage 0 and the head if
    it holds the last stage (shared with ``model``, which the caller drops). The layout must
    pass :func:`check_pipeline` (config validation runs it)."""
    return _chunk(model, split.layers, split.has_first, split.has_last)


def _chunk(module: nn.Module, layers, first: bool, last: bool) -> nn.Module:
    """A module of ``module``'s class holding (not copying) its embedding if ``first``, the
    given layers, and its head if ``last``; it runs ``module``'s own forward."""
    chunk = module.__class__.__new__(module.__class__)
    nn.Module.__init__(chunk)
    for key, value in vars(module).items():  # plain attributes (cfg, flags), not modules
        if not key.startswith("_") and key != "training":
            setattr(chunk, key, value)
    chunk.tok_embeddings = module.tok_embeddings if first else None
    chunk.layers = nn.ModuleDict({str(i): module.layers[str(i)] for i in layers})
    chunk.norm = module.norm if last else None
    chunk.output = module.output if last else None
    chunk.train(module.training)
    return chunk


def stage_chunks(module: nn.Module, split: PipelineSplit) -> list[nn.Module]:
    """One module per local stage (the stage module itself when it holds one stage). Call
    after everything that replaces submodules (activation checkpointing wraps blocks)."""
    if len(split.stages) == 1:
        return [module]
    return [
        _chunk(module, split.ranges[s], s == 0, s == split.num_stages - 1) for s in split.stages
    ]


def stage_class():
    """``PipelineStage`` with two changes (torch.distributed.pipelining imported lazily):

    - autocast covers the stage's forward only (``autocast`` around the module call, also
      in the shape-inference pass), never the schedule's backward or the loss function,
      which run outside it as in the micro-batch loop (the AMP docs advise against
      backward under autocast);
    - the shape-inference pass feeds a non-first stage standard-normal inputs instead of
      ``torch.empty`` (zeros, or stale memory on CUDA): identical hidden states would route
      every token of the pass to the same experts, one EP rank receiving all of them. The
      values come from the stage's own generator (seeded, so every run primes alike) and
      never touch the global RNG, so training is unchanged.

    The hooks are torch 2.13's ``forward_maybe_with_nosync`` (the schedule's forward),
    ``_compute_outputs`` (the inference forward) and ``_to_tensor`` (inference inputs);
    where a torch version lacks one, that change is skipped, not the stage."""
    import torch.distributed.pipelining as pipelining
    from torch.distributed.tensor import DTensor

    class Stage(pipelining.PipelineStage):
        def __init__(self, *args, autocast: Callable[[], contextlib.AbstractContextManager],
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.autocast = autocast
            self.prime_gen = torch.Generator(device=self.device).manual_seed(0x5EED)

        def forward_maybe_with_nosync(self, *args, **kwargs):
            with self.autocast():
                return super().forward_maybe_with_nosync(*args, **kwargs)

        def _compute_outputs(self, *args, module, **kwargs):
            with self.autocast():
                return super()._compute_outputs(*args, module=module, **kwargs)

        def _to_tensor(self, arg):
            t = super()._to_tensor(arg)
            if not isinstance(arg, torch.Tensor) and t.is_floating_point():
                with torch.no_grad():  # an inference input built from metadata
                    local = t.to_local() if isinstance(t, DTensor) else t
                    local.normal_(generator=self.prime_gen)
            return t

    return Stage


def build_schedule(
    chunks: list[nn.Module],
    split: PipelineSplit,
    *,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    group,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
):
    """The ``torch.distributed.pipelining`` schedule for this rank's stages (the sizes must
    pass :func:`check_microbatches`); ``autocast`` wraps each stage forward only."""
    import torch.distributed.pipelining as pipelining

    info = SCHEDULES[schedule]
    cls = getattr(pipelining.schedules, info.torch_class)
    stage_cls = stage_class()
    stages = [
        stage_cls(chunk, s, split.num_stages, device, group=group, autocast=autocast)
        for chunk, s in zip(chunks, split.stages)
    ]
    target = stages[0] if info.style == "single" else stages
    return cls(target, n_microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """The ``StepRunner`` (parallel/runner.py) of a pipelined model: one schedule over a
    step's micro-batches.

    ``objective`` turns the last stage's logits into per-group loss sums and those into
    the objective given the step's normalisers (set per call), so the gradients are those
    of the global objective. The loss group of each token travels in the schedule's target
    tensor (``label + group << 32``; -1 = no loss).

    torch.distributed.pipelining infers the inter-stage shapes by running a real
    forward/backward (and the loss function) inside the first ``step()``, which would leak
    into the gradients, the MoE statistics and the logged loss: the runner runs that pass
    once on the first batch and discards its effects itself (the stage module's gradients
    set to None, the MoE statistics reset). Non-first stages see random-normal inputs in
    that pass, not zeros (see ``stage_class``).

    Autocast covers each stage's forward only; the loss function and every backward run
    outside it, as in ``MicroBatchLoop``.
    """

    def __init__(self, model: nn.Module, chunks: list[nn.Module], split: PipelineSplit, *,
                 schedule: str, n_microbatches: int, objective, arch: str,
                 autocast: Callable[[], contextlib.AbstractContextManager], moe: MoEStats,
                 dims, device: torch.device):
        self.model, self.split, self.objective, self.device = model, split, objective, device
        self.arch, self.autocast, self.moe, self.dims = arch, autocast, moe, dims
        self._sums: list[torch.Tensor] = []
        self._norm = torch.ones(objective.G + 1, device=device)
        self._primed = False
        # torch's eval() of the zero-bubble schedules fails on their split-backward actions
        # (2.13: "can't steal_bwd_input if this stage doesn't have backward"); they validate
        # with a full step whose gradients and statistics are discarded.
        self._eval_by_step = SCHEDULES[schedule].zero_bubble
        self.schedule = build_schedule(chunks, split, schedule=schedule,
                                       n_microbatches=n_microbatches, loss_fn=self._loss,
                                       device=device, group=dims.group("pp"),
                                       autocast=autocast)

    def _discard(self) -> None:
        """Undo a pass whose results must not count."""
        self.model.zero_grad(set_to_none=True)
        self.moe.reset()

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target``: ``label + group << 32`` where the loss mask is 1, -1 elsewhere."""
        mask = target >= 0  # the micro-batch's loss fields, decoded for the objective
        mb = {"labels": torch.where(mask, target & 0xFFFFFFFF, 0), "loss_mask": mask.float(),
              "loss_modality": (target >> 32).clamp(min=0)}
        sums = self.objective.sums(logits, mb)
        self._sums.append(sums.detach())
        return self.objective.value(sums, self._norm)

    def run(self, micro_batches: list[dict[str, torch.Tensor]], normaliser: torch.Tensor,
            train: bool) -> torch.Tensor:
        """One pass over the micro-batches; returns the objective sums [G + 1] summed over
        the pipeline ranks (only the last stage computes them)."""
        return self.dims.all_reduce_sum(self._run(micro_batches, normaliser, train), "pp")

    def _run(self, mbs: list[dict[str, torch.Tensor]], norm: torch.Tensor,
             train: bool) -> torch.Tensor:
        if not self._primed:
            self._primed = True
            with torch.enable_grad():  # also when the first pass is a validation one
                self._run(mbs, norm, train=True)
            self._discard()
        cat = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
        group = cat["loss_modality"] if "loss_modality" in cat else torch.zeros_like(
            cat["labels"])
        target = torch.where(cat["loss_mask"] > 0, cat["labels"] + (group << 32), -1)
        args = (cat["tokens"],) if self.split.has_first else ()
        kwargs = model_kwargs(cat, self.arch)
        self._sums, self._norm = [], norm
        by_step = not train and self._eval_by_step
        # autocast is the stages' (forward only: see stage_class), not the schedule's
        with torch.enable_grad() if by_step else contextlib.nullcontext():
            (self.schedule.step if train or by_step else self.schedule.eval)(
                *args, target=target, losses=[], return_outputs=False, **kwargs)
        if by_step:
            self._discard()
        elif not train:
            # Switching back from eval() makes torch re-run its shape inference (a real
            # forward/backward) inside the next step(): prime again before it.
            self._primed = False
        else:
            self.moe.count_dispatch()
        if not self._sums:
            return torch.zeros_like(self._norm)
        return torch.stack(self._sums).sum(0)


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, vpp: int = 1) -> float:
    """Idle fraction of a pipeline rank, for equal stage costs and a forward, an input
    backward and a weight backward of one unit each: the warm-up/cool-down idles
    ``(p-1)(F+B)/v`` of 1F1B-like schedules (GPipe, 1F1B, interleaved 1F1B) become
    ``(p-1)(F+B_in-B_w)/v`` for ZB-H1 (``interleaved_zb``) and ``~0`` for ZB-V (``zbv``),
    out of ``3m`` busy units per rank (Qi et al., 2024, "Zero Bubble Pipeline
    Parallelism")."""
    p, m, v = pp, n_microbatches, vpp
    if p == 1:
        return 0.0
    idle = {"interleaved_zb": 1.0, "zbv": 0.0}.get(schedule, 3.0) * (p - 1) / v
    return idle / (3 * m + idle)


def in_flight(schedule: str, pp: int, rank: int, n_microbatches: int, vpp: int = 1) -> float:
    """Peak live activations on pipeline ``rank``, in micro-batches through all of its
    layers: GPipe holds every micro-batch; 1F1B holds ``pp - rank``; the
    interleaved schedules hold their warm-up of ``(vpp-1)*round + 2*(pp-1-rank) + 1``
    chunk-micro-batches (``vpp`` of them make one); ZB-V holds about ``pp`` (its paper's
    1F1B-equal memory)."""
    m, v = n_microbatches, vpp
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, pp - rank))
    if schedule == "zbv":
        return float(min(m, pp))
    per_round = m // max(1, m // pp)
    return min(v * m, (v - 1) * per_round + 2 * (pp - 1 - rank) + 1) / v


def pipeline_report(model: nn.Module, split: PipelineSplit, schedule: str, m: int,
                    pairs: bool = False) -> str:
    """Start-up table: stages, layers, parameters and estimated memory per pipeline rank,
    and the bubble fraction. Memory = fp32 weights + grads + two Adam moments
    (16 B/parameter) before TP/EP/FSDP sharding, plus the micro-batches whose activations
    are live at the peak (:func:`in_flight`). ``pairs``: each of the ``m`` pipeline
    micro-batches is a pair (the two-batch overlap)."""
    rows = []
    for r in range(split.pp):
        stages = [s for s in range(split.num_stages) if split.owner[s] == r]
        n, parts = 0, []
        for s in stages:
            layers = split.ranges[s]
            n += sum(p.numel() for k in layers for p in model.layers[str(k)].parameters())
            part = f"{s}: layers {layers.start}-{layers.stop - 1}"
            if s == 0:
                n += model.tok_embeddings.weight.numel()
                part += " + embedding"
            if s == split.num_stages - 1:
                n += model.norm.weight.numel() + (
                    model.output.weight.numel() if model.output is not None else 0)
                part += " + head"
            parts.append(part)
        live = in_flight(schedule, split.pp, r, m, split.vpp) * (2 if pairs else 1)
        rows.append(
            f"  rank {r}: stage {'; '.join(parts)}: {n / 1e6:.2f}M params, "
            f"~{16 * n / 2**30:.2f} GiB weights+grads+Adam, activations of ~{live:g} "
            "micro-batches in flight"
        )
    bubble = bubble_fraction(schedule, split.pp, m, split.vpp)
    head = (f"pipeline: {split.pp} ranks x {split.vpp} stages, schedule {schedule}, "
            f"{m} micro-batches{' (pairs: the two-batch overlap)' if pairs else ''}, "
            f"bubble ~{bubble:.1%} (equal stage costs)")
    return "\n".join([head, *rows])
