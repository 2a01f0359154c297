"""Data-parallel engines and the global gradient norm.

Gradient semantics (the whole framework relies on this): every rank's backward loss is
``sum of its token losses / token count of the whole global batch``, so the true gradient
is the SUM of the per-rank gradients — never a mean. Dense parameters are summed over the
dense ``dp_cp`` group; routed-expert parameters over ``edp`` only (an expert's gradient
already holds every EP rank's tokens, delivered by the dispatcher's backward).

Engines:

- ``fsdp`` (default): FSDP2 ``fully_shard``. Each MoE layer's ``experts`` module is sharded
  over ``edp`` (along dim 1; dim 0 is the EP split), every transformer block and the root
  over ``dp_cp``; reductions are sums (divide factor 1). When the run computes in bf16
  (``param_dtype``: trainer.precision resolved to bf16) parameters are all-gathered in
  bf16 and gradients reduce-scattered in fp32 (``MixedPrecisionPolicy``); fp32 runs are
  unchanged. Without pipeline parallelism, gradients are reduce-scattered only after the
  last micro-batch's backward (``before_micro_batch``, ``parallel.fsdp_grad_sync=last``):
  the earlier ones accumulate unsharded fp32 gradients, 4 B per parameter of the
  *unsharded* model held until that backward (``every`` reduces each micro-batch and keeps
  only the shards). Under PP the pipeline stage defers the reduction itself.
- ``ddp``: parameters replicated; gradients are flattened into buckets per reduction group
  and all-reduced (sum). Explicit rather than ``torch.nn.parallel.DDP``, because DDP
  reduces every parameter over one group and experts need a different one. With
  ``overlap`` (``parallel.overlap``, default on) the buckets are launched *during* the
  step's last backward: see :class:`_Buckets`. Otherwise (and under pipeline parallelism,
  whose runner never arms the hooks) everything is reduced after backward.
- ``none``: no reduction (only valid when dp_cp == edp == 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from models.layers import in_backward
from parallel.dims import ParallelDims

# flat buffers of at most this many elements per all-reduce (25M fp32 = 100 MB)
_BUCKET_NUMEL = 25_000_000


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (``...ffn.experts.w1``); shared experts are dense."""
    return ".experts." in name


class DataParallel:
    """Applies a DP engine to a model and owns gradient reduction and clipping."""

    def __init__(self, model: nn.Module, dims: ParallelDims, engine: str,
                 roots: list[nn.Module] | None = None, *,
                 param_dtype: torch.dtype | None = None, grad_sync: str = "last",
                 overlap: bool = True, bucket_mb: float = 25.0, fsdp_prefetch: int = 1,
                 two_batch: bool = False):
        """``roots``: the modules that are run (FSDP roots); default ``[model]``. Under
        pipeline parallelism with several stages per rank they are the stage chunks, which
        share ``model``'s submodules (parallel/pipeline.py). ``param_dtype``: the compute
        dtype when it is not fp32 (FSDP all-gathers in it, reduces in fp32). ``grad_sync``:
        ``last`` (FSDP reduces after the last micro-batch only) or ``every``. ``overlap`` /
        ``bucket_mb``: the ``ddp`` engine's reduction during backward and its bucket size
        (MiB of gradient per all-reduce). ``fsdp_prefetch``: blocks whose FSDP all-gather
        is issued ahead of use (forward: the next ones, backward: the previous ones); 0
        leaves FSDP2's own implicit order. ``two_batch``: the step runs micro-batch pairs
        interleaved (``parallel.two_batch_overlap``), which splits a block's call, so FSDP
        shards each block's whole-call submodules instead of the block
        (``TransformerBlock.stepped_units``)."""
        self.model, self.dims, self.engine = model, dims, engine
        self.two_batch = two_batch
        self.fsdp_prefetch = fsdp_prefetch
        self.overlap, self.bucket_mb = overlap, bucket_mb
        self._buckets: _Buckets | None = None
        self.roots = roots or [model]
        self.param_dtype, self.grad_sync = param_dtype, grad_sync
        self.fsdp_units: list[nn.Module] = []
        self.block_units: list[nn.Module] = []  # the blocks' units, forward order
        self.dense_size = dims.dp * dims.cp
        # Routed experts see the tokens of their whole edp group (TP ranks split a
        # micro-batch's tokens at MoE entry, so they are edp peers too).
        self.expert_size = dims.edp
        named = list(model.named_parameters())
        self.expert_params = [p for n, p in named if is_expert_param(n)]
        self.dense_params = [p for n, p in named if not is_expert_param(n)]
        if engine == "fsdp" and max(self.dense_size, self.expert_size) > 1:
            self._apply_fsdp()
        elif engine == "none" and max(self.dense_size, self.expert_size) > 1:
            raise ValueError("parallel.dp_engine=none needs dp*cp == edp == 1")
        self.refresh_params()

    def refresh_params(self) -> None:
        """Re-read the model's parameters (call after ``to_empty``, which replaces them)."""
        named = list(self.model.named_parameters())
        self.expert_params = [p for n, p in named if is_expert_param(n)]
        self.dense_params = [p for n, p in named if not is_expert_param(n)]
        # Each parameter's replication factor: how many ranks hold an identical copy of
        # its (local) gradient after reduction. The global norm counts each copy once.
        self._replicas = {p: self._replication(n, p) for n, p in named}
        if self.engine == "ddp" and self.overlap:
            if self._buckets is not None:
                self._buckets.remove()
            groups = []
            if self.dense_size > 1:
                groups.append((self.dense_params, self.dims.group("dp_cp")))
            if self.expert_size > 1:
                groups.append((self.expert_params, self.dims.group("edp")))
            self._buckets = _Buckets(groups, self.bucket_mb) if groups else None

    def _replication(self, name: str, p: nn.Parameter) -> int:
        """Ranks per distinct shard of ``p``: world / (number of distinct shards), where a
        DTensor has one distinct shard per mesh coordinate along its Shard dims and routed
        experts are additionally split ep * etp ways (outside any DTensor mesh)."""
        distinct = self.dims.ep * self.dims.etp if is_expert_param(name) else 1
        if isinstance(p, DTensor):
            for size, placement in zip(p.device_mesh.shape, p.placements):
                # Shard and _StridedShard (FSDP over TP; its is_shard() is False) both
                # split a dim; Replicate and Partial have none.
                if hasattr(placement, "dim"):
                    distinct *= size
        return self.dims.world_size // self.dims.pp // distinct

    # ------------------------------------------------------------------ FSDP2
    def _apply_fsdp(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from models.moe import MoELayer

        model, dims = self.model, self.dims
        mp = MixedPrecisionPolicy()  # fp32: parameters and reductions in their own dtype
        if self.param_dtype is not None and self.param_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        expert_params = set(self.expert_params)
        # Under PP a stage runs several micro-batches before its gradients are reduced:
        # keeping its parameters gathered from forward to the last backward saves an
        # all-gather per micro-batch (torchtitan does the same), and the zero-bubble
        # schedules need it — their weight-gradient pass differentiates with respect to
        # the module's current parameters, which must be the gathered ones.
        reshard = dims.pp == 1
        managed = []
        # FSDP units of each block in forward order (a block's own unit, then its experts')
        per_block: dict[nn.Module, list[nn.Module]] = {b: [] for b in model.layers.values()}
        owner = {id(m): b for b in per_block for m in b.modules()}
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                # dim 0 is split over ep and the FFN dim over etp: FSDP splits the hidden
                # dim (w1/w3 dim 1, w2 dim 2), so the three splits are a plain 3-D
                # sharding DCP can reshard (parallel/state_dict.py). Also with edp == 1,
                # so that every parameter is a DTensor (one optimizer kernel path, one
                # checkpoint path).
                w2 = layer.experts.w2
                managed.append(fully_shard(
                    layer.experts, mesh=dims.mesh("edp"), reshard_after_forward=reshard,
                    mp_policy=mp, shard_placement_fn=lambda p, w2=w2: Shard(2) if p is w2 else Shard(1)))
                if id(layer) in owner:
                    per_block[owner[id(layer)]].append(managed[-1])
        # Under PP every FSDP module must sit under a stage root that PipelineStage manages
        # (it defers the reduce-scatter to the last micro-batch and keeps the parameters
        # gathered across the zero-bubble schedules' split backward), so the stages are
        # wrapped even when the dense group is a single rank.
        if self.dense_size > 1 or dims.pp > 1:
            for block in model.layers.values():
                # Under the two-batch overlap a block's call is split at the MoE exchanges
                # and interleaved with the other micro-batch's: FSDP's hooks around the
                # block would reshard it under the other call. Its whole-call submodules
                # are sharded instead, as one group (one all-gather, gathered at the
                # first one's call, resharded after the last one's: each micro-batch
                # runs them all before the other starts, so a step gathers what the plain
                # loop gathers); the norms and the MoE layer's gate/mix weights go to the
                # root's unit. A block without a stepped forward (Mamba) is called whole.
                if self.two_batch and hasattr(block, "stepped_units"):
                    unit = fully_shard(block.stepped_units(), mesh=dims.mesh("dp_cp"),
                                       reshard_after_forward=reshard, mp_policy=mp)[0]
                else:
                    unit = fully_shard(block, mesh=dims.mesh("dp_cp"),
                                       reshard_after_forward=reshard, mp_policy=mp)
                managed.append(unit)
                per_block[block].insert(0, unit)
            for root in self.roots:  # embedding / norm / head, and the root state
                managed.append(fully_shard(root, mesh=dims.mesh("dp_cp"),
                                           reshard_after_forward=reshard, mp_policy=mp))
        for m in managed:
            m.set_gradient_divide_factor(1.0)  # sum, see module docstring
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        self.fsdp_units = managed
        self.block_units = [u for units in per_block.values() for u in units]
        # Prefetch needs one FSDP root over all the units (its lazy init sets up every
        # unit's communication state): there is one when the dense group is sharded. With
        # only the experts sharded (dense group of one rank) each experts unit is its own
        # root, initialised at its first forward, so a neighbour's prefetch would find it
        # unready. Under PP the parameters stay gathered: nothing to prefetch.
        if reshard and self.fsdp_prefetch > 0 and self.dense_size > 1 and self.block_units:
            self._set_prefetch(self.block_units,
                               self.fsdp_prefetch * max(len(u) for u in per_block.values()))
        # parameters were replaced by DTensors: refresh the lists
        named = list(model.named_parameters())
        self.expert_params = [p for n, p in named if is_expert_param(n)]
        self.dense_params = [p for n, p in named if not is_expert_param(n)]
        assert not set(self.expert_params) & expert_params, "experts were not sharded by FSDP"

    @staticmethod
    def _set_prefetch(units: list[nn.Module], depth: int) -> None:
        """Explicit FSDP2 prefetch over ``units`` (forward order): each unit's pre-forward
        issues the all-gathers of the next ``depth`` units and its pre-backward those of the
        previous ``depth``, so a block's gather runs (on the collective's own thread or
        stream) while earlier blocks compute; FSDP2 alone prefetches one unit in backward
        and none in forward."""
        if depth <= 0 or len(units) < 2:
            return
        for i, unit in enumerate(units):
            nxt = units[i + 1 : i + 1 + depth]
            prev = units[max(0, i - depth) : i][::-1]
            if nxt:
                unit.set_modules_to_forward_prefetch(nxt)
            if prev:
                unit.set_modules_to_backward_prefetch(prev)

    @property
    def prefetch_plan(self) -> list[tuple[int, int]]:
        """(forward, backward) prefetch list lengths of the blocks' FSDP units, in forward
        order (tests)."""
        out = []
        for u in self.block_units:
            st = u._get_fsdp_state()
            out.append((len(st._states_to_forward_prefetch), len(st._states_to_backward_prefetch)))
        return out

    def before_micro_batch(self, index: int, is_last: bool) -> None:
        """Called by the step runner before each training micro-batch's forward: FSDP
        reduce-scatters gradients only in the last micro-batch's backward (``grad_sync``
        = ``last``; the earlier ones accumulate locally), and the ``ddp`` engine launches
        its buckets only during that backward (:meth:`prepare_backward`). Under pipeline
        parallelism the pipeline stage manages this itself and nothing is called."""
        if self.grad_sync == "last" and self.dims.pp == 1:
            for unit in self.fsdp_units:
                unit.set_requires_gradient_sync(is_last, recurse=False)
        self.prepare_backward(last=is_last)

    # -------------------------------------------------------------- reduction
    def prepare_backward(self, last: bool) -> None:
        """The step runner's seam (parallel/runner.py): the next backward is (``last``) or
        is not the step's last one for these gradients. Only the last backward launches
        ``ddp`` bucket reductions (earlier ones only accumulate); a no-op for the other
        engines, and without ``overlap``."""
        if self._buckets is not None:
            self._buckets.armed = last

    @property
    def num_buckets(self) -> int:
        """``ddp`` buckets of the overlapped reduction (0 without overlap)."""
        return 0 if self._buckets is None else len(self._buckets.buckets)

    @property
    def launch_log(self) -> list[tuple[str, int]]:
        """``(event, bucket)`` of the last step, in order: ``("launch_in_backward", i)``
        or ``("launch", i)`` (after backward) as bucket i's all-reduce started, and
        ``("backward_end", -1)`` when reduce_gradients was called."""
        return [] if self._buckets is None else list(self._buckets.last_log)

    def reduce_gradients(self) -> None:
        """Sum gradients over their groups (``ddp``; FSDP has done it in backward). With
        overlap: wait for the buckets launched in backward, launch any left (a bucket
        some parameter of which got no gradient, or a step whose runner did not arm the
        hooks), and copy the sums back into the gradients."""
        if self.engine == "fsdp":
            return
        if self._buckets is not None:
            self._buckets.finish()
            return
        if self.dense_size > 1:
            _allreduce_sum([p for p in self.dense_params if p.grad is not None],
                           self.dims.group("dp_cp"))
        if self.expert_size > 1:
            _allreduce_sum([p for p in self.expert_params if p.grad is not None],
                           self.dims.group("edp"))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over every parameter, each shard counted exactly once across all
        ranks (the DeepSpeed #8475 / Megatron #5916 bug class), then clip in place."""
        params = [p for p in self._replicas if p.grad is not None]
        # The norm lives on the gradients' device (NCCL reduces only device tensors); a
        # rank without local gradients uses the model's device, never a CPU default.
        device = _local(params[0].grad).device if params else self._device()
        total = torch.zeros((), device=device, dtype=torch.float32)
        for replicas in sorted(set(self._replicas.values())):
            grads = [_local(p.grad) for p in params if self._replicas[p] == replicas]
            if grads:
                norms = torch._foreach_norm(grads, 2.0)
                total += torch.stack([n.float() for n in norms]).pow(2).sum() / replicas
        if dist.is_initialized() and self.dims.world_size > 1:
            dist.all_reduce(total)
        norm = total.sqrt()
        if params and max_norm > 0 and max_norm != float("inf"):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([_local(p.grad) for p in params], coef)
        return norm

    def _device(self) -> torch.device:
        for t in (*self.model.parameters(), *self.model.buffers()):
            return _local(t).device
        return torch.device("cpu")  # a model without tensors: nothing is ever reduced


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    group: object
    pending: int = 0  # parameters whose gradient has not arrived in this backward
    launched: bool = False
    work: object = None
    flat: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)


class _Buckets:
    """The ``ddp`` engine's overlapped reduction.

    Each group's parameters are cut, in *reverse* order (the order backward produces their
    gradients), into buckets of at most ``bucket_mb`` MiB. A post-accumulate-grad hook on
    every parameter counts down its bucket while ``armed`` (the step's last backward); a
    bucket whose gradients are all there is flattened and its all-reduce (sum) started
    asynchronously — strictly in bucket order, so every rank of a group issues the same
    collectives in the same order whatever order its hooks fire in. ``finish`` launches
    what is left, waits, and copies the sums back (before clipping and the optimizer);
    buckets whose all-reduce has finished are copied back and freed already in backward,
    so the extra memory is the flat copies of the buckets in flight, not of every bucket.
    A parameter whose gradient is None at ``finish`` is left out, as the post-backward
    path does; parameters of a launched bucket cannot change afterwards (their
    accumulation in this backward is over when their hook fires).
    """

    def __init__(self, groups: list[tuple[list[nn.Parameter], object]], bucket_mb: float):
        self.buckets: list[_Bucket] = []
        self.of: dict[nn.Parameter, _Bucket] = {}
        self.handles = []
        self.armed = False
        self.next = 0  # first bucket not launched yet
        self.log: list[tuple[str, int]] = []
        self.last_log: list[tuple[str, int]] = []
        limit = bucket_mb * 2**20
        for params, group in groups:
            cur: list[nn.Parameter] = []
            size = 0
            for p in reversed([p for p in params if p.requires_grad]):
                cur.append(p)
                size += p.numel() * p.element_size()
                if size >= limit:
                    self.buckets.append(_Bucket(cur, group))
                    cur, size = [], 0
            if cur:
                self.buckets.append(_Bucket(cur, group))
        for b in self.buckets:
            for p in b.params:
                self.of[p] = b
                if p.requires_grad and not p.is_meta:  # meta: re-registered once real
                    self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self._reset()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _reset(self) -> None:
        self.next, self.log, self.armed = 0, [], False
        for b in self.buckets:
            b.pending, b.launched, b.work, b.flat, b.grads = len(b.params), False, None, None, []

    def _hook(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        self.of[p].pending -= 1
        while self.next < len(self.buckets) and self.buckets[self.next].pending <= 0:
            self._launch(self.buckets[self.next])
            self._reclaim(block=False)

    def _reclaim(self, block: bool) -> None:
        """Copy finished buckets' sums back into their gradients and free the flat copy
        (so at most the buckets still in flight hold one). Safe during backward: a
        launched bucket's gradients are final for this backward."""
        for b in self.buckets[: self.next]:
            if b.work is not None and (block or b.work.is_completed()):
                b.work.wait()
                for g, r in zip(b.grads, torch._utils._unflatten_dense_tensors(b.flat, b.grads)):
                    g.copy_(r)
                b.work, b.flat, b.grads = None, None, []

    def _launch(self, b: _Bucket) -> None:
        b.grads = [_local(p.grad) for p in b.params if p.grad is not None]
        if b.grads:
            b.flat = torch._utils._flatten_dense_tensors(b.grads)
            b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
        b.launched = True
        self.log.append(("launch_in_backward" if in_backward() else "launch",
                         self.next))
        self.next += 1

    def finish(self) -> None:
        self.log.append(("backward_end", -1))
        while self.next < len(self.buckets):
            self._launch(self.buckets[self.next])
        self._reclaim(block=True)
        self.last_log = self.log  # kept for inspection until the next step
        self._reset()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _allreduce_sum(params: list[nn.Parameter], group) -> None:
    bucket: list[torch.Tensor] = []
    numel = 0
    for p in params + [None]:
        if p is not None:
            bucket.append(_local(p.grad))  # TP shards reduce as their local pieces
            numel += p.grad.numel()
        if bucket and (p is None or numel >= _BUCKET_NUMEL):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for g, r in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                g.copy_(r)
            bucket, numel = [], 0
