"""Communication/compute overlap (issue 19) on real gloo processes, one spawn of 4 ranks:

- the ``ddp`` engine launches its bucket all-reduces inside the step's last backward
  (never in an earlier micro-batch's), and its gradients equal the post-backward path;
- an MoE layer's shared experts run while the EP row all-to-all is in flight, forward
  and backward, and the layer's output and gradients are bit-equal to ``overlap=False``
  and match the unsharded layer;
- the EP dispatch path syncs device -> host at most once per layer (ETP included);
- under autocast the rows travel in the compute dtype and combine returns fp32;
- two micro-batches' forwards interleaved at the exchanges (two-batch overlap) keep one
  micro-batch's rows in flight while the other's experts run, forward and backward, and
  give the one-at-a-time loop's outputs and gradients.

The training-level parity of the overlapped ``ddp`` engine (grad accumulation, EP and
shared experts) is in tests/test_parity_distributed.py (every ddp layout there runs with
``parallel.overlap=true``, the default).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from models.build import build_model
from models.config import ModelConfig, MoEConfig
from models.moe import MoELayer
from models.router import Routing
from models.steps import call_steps, interleave
from parallel.data_parallel import DataParallel
from parallel.dims import ParallelDims
from parallel.dispatch import AllToAllDispatcher, set_dispatch_overlap
from parallel.expert_parallel import apply_expert_parallel
from tests.distributed_utils import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

D, FFN, E = 16, 8, 8
WORLD = 4
LAYOUTS = [(4, 1), (2, 1), (2, 2)]  # (ep, etp) on 4 ranks


def _dims(ep: int, etp: int) -> ParallelDims:
    dims = ParallelDims.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=ep, etp=etp), WORLD)
    dims.build_meshes("cpu")
    return dims


def _moe(**kw) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=2, expert_ffn_hidden_size=FFN,
                     num_shared_experts=1, shared_expert_ffn_hidden_size=FFN, **kw)


def _layer() -> MoELayer:
    layer = MoELayer(ModelConfig(hidden_size=D, moe=_moe(shared_expert_gate=True)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _inner(layer: MoELayer) -> AllToAllDispatcher:
    return getattr(layer.dispatcher, "inner", layer.dispatcher)


# ------------------------------------------------------------- shared experts in flight
def _check_shared_overlap(dims: ParallelDims, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    x, g = torch.randn(2, 8, D, generator=gen), torch.randn(2, 8, D, generator=gen)
    ref = _layer()
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad(ref(xr), [xr, ref.shared_experts.w1.weight], g)
    results = {}
    for overlap in (True, False):
        layer = copy.deepcopy(ref)
        apply_expert_parallel(layer, dims, "alltoall")
        set_dispatch_overlap(layer, overlap)
        disp, seen = _inner(layer), {}
        layer.shared_experts.register_forward_pre_hook(
            lambda m, a, d=disp, s=seen: s.__setitem__("fwd", d.in_flight))
        layer.shared_experts.register_full_backward_hook(
            lambda m, gi, go, d=disp, s=seen: s.__setitem__("bwd", d.in_flight))
        xe = x.clone().requires_grad_()
        out = layer(xe)
        got = torch.autograd.grad(out, [xe, layer.shared_experts.w1.weight], g)
        results[overlap] = (out, *got)
        tag = f"overlap={overlap} ep{dims.ep} etp{dims.etp}"
        # forward: token rows and metadata in flight while the shared experts run;
        # backward: the reverse exchanges of both gradients are in flight
        assert seen == ({"fwd": 2, "bwd": 2} if overlap else {"fwd": 0, "bwd": 0}), (tag, seen)
        assert disp.in_flight == 0, tag
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6, msg=tag)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=tag)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6, msg=tag)
    for a, b in zip(results[True], results[False]):  # the same arithmetic, bit for bit
        assert torch.equal(a, b)


# ------------------------------------------------------------- host syncs per layer
class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make a CUDA device wait for the host to read a value back:
    .item()/int() (``_local_scalar_dense``), bincount, nonzero, boolean-mask indexing,
    repeat_interleave of tensor repeats without output_size; ``tolist`` is counted by
    patching it."""

    SYNCING = {"aten.bincount.default", "aten._local_scalar_dense.default",
               "aten.nonzero.default", "aten.masked_select.default", "aten.unique_dim.default",
               "aten._unique2.default"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in self.SYNCING:
            self.calls.append(name)
        elif name == "aten.index.Tensor" and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.calls.append("bool index")
        elif name in ("aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor") \
                and kwargs.get("output_size") is None:  # tensor repeats: reads their sum
            self.calls.append(name)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t, counter=self):
            counter.calls.append("tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _check_syncs(dims: ParallelDims, rank: int) -> None:
    for kind in ("alltoall", "allgather"):
        layer = _layer()
        apply_expert_parallel(layer, dims, kind)
        T, k = 12, 2
        gen = torch.Generator().manual_seed(10 + rank)
        idx = torch.randn(T, E, generator=gen).topk(k, -1).indices
        w = torch.rand(T, k, generator=gen).requires_grad_()
        x = torch.randn(T, D, generator=gen, requires_grad=True)
        with _SyncCounter() as c:
            x_ND, tpe, ctx = layer.dispatcher.dispatch(x, Routing(idx, w, E))
            out = layer.dispatcher.combine(x_ND * 2, ctx)
        assert c.calls == ["tolist"], (kind, dims.ep, dims.etp, c.calls)
        with _SyncCounter() as c:  # the backward pass needs none
            out.sum().backward()
        assert c.calls == [], (kind, c.calls)
        # The whole layer on the experts' loop path (CUDA fp32 / below sm90): the counts
        # ride in the dispatcher's sync, so still one, and none when backward recomputes
        # the experts (the two-batch overlap's selective recompute)
        for recompute in (False, True):
            layer.experts.grouped_mm_impl = "loop"
            layer.recompute_in_steps = recompute
            xb = torch.randn(2, T // 2, D, generator=gen, requires_grad=True)
            with _SyncCounter() as c:
                y = layer(xb)
            assert c.calls == ["tolist"], (kind, recompute, dims.etp, c.calls)
            with _SyncCounter() as c:
                y.sum().backward()
            assert c.calls == [], (kind, recompute, dims.etp, c.calls)


# ------------------------------------------------------------- rows in the compute dtype
def _check_autocast_wire(dims: ParallelDims, rank: int) -> None:
    disp = AllToAllDispatcher(dims.group("ep"), E)
    T, k = 12, 2
    gen = torch.Generator().manual_seed(20 + rank)
    idx = torch.randn(T, E, generator=gen).topk(k, -1).indices
    r = Routing(idx, torch.rand(T, k, generator=gen), E)
    x = torch.randn(T, D, generator=gen)
    x_ND, _, ctx = disp.dispatch(x, r)
    out32, bytes32 = disp.combine(x_ND.tanh(), ctx), disp.bytes_sent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_ND, _, ctx = disp.dispatch(x, r)
        assert x_ND.dtype == torch.bfloat16
        out = disp.combine(x_ND.tanh(), ctx)
    assert out.dtype == torch.float32 and disp.bytes_sent * 2 == bytes32
    torch.testing.assert_close(out, out32, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------- ddp reduces in backward
def _tiny(dims: ParallelDims) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=64, hidden_size=D, num_layers=2, num_heads=2, num_kv_heads=1,
                      ffn_hidden_size=32, max_seq_len=32, moe=_moe())
    torch.manual_seed(7)
    model = build_model(cfg, "cpu")
    apply_expert_parallel(model, dims)
    return model


def _check_ddp(dims: ParallelDims, rank: int) -> None:
    grads = {}
    for overlap in (True, False):
        model = _tiny(dims)
        dp = DataParallel(model, dims, "ddp", overlap=overlap, bucket_mb=0.004)
        gen = torch.Generator().manual_seed(30 + rank)
        mbs = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(3)]
        for i, tokens in enumerate(mbs):  # gradient accumulation over 3 micro-batches
            dp.prepare_backward(last=i == len(mbs) - 1)
            model(tokens).float().square().mean().backward()
        dp.reduce_gradients()
        grads[overlap] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if overlap:
            log = dp.launch_log
            n = dp.num_buckets
            # every bucket launched once, all inside the last backward, in bucket order
            assert n > 4, n
            assert log == [("launch_in_backward", i) for i in range(n)] + [
                ("backward_end", -1)], log
        else:
            assert dp.launch_log == []
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------- FSDP2 explicit prefetch
def _check_fsdp_prefetch(dims: ParallelDims, rank: int) -> None:
    """Prefetching the next blocks' all-gathers changes when they run, not what they
    compute: gradients equal those of FSDP2's implicit order, over 2 micro-batches."""
    grads, plans = {}, {}
    for depth in (0, 1):
        model = _tiny(dims)
        dp = DataParallel(model, dims, "fsdp", fsdp_prefetch=depth)
        gen = torch.Generator().manual_seed(40 + rank)
        mbs = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(2)]
        for i, tokens in enumerate(mbs):
            dp.before_micro_batch(i, is_last=i == len(mbs) - 1)
            model(tokens).float().square().mean().backward()
        dp.reduce_gradients()
        grads[depth] = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
        plans[depth] = dp.prefetch_plan
    # units: block 0, its experts, block 1, its experts; depth 1 block = 2 units
    assert plans[0] == [(0, 0)] * 4, plans[0]
    assert plans[1] == [(2, 0), (2, 1), (1, 2), (0, 2)], plans[1]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------- two-batch overlap
def _check_two_batch(dims: ParallelDims, rank: int) -> None:
    """Two micro-batches' stepped forwards interleaved (parallel.two_batch_overlap) and one
    backward of their summed loss: each one's exchanges are in flight while the other
    computes, forward and backward, and outputs and gradients equal the plain
    one-at-a-time loop."""
    gen = torch.Generator().manual_seed(50 + rank)
    mbs = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(2)]
    results = {}
    for two_batch in (False, True):
        model = _tiny(dims)
        disps = [_inner(layer) for layer in model.moe_layers()]
        fwd, bwd = [], []

        def in_flight(disps=disps) -> int:
            return sum(d.in_flight for d in disps)

        for layer in model.moe_layers():
            layer.experts.register_forward_pre_hook(
                lambda m, a, log=fwd: log.append(in_flight()))
            layer.experts.register_full_backward_pre_hook(
                lambda m, g, log=bwd: log.append(in_flight()))
        if two_batch:
            outs = interleave([call_steps(model, t) for t in mbs])
            sum(o.float().square().mean() for o in outs).backward()
        else:
            outs = []
            for t in mbs:
                outs.append(model(t))
                outs[-1].float().square().mean().backward()
        results[two_batch] = (outs, {n: p.grad for n, p in model.named_parameters()})
        assert in_flight() == 0
        tag = f"two_batch={two_batch} ep{dims.ep} etp{dims.etp}"
        if two_batch:  # the other micro-batch's rows (dispatch or combine) travel while
            # these experts run
            assert min(fwd) >= 1 and min(bwd) >= 1, (tag, fwd, bwd)
        else:
            assert max(fwd) == max(bwd) == 0, (tag, fwd, bwd)
    for a, b in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def _worker(rank: int, world: int) -> int:
    for ep, etp in LAYOUTS:
        dims = _dims(ep, etp)
        _check_shared_overlap(dims, rank)
        _check_syncs(dims, rank)
        if etp == 1:
            _check_autocast_wire(dims, rank)
        if ep == 2 and etp == 1:  # dense over dp_cp (4 ranks), experts over edp (2)
            _check_ddp(dims, rank)
            _check_fsdp_prefetch(dims, rank)
        _check_two_batch(dims, rank)
    dist.barrier()
    return rank


def test_overlap_and_syncs():
    assert spawn(_worker, WORLD) == list(range(WORLD))
