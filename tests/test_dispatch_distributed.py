"""Expert-parallel dispatchers and apply_expert_parallel on real gloo processes, against the
single-process reference (LocalDispatcher / the unsharded MoELayer on the same rank's
tokens, with expert gradients summed over the EP group, as Megatron compares).

One spawn per world size runs every check for every layout (spawning dominates runtime).
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from models.build import build_model
from models.config import ModelConfig, MoEConfig
from models.moe import LocalDispatcher, MoELayer
from models.router import Routing, expert_capacity, rank_within_expert
from parallel.dims import ParallelDims
from parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from parallel.expert_parallel import (
    apply_expert_parallel,
    check_expert_parallel,
    gather_expert_weights,
)
from parallel.token_group import SeqChunkGroup
from tests.distributed_utils import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

D, FFN, E = 16, 8, 8
TOL = dict(rtol=1e-5, atol=1e-6)
# world -> (ep, etp) (ep=2 on 4 ranks: edp=2, EP group != world)
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 1), (2, 2)]}


def _dims(world: int, ep: int, etp: int = 1) -> ParallelDims:
    dims = ParallelDims.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=ep, etp=etp), world)
    dims.build_meshes("cpu")
    return dims


def _dispatchers(group) -> dict:
    return {
        "dedup": AllToAllDispatcher(group, E, dedup=True),
        "plain": AllToAllDispatcher(group, E, dedup=False),
        "allgather": AllGatherDispatcher(group, E),
    }


def _routing(T, k, mode, seed, skew=None, uniform=False) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + (0 if skew is None else skew)
    idx = logits.topk(k, -1).indices
    w = torch.full((T, k), 1.0 / k) if uniform else torch.rand(T, k, generator=g) + 0.1
    kept = cap = None
    if mode != "dropless":
        cap = expert_capacity(T, E, k, 0.5)  # drops about half
        kept = (rank_within_expert(idx.flatten(), E) < cap).view(T, k)
        w = w * kept
    return Routing(idx, w.requires_grad_(), E, kept, cap, mode == "pad")


def _run(disp, x, routing, scale_E, offset, g, identity=False):
    """dispatch -> experts y = scale_e * tanh(x) (identity: y = x) -> combine; grads."""
    x = x.detach().requires_grad_()
    w = routing.weights_TK.detach().requires_grad_()
    r = Routing(
        routing.expert_idx_TK, w, E, routing.kept_TK, routing.capacity, routing.pad_to_capacity
    )
    x_ND, tpe, ctx = disp.dispatch(x, r)
    assert int(tpe.sum()) <= x_ND.shape[0]
    s = scale_E[offset + torch.repeat_interleave(torch.arange(len(tpe)), tpe)]
    s = torch.cat([s, s.new_zeros(x_ND.shape[0] - s.shape[0])]).unsqueeze(1)
    y_ND = x_ND if identity else s * torch.tanh(x_ND)
    out = disp.combine(y_ND, ctx)
    gx, gw = torch.autograd.grad(out, [x, w], g)
    return out.detach(), gx, gw


def _oracle_units(routing: Routing, ep: int, dedup: bool) -> list[int]:
    """Rows this rank sends to each EP rank, counted token by token (independent oracle)."""
    n_local = E // ep
    out = [0] * ep
    for t in range(routing.expert_idx_TK.shape[0]):
        dests = [
            int(e) // n_local
            for j, e in enumerate(routing.expert_idx_TK[t])
            if routing.kept_TK is None or routing.kept_TK[t, j]
        ]
        for p in set(dests) if dedup else dests:
            out[p] += 1
    return out


def _check_dispatchers(dims: ParallelDims, rank: int) -> None:
    group, P = dims.group("ep"), dims.ep
    me = dist.get_rank(group)
    n_local = E // P
    offset = me * n_local
    disps = _dispatchers(group)
    scale_E = torch.linspace(0.5, 2.0, E)
    for mode in ("dropless", "drop", "pad"):
        # Round trip: identity experts, uniform weights, small integers -> every sum exact.
        T, k = 6, 4
        r = _routing(T, k, mode, seed=100 + rank, uniform=True)
        x = torch.randint(-8, 8, (T, D)).float()
        g = torch.randint(-8, 8, (T, D)).float()
        ref = _run(LocalDispatcher(), x, r, scale_E, 0, g, identity=True)
        if mode == "dropless":
            assert torch.equal(ref[0], x)
        for name, disp in disps.items():
            got = _run(disp, x, r, scale_E, offset, g, identity=True)
            for a, b, what in zip(got, ref, ("out", "x grad", "w grad")):
                assert torch.equal(a, b), (mode, name, what, P)
        xb, gb = x.bfloat16(), g.bfloat16()  # bf16 rows on the wire, still exact
        ref = _run(LocalDispatcher(), xb, r, scale_E, 0, gb, identity=True)
        got = _run(disps["dedup"], xb, r, scale_E, offset, gb, identity=True)
        assert got[0].dtype == torch.bfloat16 and disps["dedup"].bytes_sent % (D * 2) == 0
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (mode, "bf16", P)

        # Random routing and weights, nonlinear experts.
        r = _routing(T := 12, k, mode, seed=200 + rank)
        x, g = torch.randn(T, D), torch.randn(T, D)
        ref = _run(LocalDispatcher(), x, r, scale_E, 0, g)
        outs = {}
        for name, disp in disps.items():
            outs[name] = got = _run(disp, x, r, scale_E, offset, g)
            for a, b, what in zip(got, ref, ("out", "x grad", "w grad")):
                torch.testing.assert_close(a, b, **TOL, msg=f"{mode} {name} {what} ep{P}")
        for name in ("plain", "allgather"):  # directly against each other, too
            for a, b in zip(outs[name], outs["dedup"]):
                torch.testing.assert_close(a, b, **TOL, msg=f"{mode} {name} vs dedup")
        again = _run(disps["dedup"], x, r, scale_E, offset, g)  # deterministic, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(again, outs["dedup"]))

        # Bytes: the token-by-token oracle, over the whole EP group.
        row = D * 4
        for name, dedup in (("dedup", True), ("plain", False)):
            m = torch.zeros(P, P, dtype=torch.long)
            m[me] = torch.tensor(_oracle_units(r, P, dedup))
            if mode == "pad":  # static: U rows to every rank
                U = n_local * r.capacity if not dedup else min(T, n_local * r.capacity)
                m[me] = U
            dist.all_reduce(m, group=group)
            off = m - torch.diag(torch.diag(m))
            _run(disps[name], x, r, scale_E, offset, g)
            want = int(off[me].sum() + off[:, me].sum()) * row
            assert disps[name].bytes_sent == disps[name].bytes_received == want, (mode, name)
        ag = disps["allgather"]
        assert ag.bytes_sent == 2 * (P - 1) * T * row
        if mode == "dropless":  # k=4 > n_local or P=2: tokens always share a rank
            total = torch.tensor([disps["dedup"].bytes_sent, disps["plain"].bytes_sent])
            dist.all_reduce(total, group=group)
            assert total[0] < total[1], total

    # Skewed and empty: every token goes to the last EP rank's experts; ranks hold
    # different token counts, one holds none; the other experts get zero tokens.
    T = [9, 0, 5, 3][me]
    skew = torch.zeros(E)
    skew[(P - 1) * n_local :] = 100.0
    r = _routing(T, min(2, n_local), "dropless", seed=300 + rank, skew=skew)
    x, g = torch.randn(T, D), torch.randn(T, D)
    # LocalDispatcher cannot take 0 tokens (models/moe.py _Combine: view(T, k, -1)).
    ref = (x, x, r.weights_TK.detach()) if T == 0 else _run(LocalDispatcher(), x, r, scale_E, 0, g)
    for name in ("dedup", "plain"):
        got = _run(disps[name], x, r, scale_E, offset, g)
        for a, b, what in zip(got, ref, ("out", "x grad", "w grad")):
            torch.testing.assert_close(a, b, **TOL, msg=f"skew {name} {what} ep{P}")
        x_ND, tpe, _ = disps[name].dispatch(x, r)
        if me != P - 1:
            assert x_ND.shape[0] == 0 and int(tpe.sum()) == 0


def _make_layer(mode: str) -> MoELayer:
    moe = MoEConfig(
        num_experts=E, top_k=4, expert_ffn_hidden_size=FFN, aux_loss_coeff=0.01, z_loss_coeff=1e-3
    )
    if mode != "dropless":
        moe.capacity_factor, moe.pad_to_capacity = 1.0, mode == "pad"
    layer = MoELayer(ModelConfig(hidden_size=D, moe=moe))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _check_layers(dims: ParallelDims, rank: int) -> None:
    """EP(xETP) MoELayer == unsharded MoELayer on this rank's tokens; expert grads == the
    sum over the ep x etp group of the reference grads, sliced to this rank's experts and
    FFN columns."""
    group, P, Q = dims.group("ep_etp"), dims.ep, dims.etp
    lo, El = dims.coords()["ep"] * (E // P), E // P
    F_l = FFN // Q
    f0 = dims.coords()["etp"] * F_l
    gen = torch.Generator().manual_seed(rank)
    x, g = torch.randn(2, 8, D, generator=gen), torch.randn(2, 8, D, generator=gen)
    kinds = (("alltoall", True), ("alltoall", False), ("allgather", True)) if P > 1 else (
        ("alltoall", True),)
    for mode in ("dropless", "drop", "pad"):
        ref = _make_layer(mode)
        xr = x.clone().requires_grad_()
        out_ref = ref(xr)
        names = ["router.weight", "experts.w1", "experts.w3", "experts.w2"]
        params = dict(ref.named_parameters())
        want = torch.autograd.grad(out_ref, [xr] + [params[n] for n in names], g)
        want = list(want)
        for i, ffn_dim in ((2, 2), (3, 2), (4, 1)):
            dist.all_reduce(want[i], group=group)
            want[i] = want[i][lo : lo + El].narrow(ffn_dim, f0, F_l)
        for kind, dedup in kinds:
            layer = copy.deepcopy(ref)
            apply_expert_parallel(layer, dims, kind, dedup=dedup)
            assert layer.experts.expert_offset == lo and layer.experts.w1.shape[0] == El
            assert layer.experts.w1.shape[2] == F_l and layer.experts.ffn_offset == f0
            xe = x.clone().requires_grad_()
            out = layer(xe)
            params = dict(layer.named_parameters())
            got = torch.autograd.grad(out, [xe] + [params[n] for n in names], g)
            tag = f"{mode} {kind} dedup={dedup} ep{P} etp{Q}"
            torch.testing.assert_close(out, out_ref, **TOL, msg=tag)
            for n, a, b in zip(["x"] + names, got, want):
                # The EP gradient sums the same terms in another order (per rank, then the
                # all-reduce): fp32 rounding scales with the gradient's magnitude (an
                # experts.w2 gradient of max 17 differed by 1.3e-6 on one CPU model).
                scale = max(1.0, float(b.abs().max()))
                torch.testing.assert_close(
                    a, b, rtol=TOL["rtol"], atol=TOL["atol"] * scale,
                    msg=lambda m, tag=tag, n=n: f"{tag} grad {n}: {m}")
            assert layer.dispatcher.bytes_sent > 0  # every rank sends rows to its peers


def _check_model(dims: ParallelDims, rank: int) -> None:
    """Meta-device model sharded, then initialised == slices of the unsharded model;
    sharding an initialised model slices its real weights; the EP model's logits match."""
    moe = MoEConfig(num_experts=E, top_k=2, expert_ffn_hidden_size=FFN)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=D, num_layers=2, num_heads=2, num_kv_heads=1,
        ffn_hidden_size=32, max_seq_len=32, moe=moe,
    )  # fmt: skip
    torch.manual_seed(7)
    full = build_model(cfg, "cpu")
    meta = build_model(cfg, "meta")
    apply_expert_parallel(meta, dims)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.init_weights()
    real = copy.deepcopy(full)
    apply_expert_parallel(real, dims)
    lo, n = dims.coords()["ep"] * (E // dims.ep), E // dims.ep
    F_l = FFN // dims.etp
    f0 = dims.coords()["etp"] * F_l
    want = dict(full.named_parameters())
    for model in (meta, real):
        for name, p in model.named_parameters():
            ref = want[name]
            if ".experts." in name:
                ref = ref[lo : lo + n].narrow(1 if name.endswith("w2") else 2, f0, F_l)
            assert torch.equal(p, ref), name
    if dims.etp == 1:
        for layer, ref in zip(real.moe_layers(), full.moe_layers()):
            for name, w in gather_expert_weights(layer, dims.group("ep")).items():
                assert torch.equal(w, getattr(ref.experts, name)), name
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(real(tokens), full(tokens), **TOL)


def _check_token_group(rank: int, world: int) -> None:
    """A router on this rank's 1/world of every sequence, with SeqChunkGroup over the
    world, equals the router on the whole micro-batch: counts, drops, the three losses,
    the kept mask, and the router-weight gradient (summed over the group)."""
    group = dist.group.WORLD
    B, S = 2, 8
    S_l = S // world
    for cap in (None, "probs", "position"):
        moe = MoEConfig(num_experts=E, top_k=2, aux_loss_coeff=1.0, seq_aux_loss_coeff=1.0,
                        z_loss_coeff=1.0, capacity_factor=None if cap is None else 0.5,
                        drop_policy=cap or "probs")
        ref = _make_layer("dropless").router
        ref.moe = moe
        x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))
        full = ref(x.reshape(-1, D), num_seqs=B)
        loss_full = full.aux_loss + full.seq_aux_loss + full.z_loss
        (want,) = torch.autograd.grad(loss_full, ref.weight)
        mine = copy.deepcopy(ref)
        x_l = x[:, rank * S_l : (rank + 1) * S_l].reshape(-1, D)
        out = mine(x_l, num_seqs=B, group=SeqChunkGroup(group))
        tag = f"token group, capacity={cap}"
        assert torch.equal(out.counts_E, full.counts_E), tag
        if cap is None:  # dropless: no drop count at all
            assert out.num_dropped is None and full.num_dropped is None, tag
        else:
            assert torch.equal(out.num_dropped, full.num_dropped), tag
        assert out.num_assignments == full.num_assignments
        for name in ("aux_loss", "seq_aux_loss", "z_loss"):
            torch.testing.assert_close(getattr(out, name), getattr(full, name), **TOL,
                                       msg=f"{tag} {name}")
        if cap is not None:
            kept = full.routing.kept_TK.view(B, S, -1)[:, rank * S_l : (rank + 1) * S_l]
            assert torch.equal(out.routing.kept_TK, kept.reshape(-1, kept.shape[-1])), tag
            assert full.num_dropped > 0, tag
        (got,) = torch.autograd.grad(out.aux_loss + out.seq_aux_loss + out.z_loss, mine.weight)
        torch.testing.assert_close(got, want, **TOL, msg=f"{tag} router grad")


def _worker(rank: int, world: int) -> int:
    _check_token_group(rank, world)
    for ep, etp in LAYOUTS[world]:
        dims = _dims(world, ep, etp)
        if etp == 1:
            _check_dispatchers(dims, rank)
        _check_layers(dims, rank)
        _check_model(dims, rank)
    return rank


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_expert_parallel_matches_single_process(world):
    assert spawn(_worker, world) == list(range(world))


def _fail_or_hang(rank: int, world: int, hang: bool) -> None:
    if hang:  # no collective: only the parent's deadline can end this
        time.sleep(600)
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits here for the broken rank, then loses its peer


def test_spawn_fails_fast():
    """The root-cause rank's traceback comes first; a hung run is killed at its deadline
    (600 s of sleep would otherwise hit the test's timeout)."""
    with pytest.raises(
        ProcessRaisedException,
        match=r"^\s*-- rank 1 failed first:\nTraceback(?s:.)*?ValueError: boom on rank 1",
    ):
        spawn(_fail_or_hang, 2, False, timeout_s=60)
    with pytest.raises(TimeoutError, match="past 5"):
        spawn(_fail_or_hang, 2, True, timeout_s=5)


def test_check_expert_parallel_rejects_bad_layouts():
    # parallel/ raises plain ValueErrors; trainer.config turns them into ConfigErrors
    with pytest.raises(ValueError, match=r"parallel\.etp=3 does not divide .*=8"):
        check_expert_parallel(E, FFN, 1, 3, "alltoall")
    with pytest.raises(ValueError, match=r"parallel\.ep=3 does not divide .*=8 \(valid: 1, 2, 4, 8\)"):
        check_expert_parallel(E, FFN, 3, 1, "alltoall")
    with pytest.raises(ValueError, match="dispatcher='ring'"):
        check_expert_parallel(E, FFN, 1, 1, "ring")
    check_expert_parallel(E, FFN, 2, 2, "allgather")  # fine
    layer = MoELayer(ModelConfig(hidden_size=D, moe=MoEConfig(
        num_experts=E, top_k=2, expert_ffn_hidden_size=FFN)))
    one = ParallelDims.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=1, etp=1), 2)
    apply_expert_parallel(layer, one)  # ep=1: nothing to shard, LocalDispatcher stays
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.experts.w1.shape[0] == E
