"""Null experts (AdaMoE) and global-batch load balancing, single process: the layer against
a naive reference, no expert rows for null picks, capacity, the balance losses over
E + n entries, the lagged global counts (uniform before the first step, restored exactly
on resume), FLOPs and validation. Parity under EP / DP / PP and the dispatch bytes:
tests/test_moe_features_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig, MoEConfig
from models.flops import param_counts, training_flops_per_token
from models.moe import MoELayer
from models.router import expert_capacity, rank_within_expert
from tests.helpers import FAST, compose_config, read_metrics
from trainer.config import validate_model
from trainer.errors import ConfigError

B, S, D, FFN, E, N = 2, 16, 16, 8, 4, 4


def make_layer(seed: int = 0, null_bias: float = 0.0, **moe) -> MoELayer:
    """A layer whose null-expert router rows are pushed by ``null_bias`` along a fixed
    direction (so many, not all, tokens pick null experts)."""
    moe = {"num_experts": E, "top_k": 3, "expert_ffn_hidden_size": FFN,
           "num_null_experts": N, **moe}
    layer = MoELayer(ModelConfig(hidden_size=D, moe=MoEConfig(**moe)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        layer.router.weight[E:, 0] += null_bias
    return layer


def make_x(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(B, S, D)
    x[..., 0] = x[..., 0].abs()  # feature 0 > 0: null_bias raises the null logits
    return x.requires_grad_()


def reference(layer: MoELayer, x_BTD: torch.Tensor):
    """Per token: softmax over E + n, top-k, the real picks' weights renormalised among
    themselves, output = their weighted expert outputs (a loop, no dispatcher)."""
    r, ex = layer.router, layer.experts
    x = x_BTD.reshape(-1, D)
    probs = (x @ r.weight.t()).softmax(-1)
    top, idx = probs.topk(layer.moe.top_k, -1)
    real = idx < E
    w = top * real
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < E:
                h = F.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])
                out[t] = out[t] + w[t, j] * (h @ ex.w2[e])
    return out.view_as(x_BTD), idx, probs


def test_null_experts_output_and_no_rows_for_null_picks():
    layer = make_layer(null_bias=1.5)
    x = make_x()
    seen = {}
    layer.experts.register_forward_hook(
        lambda mod, args, out: seen.update(rows=int(args[1].sum())))
    y = layer(x)
    ref, idx, _ = reference(layer, x)
    n_real = int((idx < E).sum())
    assert 0 < n_real < idx.numel() // 2  # most picks are null ones, but not all
    assert seen["rows"] == n_real  # the experts compute exactly the real picks' rows
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # gradients reach the null experts' router rows through the weights and the losses
    (y.square().sum()).backward()
    assert layer.router.weight.grad[E:].abs().sum() > 0
    stats = layer.pop_stats()
    assert stats["counts"].shape == (E + N,)
    torch.testing.assert_close(stats["counts"],
                               torch.bincount(idx.flatten(), minlength=E + N).float())
    assert stats["tokens"] == B * S and stats["dropped"] == 0


def test_all_null_token_outputs_zero():
    layer = make_layer(null_bias=1e4)
    y = layer(make_x())
    assert int(layer.pop_stats()["counts"][:E].sum()) == 0
    assert torch.equal(y, torch.zeros_like(y))


def test_capacity_applies_to_real_experts_only():
    layer = make_layer(capacity_factor=0.25, drop_policy="position")
    x = make_x()
    r = layer.router(x.reshape(-1, D).detach(), num_seqs=B)
    _, idx, _ = reference(layer, x)
    T = B * S
    cap = expert_capacity(T, E, 3, 0.25)
    real = idx < E
    ranks = rank_within_expert(idx.flatten(), E + N).view_as(idx)
    kept = real & (ranks < cap)
    assert torch.equal(r.routing.kept_TK, kept)
    assert int(r.num_dropped) == int((real & ~kept).sum()) > 0  # nulls never count as drops
    assert torch.equal(r.routing.expert_idx_TK, torch.where(real, idx, -1))
    assert torch.all(r.routing.weights_TK[~kept] == 0)


def test_balance_losses_cover_the_null_experts():
    layer = make_layer(null_bias=1.0, aux_loss_coeff=1.0, seq_aux_loss_coeff=1.0)
    x = make_x()
    r = layer.router(x.reshape(-1, D), num_seqs=B)
    _, idx, probs = reference(layer, x)
    En, T, k = E + N, B * S, 3
    f = torch.bincount(idx.flatten(), minlength=En).float() / (k * T)
    torch.testing.assert_close(r.aux_loss, En * (f * probs.mean(0)).sum())
    per_seq = []
    for b in range(B):
        sl = slice(b * S, (b + 1) * S)
        fs = torch.bincount(idx[sl].flatten(), minlength=En).float() / (k * S)
        per_seq.append(En * (fs * probs[sl].mean(0)).sum())
    torch.testing.assert_close(r.seq_aux_loss, torch.stack(per_seq).mean())


def test_global_batch_loss_uses_the_lagged_counts():
    layer = make_layer(aux_loss_coeff=1.0, aux_loss_scope="global_batch")
    x = make_x()
    # no history yet: uniform f, a constant loss (sum of P = 1) with no router gradient
    r = layer.router(x.reshape(-1, D), num_seqs=B)
    assert r.aux_loss.item() == pytest.approx(1.0)
    r.aux_loss.backward()
    assert layer.router.weight.grad.abs().max() < 1e-6
    counts = torch.tensor([30.0, 10, 5, 5, 20, 10, 10, 6])
    layer.router.set_global_counts(counts)
    assert "router.lb_counts" in layer.state_dict()  # persistent: checkpoints carry it
    r = layer.router(x.reshape(-1, D), num_seqs=B)
    _, _, probs = reference(layer, x)
    torch.testing.assert_close(r.aux_loss, (E + N) * (counts / counts.sum() * probs.mean(0)).sum())


def test_flops_count_real_experts_only():
    cfg = ModelConfig(moe=MoEConfig(num_experts=8, top_k=4, expert_ffn_hidden_size=64,
                                    num_null_experts=8))
    base = ModelConfig(moe=MoEConfig(num_experts=8, top_k=4, expert_ffn_hidden_size=64))
    per_expert = 6 * 3 * 64 * 64 * 4  # 6 * matmul params of one expert * layers
    assert training_flops_per_token(cfg, 32, real_experts_per_token=2.0) == pytest.approx(
        training_flops_per_token(cfg, 32) - 2 * per_expert)
    # only the router rows (hidden 64 per null expert and layer) are added
    assert param_counts(cfg)[0] - param_counts(base)[0] == 8 * 64 * 4


@pytest.mark.parametrize("moe, message", [
    ({"num_null_experts": -1}, "model.moe.num_null_experts=-1"),
    ({"num_null_experts": 2, "expert_bias": True}, "expert_bias"),
    ({"num_null_experts": 2, "num_groups": 2, "group_topk": 1}, "num_groups"),
    ({"aux_loss_scope": "global"}, "model.moe.aux_loss_scope='global'"),
    ({"aux_loss_scope": "global_batch", "aux_loss_coeff": 0.0}, "aux_loss_coeff > 0"),
    ({"top_k": 11, "num_null_experts": 2}, "+ num_null_experts=2"),
])
def test_validation_refuses(moe, message):
    cfg = ModelConfig(moe=MoEConfig(**{"num_experts": 8, "top_k": 2,
                                       "expert_ffn_hidden_size": 16, "aux_loss_coeff": 0.01,
                                       **moe}))
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")) as e:
        validate_model(cfg)
    assert "\n" not in str(e.value)


RESUME = [*FAST, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=0",
          "model.moe.num_null_experts=4", "model.moe.top_k=3",
          "model.moe.aux_loss_scope=global_batch"]


def test_lagged_counts_resume_exactly(tmp_path, single_run, moefold_cache):
    """4 straight steps vs 3 steps ("killed", checkpoint at 2) + resume: identical metrics,
    which needs the step-2 global counts from the checkpoint (without them step 3's
    balance loss would be the uniform one)."""
    from tests.inproc import train_here

    ref = read_metrics(single_run(RESUME))
    # uniform f before any counts: coeff * 1 in each of the 4 MoE layers
    assert ref[1]["load_balance_loss"] == pytest.approx(4 * 0.01)
    assert ref[3]["load_balance_loss"] != pytest.approx(4 * 0.01, rel=1e-4)
    assert all(0 < ref[s]["real_experts_per_token"] < 3 for s in ref)
    assert "real_experts_per_token_layer3" in ref[4]
    # FLOPs/MFU count the real experts picked, not top_k (trainer.perf.at_flops_per_token)
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_config(RESUME))
    for s in ref:
        r, seq = ref[s], cfg.trainer.seq_len
        flops = training_flops_per_token(cfg.model, seq, r["real_experts_per_token"])
        assert flops < training_flops_per_token(cfg.model, seq)
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * flops / 1e12,
                                                       rel=1e-6)
    train_here([*RESUME, "trainer.stop_after_steps=3"], tmp_path, moefold_cache)
    train_here(RESUME, tmp_path, moefold_cache)
    got = read_metrics(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "lm_loss", "aux_loss", "load_balance_loss", "grad_norm",
                    "real_experts_per_token"):
            assert got[step][key] == ref[step][key], (step, key)
