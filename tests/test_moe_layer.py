"""MoELayer against a naive reference (a loop over experts with masks), grouped_mm
implementations against each other, aux-loss gradient plumbing, expert bias and stats;
host-sync-prone calls and aten-op counts of one layer (counted, never timed), and the
combine's fp32 under bf16 autocast."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from models import grouped_gemm
from models.config import ModelConfig, MoEConfig
from models.grouped_gemm import grouped_mm
from models.moe import LocalDispatcher, MoELayer, set_aux_loss_scale
from models.permute import SlotMap, gather_rows, reduce_rows
from models.router import expert_capacity
from scripts.bench_moe_layer import SyncCounter, count_fwd_bwd, make_hf, make_ours

B, S, D, FFN = 2, 16, 16, 8


def make_layer(seed: int = 0, **moe) -> MoELayer:
    moe.setdefault("num_experts", 8)
    moe.setdefault("top_k", 2)
    moe.setdefault("expert_ffn_hidden_size", FFN)
    layer = MoELayer(ModelConfig(hidden_size=D, moe=MoEConfig(**moe)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def make_x(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(B, S, D, requires_grad=True)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference(layer: MoELayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing weight (softmax router)."""
    m, r, ex = layer.moe, layer.router, layer.experts
    x = x_BTD.reshape(-1, D)
    T, E, k = x.shape[0], m.num_experts, m.top_k
    logits = x @ r.weight.t()
    probs = logits.softmax(-1)
    sel = logits + (r.expert_bias if r.expert_bias is not None else 0)
    idx = sel.topk(k, dim=-1).indices
    top = probs.gather(1, idx)
    w = top / top.sum(-1, keepdim=True) if m.norm_topk_prob else top
    kept = torch.ones_like(idx, dtype=torch.bool)
    if m.capacity_factor is not None:
        cap = expert_capacity(T, E, k, m.capacity_factor, m.min_capacity)
        for e in range(E):
            hit = idx == e
            tokens = hit.any(1).nonzero().flatten()
            if m.drop_policy == "probs":
                score = (top.detach() * hit).sum(1)[tokens]
                tokens = tokens[torch.argsort(-score, stable=True)]
            kept[tokens[cap:]] &= ~hit[tokens[cap:]]
    y = torch.zeros_like(x)
    for e in range(E):
        w_e = (w * ((idx == e) & kept)).sum(1, keepdim=True)
        y = y + w_e * swiglu(x, ex.w1[e], ex.w3[e], ex.w2[e])
    if layer.shared_experts is not None:
        se = layer.shared_experts
        s = swiglu(x, se.w1.weight.t(), se.w3.weight.t(), se.w2.weight.t())
        if layer.shared_gate is not None:
            s = s * torch.sigmoid(x @ layer.shared_gate.weight.t())
        y = y + s
    return y.view_as(x_BTD)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g, allow_unused=True))


MODES = {
    "dropless": {},
    "probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "position": dict(capacity_factor=1.0, drop_policy="position"),
    "padded": dict(capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True),
    "shared_gate": dict(
        num_shared_experts=2,
        shared_expert_ffn_hidden_size=4,
        shared_expert_gate=True,
        norm_topk_prob=False,
    ),
    "padded_position_shared": dict(
        capacity_factor=0.75, drop_policy="position", pad_to_capacity=True, num_shared_experts=1
    ),
}


def assert_matches_reference(layer: MoELayer, x: torch.Tensor) -> None:
    """The layer's output and the gradients of x and of every parameter equal the
    reference's."""
    out = layer(x)
    ref = reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, *layer.parameters()]
    g = torch.randn_like(out)
    for got, want in zip(grads(out, params, g), grads(ref, params, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "fused_device", "loop_segments", "loop_padded"])
@pytest.mark.parametrize("mode", list(MODES))
def test_layer_matches_reference(mode, impl, monkeypatch):
    """fused_device: the sync-free path CUDA takes (where() masks, no read of the total)."""
    if impl == "fused_device":
        monkeypatch.setattr(grouped_gemm, "READ_TOTAL_ON_CPU", False)
        impl = "fused"
    layer = make_layer(**MODES[mode])
    layer.experts.grouped_mm_impl = impl
    with torch.no_grad():  # skew the load so that capacity really drops assignments
        layer.router.weight[0] += layer.router.weight[1]
    x = make_x()
    assert_matches_reference(layer, x)
    stats = layer.pop_stats()
    if MODES[mode].get("capacity_factor"):
        assert stats["dropped"] > 0, "capacity should drop something in this setup"


def test_padded_dispatch_shapes_are_static():
    layer = make_layer(capacity_factor=1.0, pad_to_capacity=True)
    x_TD = make_x().detach().reshape(-1, D)
    routing = layer.router(x_TD).routing
    x_ND, tpe, _ = layer.dispatcher.dispatch(x_TD, routing)
    C = routing.capacity
    assert x_ND.shape == (8 * C, D) and torch.equal(tpe, torch.full((8,), C))
    assert layer.dispatcher.bytes_sent == layer.dispatcher.bytes_received == 0


@pytest.mark.parametrize("impl", ["auto", "loop_segments", "loop_padded"])
def test_experts_with_zero_tokens(impl):
    layer = make_layer(expert_bias=True)
    layer.experts.grouped_mm_impl = impl
    layer.router.expert_bias[[0, 5]] = -1e3  # never selected
    x = make_x()
    x_TD = x.detach().reshape(-1, D)
    _, tpe, _ = LocalDispatcher().dispatch(x_TD, layer.router(x_TD).routing)
    assert tpe[0] == 0 and tpe[5] == 0 and tpe.sum() == B * S * 2
    out = layer(x)
    torch.testing.assert_close(out, reference(layer, x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        assert torch.all(w.grad[[0, 5]] == 0) and torch.any(w.grad[1] != 0)


@pytest.mark.parametrize("read_total", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_fused_equals_loop(dtype, read_total, monkeypatch):
    monkeypatch.setattr(grouped_gemm, "READ_TOTAL_ON_CPU", read_total)
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 4])  # two empty experts, 3 trailing rows
    x0 = torch.randn(15, 16).to(dtype)
    w0 = torch.randn(5, 16, 8).to(dtype)
    x0[12:] = float("nan")  # trailing rows belong to no expert: must not leak
    results = []
    for impl in ("fused", "loop"):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        y = grouped_mm(x, w, counts, impl=impl)
        y.backward(torch.arange(y.numel(), dtype=dtype).view_as(y).t().contiguous().t() / 100)
        results.append((y, x.grad, w.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-1)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    for y, xg, wg in results:  # both: NaN trailing rows leak nowhere, empty experts get 0
        assert torch.all(y[12:] == 0) and torch.all(xg[12:] == 0)
        assert torch.all(wg[1] == 0) and torch.all(wg[3] == 0)
        torch.testing.assert_close(y[3:8].float(), (x0[3:8] @ w0[2]).float(), **tol)


def test_grouped_mm_loop_under_autocast_casts_like_matmul():
    # the loop's out= matmuls run outside autocast: operands cast first, as autocast would
    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 3])
    x0, w0 = torch.randn(6, 16), torch.randn(3, 16, 8)
    grads = []
    for impl in ("fused", "loop"):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = grouped_mm(x, w, counts, impl=impl)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert w.grad.dtype == torch.float32
        grads.append((y, x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aux_loss_adds_gradient_without_changing_output():
    coeffs = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.05, z_loss_coeff=0.01)
    layer = make_layer(**coeffs)
    plain = make_layer()
    plain.load_state_dict(layer.state_dict())
    set_aux_loss_scale(torch.nn.Sequential(layer), 0.25)
    assert layer.aux_loss_scale == 0.25
    x = make_x()
    out = layer(x)
    out_plain = plain(x)
    assert torch.equal(out, out_plain)  # forward untouched
    params = list(layer.parameters())
    got = grads(out.sum(), params, None)
    # Explicit objective: sum(out) + scale * (coeff * loss), losses from the router.
    r = layer.router(x.reshape(-1, D), num_seqs=B)
    aux = 0.1 * r.aux_loss + 0.05 * r.seq_aux_loss + 0.01 * r.z_loss
    want = grads(reference(layer, x).sum() + 0.25 * aux, params, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    no_aux = grads(reference(layer, x).sum(), params, None)
    assert not torch.allclose(got[0], no_aux[0])  # router.weight felt the aux losses
    stats = layer.pop_stats()
    torch.testing.assert_close(stats["aux_loss"], 0.25 * 0.1 * r.aux_loss.detach())
    torch.testing.assert_close(stats["seq_aux_loss"], 0.25 * 0.05 * r.seq_aux_loss.detach())
    torch.testing.assert_close(stats["z_loss"], 0.25 * 0.01 * r.z_loss.detach())


def test_expert_bias_selection_not_weights_and_update():
    layer = make_layer(score_func="sigmoid", expert_bias=True, expert_bias_update_rate=1e-4)
    x_TD = make_x().detach().reshape(-1, D)
    layer.router.expert_bias[3] = 10.0
    r = layer.router(x_TD).routing
    assert torch.all((r.expert_idx_TK == 3).any(1)), "bias must force expert 3 in"
    scores = torch.sigmoid(x_TD @ layer.router.weight.detach().t()).gather(1, r.expert_idx_TK)
    torch.testing.assert_close(r.weights_TK, scores / scores.sum(-1, keepdim=True))

    layer.router.expert_bias.copy_(torch.linspace(-1, 1, 8) + 1.0)
    layer.to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.stat_row.dtype == torch.float32
    assert layer.experts.w1.dtype == torch.bfloat16
    before = layer.router.expert_bias.clone()
    torch.testing.assert_close(before, torch.linspace(-1, 1, 8) + 1.0, rtol=0, atol=0)
    counts = torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5])  # mean 5
    layer.update_expert_bias(counts)
    step = layer.router.expert_bias - before
    torch.testing.assert_close(step, torch.tensor([-1e-4, 1e-4, 0, 0, 0, 0, 0, 0]))
    out = layer(make_x().detach().to(torch.bfloat16))  # bf16 module, fp32 routing
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_pop_stats_counts_and_reset():
    layer = make_layer(capacity_factor=0.5, aux_loss_coeff=0.1)
    xs = [make_x(seed) for seed in (1, 2)]
    expected = torch.zeros(8)
    dropped = 0
    for x in xs:
        r = layer.router(x.detach().reshape(-1, D))
        expected += torch.bincount(r.routing.expert_idx_TK.flatten(), minlength=8)
        dropped += int((~r.routing.kept_TK).sum())
        layer(x)
    stats = layer.pop_stats()
    assert torch.equal(stats["counts"], expected)
    assert stats["assignments"] == 2 * B * S * 2 and stats["dropped"] == dropped > 0
    cap = expert_capacity(B * S, 8, 2, 0.5)
    assert cap == math.ceil(B * S * 2 / 8 * 0.5)
    assert stats["aux_loss"] > 0
    again = layer.pop_stats()
    assert all(float(v.sum()) == 0 for v in again.values())


def test_checkpoint_recompute_does_not_double_count_stats():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(aux_loss_coeff=0.1)
    x = make_x()
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    stats = layer.pop_stats()
    assert stats["assignments"] == B * S * 2 and stats["counts"].sum() == B * S * 2
    g_ckpt = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    layer(x).sum().backward()  # aux gradient also survives the recompute
    torch.testing.assert_close(layer.router.weight.grad, g_ckpt)


@pytest.mark.parametrize(
    "impl, read_total, syncs",
    [
        ("fused", False, {}),  # the device path: no host sync at all
        # dropless: every row is fed, so not even CPU reads the total (a capacity layer
        # does: test_capacity_layer_reads_total_on_cpu)
        ("fused", True, {}),
        # the fallback: one sync for the three GEMMs, segment loop or padded bmm
        ("loop_segments", True, {"tolist": 1}),
        ("loop_padded", True, {"tolist": 1}),
    ],
)
@pytest.mark.parametrize("mode", ["dropless", "shared_gate"])
def test_local_layer_host_syncs(mode, impl, read_total, syncs, monkeypatch):
    """Host-sync-prone calls (item/tolist/bool/int of a tensor, nonzero, bincount,
    boolean-mask indexing, ...) in one local MoE layer fwd+bwd: at most one."""
    monkeypatch.setattr(grouped_gemm, "READ_TOTAL_ON_CPU", read_total)
    layer = make_layer(**MODES[mode])
    layer.experts.grouped_mm_impl = impl
    x = make_x()
    _, counter = count_fwd_bwd(lambda: layer(x), x)
    assert dict(counter.calls) == syncs
    with SyncCounter() as c:  # the counter sees what it must
        torch.bincount(torch.tensor([1, 2])).tolist()
        bool(torch.tensor(True))
        torch.arange(3)[torch.tensor([True, False, True])]
    assert dict(c.calls) == {"bincount": 1, "tolist": 1, "__bool__": 1, "__getitem__[bool mask]": 1}


@pytest.mark.parametrize("mode", ["probs", "padded"])
def test_capacity_layer_host_syncs(mode, monkeypatch):
    """With capacity, only expert_capacity's read of a host-built scalar remains."""
    monkeypatch.setattr(grouped_gemm, "READ_TOTAL_ON_CPU", False)
    layer = make_layer(**MODES[mode])
    x = make_x()
    _, counter = count_fwd_bwd(lambda: layer(x), x)
    assert dict(counter.calls) == {"item": 1}


def test_loop_fallback_picks_padded_when_the_padding_is_cheap():
    """Balanced small segments: the calls saved outweigh the padding (no overflow tier:
    nothing to pad); one long segment among short ones: on CUDA a main tier of one row and
    the long one's overflow, on CPU (where the tier is priced high) the segment loop; big
    rows of uneven lengths: the segment loop."""
    pays = grouped_gemm.padded_pays
    assert pays([32] * 64, 64, 64, "cpu") == grouped_gemm.PadPlan(32, (), 0, 0.0)
    plan = pays([4096] + [1] * 7, 256, 512, "cuda")
    assert (plan.C0, plan.over, plan.C1) == (1, (0,), 4095)
    assert pays([4096] + [1] * 7, 256, 512, "cpu") is None
    assert pays([600, 400, 500, 548], 256, 512, "cpu") is None
    assert pays([0, 0], 64, 64, "cpu") is None


def test_pad_plan_overflow_tier_cuts_the_padding():
    """A skewed load (an early router's: expert i picked ~ i^-0.5) of 32768 rows over 64
    experts at the GPU check's shape, priced for CUDA: the overflow tier takes the few long
    segments, and the padded bmm (chosen over the segment loop) pads less than half what
    one tier would (E * longest rows)."""
    torch.manual_seed(0)
    p = torch.arange(1, 65).float().pow(-0.5)
    picks = torch.multinomial(p / p.sum(), 32768, replacement=True)
    counts = torch.bincount(picks, minlength=64).tolist()
    plan = grouped_gemm.padded_pays(counts, 1024, 512, "cuda")
    assert plan is not None and plan.over
    assert all(counts[e] > plan.C0 for e in plan.over)
    assert sum(c > plan.C0 for c in counts) == len(plan.over)
    assert plan.C0 + plan.C1 == max(counts)
    waste = 64 * plan.C0 + len(plan.over) * plan.C1 - 32768
    assert 0 <= waste < 0.5 * (64 * max(counts) - 32768)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[9, 0, 2, 3, 1, 0, 7, 2], [0, 0, 5, 0], [4, 4, 4, 4]])
def test_padded_layouts_equal_the_segment_loop(counts, dtype):
    """The padded SwiGLU with and without an overflow tier (every main-tier length C0
    the counts allow, empty experts and trailing rows included), and the grouped GEMM on
    segments rounded up to 4 and to 32 rows (``align_segments``): values and the
    gradients of x and of the three weights equal the segment loop's."""
    from models.grouped_gemm import PadPlan, grouped_mm_loop_unmasked
    torch.manual_seed(0)
    E, total, n = len(counts), sum(counts), sum(counts) + 3
    x0 = torch.randn(n, 16).to(dtype)
    x0[total:] = float("nan")  # trailing rows: no expert
    ws0 = [torch.randn(E, 16, 8).to(dtype), torch.randn(E, 16, 8).to(dtype),
           torch.randn(E, 8, 16).to(dtype)]
    tpe = torch.tensor(counts)
    longest = max(counts)
    plans = [PadPlan(longest, (), 0, 0.0)] + [
        PadPlan(C0, tuple(e for e, c in enumerate(counts) if c > C0), longest - C0, 0.0)
        for C0 in sorted(set(counts)) if C0 < longest]
    g = torch.randn(n, 16).to(dtype)

    def run(fn):
        x = x0.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in ws0]
        y = fn(x, *ws)
        y.backward(g)
        return [y.detach(), x.grad, *(w.grad for w in ws)]

    def loop(x, w1, w3, w2):
        h = F.silu(grouped_mm_loop_unmasked(x, w1, counts))
        return grouped_mm_loop_unmasked(h * grouped_mm_loop_unmasked(x, w3, counts), w2,
                                        counts)

    want = run(loop)

    def padded(x, w1, w3, w2, plan):
        x_R, dest = grouped_gemm.pad_segments(x, tpe, counts, plan)
        return grouped_gemm.unpad_segments(grouped_gemm.padded_swiglu(x_R, w1, w3, w2, plan),
                                           dest, n)

    def aligned(x, w1, w3, w2, multiple):
        x_R, dest, offs = grouped_gemm.align_segments(x, tpe, counts, multiple)
        assert (offs % multiple == 0).all() and x_R.shape[0] == offs[-1]
        gmm = grouped_gemm.grouped_mm_fused_unmasked
        h = F.silu(gmm(x_R, w1, offs)) * gmm(x_R, w3, offs)
        return grouped_gemm.unpad_segments(gmm(h, w2, offs), dest, n)

    layouts = [functools.partial(padded, plan=plan) for plan in plans]
    layouts += [functools.partial(aligned, multiple=m) for m in (4, 32)]
    for layout in layouts:
        # (bf16: both round each GEMM output to bf16, in other summation orders)
        tol = dict(rtol=5e-2, atol=1e-1) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
        for got, ref in zip(run(layout), want):
            assert not got.isnan().any()
            torch.testing.assert_close(got, ref, **tol)
    assert grouped_gemm.cost_kind("cpu", torch.bfloat16) == "cpu_lowp"
    assert grouped_gemm.cost_kind("cuda", torch.float32) == "cuda"


def test_layer_with_an_overflow_tier_matches_reference(monkeypatch):
    """The MoE layer on the loop fallback with the overflow tier priced free (as a GPU's
    skewed load would take it): a skewed router, values and gradients of the reference."""
    monkeypatch.setitem(grouped_gemm.TIER_COST_S, "cpu", 0.0)
    layer = make_layer()
    layer.experts.grouped_mm_impl = "loop_padded"
    with torch.no_grad():  # skew the load: expert 0 takes most tokens
        layer.router.weight[0] += 3 * layer.router.weight[1].abs()
    x = make_x()
    x_TD = x.detach().reshape(-1, D)
    _, tpe, _ = LocalDispatcher().dispatch(x_TD, layer.router(x_TD).routing)
    plan = grouped_gemm.pad_plan(tpe.tolist(), D, FFN, "cpu")
    assert plan.over, f"the counts {tpe.tolist()} should take an overflow tier"
    assert_matches_reference(layer, x)


def test_cpu_bf16_auto_runs_padded_bmm_at_small_segments():
    """CPU, bf16 autocast, 8 small segments: "auto" takes the padded bmm (CPU's bf16
    grouped GEMM sets up oneDNN per segment shape), with the fused path's values."""
    layer = make_layer()
    x = make_x()
    calls = []
    orig = layer.experts._padded
    layer.experts._padded = lambda *a: calls.append(1) or orig(*a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        layer.experts.grouped_mm_impl = "fused"
        ref = layer(x)
    assert calls == [1]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["auto", "loop_segments"])
@pytest.mark.parametrize("mode", ["dropless", "probs"])
def test_cpu_bf16_rounds_the_segments(mode, impl, monkeypatch):
    """CPU, bf16 autocast, the grouped GEMM ("auto", the padded bmm priced out) and the
    segment loop: every segment they see is a multiple of ROW_ALIGN["cpu_lowp"] rows
    (oneDNN's kernels for recurring shapes stay cached), with the unrounded kernel's
    output and gradients (dropped assignments' trailing rows included)."""
    import models.moe as moe_mod
    monkeypatch.setattr(moe_mod, "padded_pays", lambda *a: None)
    seen = []
    kernel = "grouped_mm_fused_unmasked" if impl == "auto" else "grouped_mm_loop_unmasked"
    orig = getattr(moe_mod, kernel)

    def spy(x, w, segments):
        seen.append(torch.as_tensor(segments).cumsum(0) if impl != "auto" else segments)
        return orig(x, w, segments)

    monkeypatch.setattr(moe_mod, kernel, spy)
    layer = make_layer(**MODES[mode])
    x = make_x()
    params = [x, *layer.parameters()]

    def run(impl):
        layer.experts.grouped_mm_impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        return [out, *grads(out, params, torch.ones_like(out))]

    got = run(impl)
    m = grouped_gemm.ROW_ALIGN["cpu_lowp"]
    assert m > 1 and len(seen) == 3 and all((o % m == 0).all() for o in seen), seen
    want = run("fused")
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_cpu_bf16_plans_round_to_row_align():
    """CPU bf16: both tiers of the padded bmm's plan are multiples of ROW_ALIGN rows (one
    tier, and an overflow tier for one very long segment); fp32 is left unrounded."""
    m = grouped_gemm.ROW_ALIGN["cpu_lowp"]
    plan = grouped_gemm.pad_plan([33, 20, 7, 0], 64, 64, "cpu_lowp")
    assert (plan.C0, plan.over) == (2 * m, ())
    plan = grouped_gemm.pad_plan([50000] + [40] * 7, 1024, 1024, "cpu_lowp")
    assert plan.over == (0,) and plan.C0 % m == 0 and plan.C1 % m == 0
    assert plan.C0 >= 40 and plan.C0 + plan.C1 >= 50000
    assert grouped_gemm.pad_plan([33, 20], 64, 64, "cpu").C0 == 33


def test_capacity_layer_reads_total_on_cpu(monkeypatch):
    """With drops, the CPU path reads the fed-row total once (host memory, no wait)."""
    monkeypatch.setattr(grouped_gemm, "READ_TOTAL_ON_CPU", True)
    layer = make_layer(**MODES["probs"])
    x = make_x()
    _, counter = count_fwd_bwd(lambda: layer(x), x)
    assert dict(counter.calls) == {"item": 1, "__int__": 1}


def test_aten_ops_at_most_hf_mixtral_block():
    """Ops (not time) per fwd+bwd at the tiny shape: ours <= transformers'
    MixtralSparseMoeBlock (eager experts), with identical weights and outputs."""
    ours = make_ours(64, 64, 8, 2)
    hf = make_hf(ours, "eager")
    torch.manual_seed(0)
    x = torch.randn(1, 256, 64, requires_grad=True)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-4, atol=1e-5)
    ops_ours, _ = count_fwd_bwd(lambda: ours(x), x)
    ops_hf, _ = count_fwd_bwd(lambda: hf(x), x)
    assert 0 < ops_ours.total <= ops_hf.total, (ops_ours.total, ops_hf.total)


def _slot_map(kind: str, M: int, K: int) -> tuple[SlotMap, int]:
    """all_fed: every slot a row; unused: 4 slots feed no row; padding: 4 slots feed no
    row and 3 rows are fed by no slot."""
    if kind == "all_fed":
        return SlotMap.sorted_by(torch.randint(0, 4, (M, K))), M * K
    fed = M * K - 4
    R = fed + (3 if kind == "padding" else 0)
    row_MS = torch.full((M * K,), -1)
    row_MS[torch.randperm(M * K)[:fed]] = torch.randperm(R)[:fed]
    return SlotMap.build(row_MS.view(M, K), R, dense=kind != "padding"), R


@pytest.mark.parametrize("kind", ["all_fed", "unused", "padding"])
def test_gather_and_reduce_rows_fp32_under_bf16_autocast(kind):
    """gather_rows / reduce_rows and their backwards against an fp64 loop: the k-way
    weighted sum and its gradients stay fp32 under CPU bf16 autocast (far below bf16
    rounding, ~4e-3 relative); unused slots add nothing and get zero weight gradient;
    padding rows are zero and get zero gradient."""
    torch.manual_seed(0)
    M, K, Dm = 6, 3, 8
    m, R = _slot_map(kind, M, K)
    y = (1 + torch.rand(R, Dm)).requires_grad_()
    w = torch.rand(M, K).requires_grad_()
    x = torch.rand(M, Dm).requires_grad_()
    g_out, g_rows = torch.rand(M, Dm), torch.rand(R, Dm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reduce_rows(y, w, m, torch.float32)
        gy, gw = torch.autograd.grad(out, [y, w], g_out)
        rows = gather_rows(x, m)
        (gx,) = torch.autograd.grad(rows, [x], g_rows)
    assert out.dtype == gy.dtype == gw.dtype == rows.dtype == gx.dtype == torch.float32
    y64, w64, x64 = (t.detach().double().requires_grad_() for t in (y, w, x))
    ref = torch.zeros(M, Dm, dtype=torch.float64)
    ref_rows = torch.zeros(R, Dm, dtype=torch.float64)
    for i in range(M):
        for s in range(K):
            r = int(m.row_MS[i, s])
            if r >= 0:
                ref[i] = ref[i] + w64[i, s] * y64[r]
                ref_rows[r] = x64[i]
    ry, rw = torch.autograd.grad(ref, [y64, w64], g_out.double())
    (rx,) = torch.autograd.grad(ref_rows, [x64], g_rows.double())
    for a, b in ((out, ref), (gy, ry), (gw, rw), (rows, ref_rows), (gx, rx)):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    if kind != "all_fed":
        assert (gw[m.row_MS < 0] == 0).all()
    # bit for bit the fp32 sum over slots in slot order (what the docstrings promise)
    g_pad = torch.cat([g_rows, torch.zeros(1, Dm)])
    slot_rows = torch.where(m.row_MS >= 0, m.row_MS, R)
    gx32 = torch.zeros(M, Dm)
    for s in range(K):
        gx32 = gx32 + g_pad[slot_rows[:, s]]
    assert torch.equal(gx, gx32)
