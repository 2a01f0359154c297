"""Mamba-1 / Mixture-of-Mamba: the chunked selective scan against a step-by-step
recurrence written here, MoM against a naive per-modality reference and the dense model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.config import MambaConfig, MoTConfig
from models.mamba import PROJECTIONS, causal_conv1d, selective_scan


def recurrence(u, delta, A, B, C, D, reset=None, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t ; y_t = C_t h_t + D u_t, one step at a time."""
    Bt, T, Dn = u.shape
    h = torch.zeros(Bt, Dn, A.shape[1]) if h0 is None else h0
    out = []
    for t in range(T):
        if reset is not None:
            h = h * (~reset[:, t]).float()[:, None, None]
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] \
            * B[:, t, None, :]
        out.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(out, 1), h


def _inputs(Bt=2, T=37, Dn=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bt, T, Dn, generator=g)
    delta = F.softplus(torch.randn(Bt, T, Dn, generator=g))
    A = -torch.exp(torch.randn(Dn, N, generator=g))
    B, C = torch.randn(Bt, T, N, generator=g), torch.randn(Bt, T, N, generator=g)
    D = torch.randn(Dn, generator=g)
    return [x.requires_grad_() for x in (u, delta, A, B, C, D)]


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 16, 64])  # 5: resets at a chunk start
def test_chunked_scan_equals_recurrence_outputs_and_gradients(chunk):
    args = _inputs()
    reset = torch.zeros(2, 37, dtype=torch.bool)
    reset[0, 10] = reset[1, 25] = True  # packed documents start here
    h0 = torch.randn(2, 6, 4)
    y, h = selective_scan(*args, reset=reset, h0=h0, chunk=chunk, return_state=True)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    y_ref, h_ref = recurrence(*ref_args, reset=reset, h0=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


def test_scan_state_carries_across_calls():
    """Scanning [0, T) equals scanning [0, t) then [t, T) from its final state — what
    context parallelism's state passing relies on."""
    u, delta, A, B, C, D = (a.detach() for a in _inputs(T=40))
    full = selective_scan(u, delta, A, B, C, D, chunk=8)
    y1, h = selective_scan(u[:, :17], delta[:, :17], A, B[:, :17], C[:, :17], D, chunk=8,
                           return_state=True)
    y2 = selective_scan(u[:, 17:], delta[:, 17:], A, B[:, 17:], C[:, 17:], D, h0=h, chunk=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-5, atol=1e-5)


def test_causal_conv_is_causal_and_stays_inside_documents():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 12, 3, generator=g), torch.randn(3, 4, generator=g), torch.zeros(3)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), groups=3).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, w, b), ref)
    doc = torch.tensor([[0] * 5 + [1] * 7])
    out = causal_conv1d(x, w, b, doc)
    torch.testing.assert_close(out[:, 5:], causal_conv1d(x[:, 5:], w, b))
    torch.testing.assert_close(out[:, :5], ref[:, :5])


def _cfg(untie=PROJECTIONS, modalities=("text", "image", "speech"), layers=""):
    return ModelConfig(name="mom_test", arch="mom", vocab_size=96, hidden_size=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=64,
                       mot=MoTConfig(modalities=list(modalities)),
                       mamba=MambaConfig(untie=list(untie), layers=layers, scan_chunk=8))


def _per_modality(x, w, ids, bias=None):
    out = 0
    for m in range(w.shape[0]):
        sel = (ids == m) if w.shape[0] > 1 else torch.ones_like(ids, dtype=torch.bool)
        y = x @ w[m] + (0 if bias is None else bias[m])
        out = out + sel.unsqueeze(-1) * y
    return out


def naive_mixer(mx, x, ids):
    """The MoM mixer with every token through every modality's weights, then masked, and
    the scan as the recurrence above."""
    di, N, R = mx.d_inner, mx.d_state, mx.dt_rank
    xz = _per_modality(x, mx.in_proj.weight.flatten(2), ids)  # stored [M, d, 2, di]
    xi, z = xz[..., :di], xz[..., di:]
    K = mx.conv_weight.shape[1]
    xi = F.silu(F.conv1d(F.pad(xi.transpose(1, 2), (K - 1, 0)), mx.conv_weight.unsqueeze(1),
                         mx.conv_bias, groups=di).transpose(1, 2))
    dbc = _per_modality(xi, mx.x_proj.weight, ids)
    dt, B, C = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    delta = F.softplus(_per_modality(dt, mx.dt_proj.weight, ids, mx.dt_bias))
    y, _ = recurrence(xi, delta, -torch.exp(mx.A_log), B, C, mx.D)
    return _per_modality(y * F.silu(z), mx.out_proj.weight, ids)


def _assert_same_outputs_and_grads(out, expect, module, ref):
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expect * w).sum().backward()
    for (n, p), (_, r) in zip(module.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("untie", [PROJECTIONS, ("in_proj", "out_proj"), ("dt_proj",), ()])
def test_mom_mixer_equals_naive_reference(untie):
    torch.manual_seed(0)
    model = build_model(_cfg(untie))
    mixer = model.layers["0"].mixer
    ref = copy.deepcopy(mixer)
    x = torch.randn(2, 20, 32)
    ids = torch.randint(0, 3, (2, 20))
    from models.modality import ModalityRoute

    out = mixer(x, ModalityRoute.build(ids, 3))
    expect = naive_mixer(ref, x, ids)
    _assert_same_outputs_and_grads(out, expect, mixer, ref)


def test_single_modality_mom_equals_dense_mamba():
    torch.manual_seed(0)
    mom = build_model(_cfg())
    torch.manual_seed(1)
    dense = build_model(_cfg(untie=()))
    dense.load_state_dict({k: v[:1] if k in dict(dense.named_parameters()) and
                           dense.get_parameter(k).shape[0] == 1 and v.dim() and
                           v.shape[0] == 3 else v for k, v in mom.state_dict().items()})
    tokens = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(mom(tokens, modality_ids_BT=torch.zeros_like(tokens)),
                               dense(tokens), rtol=1e-5, atol=1e-6)


def test_initialisation_follows_mamba():
    torch.manual_seed(0)
    mixer = build_model(_cfg()).layers["0"].mixer
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert not torch.equal(mixer.dt_bias[0], mixer.dt_bias[1])  # per modality
    torch.testing.assert_close(-torch.exp(mixer.A_log[5]), -torch.arange(1.0, 17.0))
    bound = mixer.dt_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.std() > bound / 3
    assert mixer.dt_rank == 2  # ceil(32 / 16)


def test_hybrid_stack_and_documents():
    torch.manual_seed(0)
    model = build_model(_cfg(layers="MA"))
    assert type(model.layers["0"]).__name__ == "MambaBlock"
    assert type(model.layers["1"]).__name__ == "MoTBlock"
    tokens = torch.randint(0, 96, (1, 24))
    ids = torch.randint(0, 3, (1, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14])
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    packed = model(tokens, pos, doc, modality_ids_BT=ids)
    alone = model(tokens[:, 10:], pos[:, 10:], modality_ids_BT=ids[:, 10:])
    torch.testing.assert_close(packed[:, 10:], alone, rtol=1e-4, atol=1e-5)


def test_hybrid_moe_layers_are_the_E_letters():
    """Jamba-like stacks: E layers are attention blocks whose MoE modality's FFN is the
    routed MoE; with one modality that FFN is the plain MoE layer (no empty dense part)."""
    from models.config import MoEConfig
    from models.moe import MoELayer

    cfg = _cfg(modalities=("text",), layers="ME")
    cfg.num_layers, cfg.mot.moe_modality = 2, "text"
    cfg.moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    ffn = model.layers["1"].ffn
    assert isinstance(ffn.moe, MoELayer) and not ffn.dense and not hasattr(ffn, "w1")
    x = torch.randn(2, 12, 32)
    from models.modality import ModalityRoute

    route = ModalityRoute.build(torch.zeros(2, 12, dtype=torch.long), 1)
    torch.testing.assert_close(ffn(x, route), ffn.moe(x))
    tokens = torch.randint(0, 96, (2, 12))
    model(tokens).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _fake_scan(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
    """Stand-in for mamba_ssm's selective_scan_fn with its documented contract: u, delta
    [B, D, L]; variable B, C [B, N, L] in u's dtype; A [D, N] and D fp32."""
    assert u.dim() == 3 and B.shape == (u.shape[0], A.shape[1], u.shape[2])
    assert u.stride(-1) == 1 and B.stride(-1) == 1 and delta.dtype == B.dtype == u.dtype
    assert A.dtype == D.dtype == torch.float32 and z is None and delta_bias is None
    assert not delta_softplus
    y, _ = recurrence(*(t.transpose(1, 2) for t in (u, delta)), A, B.transpose(1, 2),
                      C.transpose(1, 2), D)
    return y.transpose(1, 2)


def _fake_conv(x, weight, bias=None, seq_idx=None, activation=None):
    """Stand-in for causal_conv1d_fn: x [B, D, L] channel-last (the layout that takes
    ``seq_idx``); a tap reads only positions with the same seq_idx."""
    assert x.stride(1) == 1 and activation is None
    assert seq_idx is None or (seq_idx.dtype == torch.int32 and seq_idx.shape == (x.shape[0],
                                                                                 x.shape[2]))
    K, T = weight.shape[1], x.shape[2]
    out = []
    for t in range(T):  # direct definition, one position at a time
        acc = bias.unsqueeze(0).expand(x.shape[0], -1)
        for k in range(K):
            if t - k < 0:
                continue
            tap = x[:, :, t - k] * weight[:, K - 1 - k]
            if seq_idx is not None:
                tap = tap * (seq_idx[:, t - k] == seq_idx[:, t]).unsqueeze(-1)
            acc = acc + tap
        out.append(acc)
    return torch.stack(out, 2)


@pytest.mark.parametrize("docs", [False, True])
def test_kernel_adapters_follow_the_kernels_contract(monkeypatch, docs):
    """The CUDA kernel path (models/mamba_kernels.py) gives the reference's outputs and
    gradients when the kernels keep their documented contract; with packed documents the
    conv kernel gets them as seq_idx and the scan stays on the reference (no reset)."""
    from models import mamba_kernels
    from models.modality import ModalityRoute

    used = []
    monkeypatch.setattr(mamba_kernels, "scan_kernel",
                        lambda x, mode: used.append("scan") or _fake_scan)
    monkeypatch.setattr(mamba_kernels, "conv_kernel",
                        lambda x, mode: used.append("conv") or _fake_conv)
    torch.manual_seed(0)
    mixer = build_model(_cfg()).layers["0"].mixer
    ref = copy.deepcopy(mixer)
    ref.seq.kernels = "torch"
    assert mixer.seq.kernels == "auto"  # model.mamba.kernels=auto
    x = torch.randn(2, 14, 32)
    route = ModalityRoute.build(torch.randint(0, 3, (2, 14)), 3)
    doc = torch.tensor([[0] * 6 + [1] * 8, [0] * 14]) if docs else None
    out, expect = mixer(x, route, doc), ref(x, route, doc)
    assert used == (["conv"] if docs else ["conv", "scan"])
    _assert_same_outputs_and_grads(out, expect, mixer, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and moefold[mamba]")
def test_cuda_kernels_equal_the_reference():
    from models import mamba_kernels
    from models.mamba import SequenceScan

    if mamba_kernels.load("scan")[0] is None or mamba_kernels.load("conv")[0] is None:
        pytest.skip("mamba_ssm / causal_conv1d not installed")
    args = [a.detach().cuda().requires_grad_() for a in _inputs(T=300, Dn=64, N=16)]
    u, delta, A, B, C, D = args
    kern, ref = SequenceScan(kernels="cuda"), SequenceScan(kernels="torch")
    y = kern.scan(u, delta, A, B, C, D, None, 16)
    y_ref = ref.scan(u, delta, A, B, C, D, None, 16)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    w, b = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    doc = torch.cat([torch.zeros(2, 100), torch.ones(2, 200)], 1).long().cuda()
    torch.testing.assert_close(kern.conv(u, w, b, doc), ref.conv(u, w, b, doc),
                               rtol=1e-4, atol=1e-4)
