"""Router semantics against external oracles: megatron-core 0.16 routing utilities and
DeepSpeed's topkgating / top2gating (both run on CPU).

Deliberate differences from the oracles (see models/router.py) and how they are tested:
- DeepSpeed renormalises a token's weights over its surviving assignments after capacity
  drops; we (like Megatron) zero the dropped weight only -> weights are compared on tokens
  that lost nothing.
- DeepSpeed's top2gating l_aux counts only each token's first choice (E * sum me*ce1);
  ours counts all k choices (= topkgating's l_aux) -> asserted explicitly below.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from deepspeed.moe.sharded_moe import _capacity, top2gating, topkgating
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
    z_loss_func,
)

from models.config import ModelConfig, MoEConfig
from models.router import Router, expert_capacity

D = 16


def make_router(seed: int = 0, **moe) -> Router:
    moe.setdefault("num_experts", 8)
    moe.setdefault("expert_ffn_hidden_size", 8)
    router = Router(ModelConfig(hidden_size=D, moe=MoEConfig(**moe)))
    torch.manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
    return router


def inputs(T: int = 48, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(T, D)


def dense(idx_TK: torch.Tensor, val_TK: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros(idx_TK.shape[0], E, dtype=val_TK.dtype).scatter(1, idx_TK, val_TK)


ROUTING_CASES = {
    # name: (our MoEConfig overrides, megatron kwargs)
    "softmax_norm": (dict(top_k=2), dict(use_pre_softmax=False)),
    "softmax_pre": (dict(top_k=2, norm_topk_prob=False), dict(use_pre_softmax=True)),
    "softmax_scaled": (dict(top_k=3, topk_scaling_factor=1.5), dict(scaling_factor=1.5)),
    "sigmoid": (
        dict(top_k=4, num_experts=16, score_func="sigmoid", topk_scaling_factor=2.5),
        dict(score_function="sigmoid", scaling_factor=2.5),
    ),
    "group_softmax_pre": (
        dict(top_k=4, num_experts=16, norm_topk_prob=False, num_groups=4, group_topk=2),
        dict(use_pre_softmax=True, num_groups=4, group_topk=2),
    ),
    "group_softmax_norm": (
        dict(top_k=4, num_experts=16, num_groups=4, group_topk=2),
        dict(num_groups=4, group_topk=2),
    ),
    "group_sigmoid_bias": (
        dict(
            top_k=4,
            num_experts=16,
            score_func="sigmoid",
            num_groups=8,
            group_topk=4,
            expert_bias=True,
            topk_scaling_factor=2.5,
        ),
        dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5),
    ),
    "sigmoid_bias": (
        dict(top_k=2, score_func="sigmoid", expert_bias=True),
        dict(score_function="sigmoid"),
    ),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_matches_megatron(case):
    ours, theirs = ROUTING_CASES[case]
    router = make_router(**ours)
    E, k = router.num_experts, router.top_k
    if router.expert_bias is not None:  # large enough to change the selection
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = inputs()
    out = router(x)
    w_ours = dense(out.routing.expert_idx_TK, out.routing.weights_TK, E)

    weight = router.weight.detach().clone().requires_grad_(True)
    logits = x @ weight.t()
    probs, routing_map = topk_routing_with_score_function(
        logits, k, expert_bias=router.expert_bias, **theirs
    )
    assert torch.equal(w_ours != 0, routing_map), "selected experts differ"
    torch.testing.assert_close(w_ours, probs, rtol=1e-5, atol=1e-6)
    if router.expert_bias is not None:
        plain = router.weight.detach()
        unbiased = topk_routing_with_score_function(x @ plain.t(), k, **theirs)[1]
        assert not torch.equal(unbiased, routing_map), "bias should change the selection"

    # Gradients through the weights reach the router identically.
    g = torch.randn(x.shape[0], E)
    (w_ours * g).sum().backward()
    (probs * g).sum().backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_seq_z_losses_match_megatron(score_func):
    B, S = 3, 16
    router = make_router(
        top_k=2,
        score_func=score_func,
        aux_loss_coeff=1.0,
        seq_aux_loss_coeff=1.0,
        z_loss_coeff=1.0,
        expert_bias=score_func == "sigmoid",
    )
    if router.expert_bias is not None:  # the losses ignore the selection bias
        router.expert_bias.copy_(torch.linspace(-0.5, 0.5, router.num_experts))
    E, k = router.num_experts, router.top_k
    x = inputs(B * S)
    out = router(x, num_seqs=B)

    weight = router.weight.detach().clone().requires_grad_(True)
    logits = x @ weight.t()
    rmap, scores = compute_routing_scores_for_aux_loss(logits, k, score_func)
    aux = switch_load_balancing_loss_func(scores, rmap.sum(0), B * S, k, E, 1.0)
    # Megatron's seq aux loss runs on [S, B] token order and folds B into the experts.
    lg_SB = logits.view(B, S, E).transpose(0, 1).reshape(S * B, E)
    rmap_s, scores_s = compute_routing_scores_for_aux_loss(lg_SB, k, score_func)
    rmap_s, scores_s = rmap_s.reshape(S, B * E), scores_s.reshape(S, B * E)
    seq_aux = switch_load_balancing_loss_func(scores_s, rmap_s.sum(0), S, k, E, 1.0) / B
    z = z_loss_func(logits, 1.0)

    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.seq_aux_loss, seq_aux)
    torch.testing.assert_close(out.z_loss, z)
    assert not torch.allclose(out.aux_loss, out.seq_aux_loss)  # the two really differ
    (out.aux_loss + 2 * out.seq_aux_loss + 3 * out.z_loss).backward()
    (aux + 2 * seq_aux + 3 * z).backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-7)


def test_capacity_formula_matches_deepspeed():
    for T in (1, 7, 64, 100, 1000, 4096):
        for E in (4, 8, 60, 64):
            for k in (1, 2, 6):
                for cf in (0.1, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.3):
                    for min_cap in (0, 4):
                        gates = torch.empty(T, E)
                        ds = int(_capacity(gates, torch.tensor(cf * k), torch.tensor(min_cap)))
                        assert expert_capacity(T, E, k, cf, min_cap) == ds, (T, E, k, cf, min_cap)


@pytest.mark.parametrize(
    "policy,cf,min_cap",
    [("probs", 1.0, 0), ("position", 1.0, 0), ("probs", 0.5, 0), ("position", 0.1, 5)],
)
def test_capacity_drops_match_deepspeed_topkgating(policy, cf, min_cap):
    T, E, k = 64, 8, 2
    router = make_router(
        top_k=k, capacity_factor=cf, drop_policy=policy, min_capacity=min_cap, aux_loss_coeff=1.0
    )
    with torch.no_grad():  # skew the load so that capacity really bites
        router.weight[0] += 0.8 * router.weight[1]
    x = inputs(T)
    out = router(x)
    r = out.routing
    logits = (x @ router.weight.t()).detach()
    l_aux, combine, dispatch_mask, exp_counts = topkgating(
        logits.clone(), k, cf, min_cap, drop_tokens=True, drop_policy=policy
    )
    assert r.capacity == combine.shape[-1]
    kept_ours = dense(r.expert_idx_TK, r.kept_TK, E)
    kept_ds = dispatch_mask.any(-1)
    assert kept_ours.sum() < T * k, "the test must actually drop something"
    assert torch.equal(kept_ours, kept_ds)
    assert torch.equal(out.counts_E, exp_counts)
    assert int(out.num_dropped) == T * k - int(kept_ds.sum())
    torch.testing.assert_close(out.aux_loss, l_aux)
    whole = kept_ours.sum(1) == k  # tokens that lost nothing: same weights
    w_ours = dense(r.expert_idx_TK, r.weights_TK, E)
    torch.testing.assert_close(w_ours[whole], combine.sum(-1)[whole])
    assert torch.all(w_ours[~kept_ours] == 0)


def test_top2gating_selection_weights_and_laux_variant():
    T, E, cf, min_cap = 40, 8, 4.0, 0
    router = make_router(top_k=2, capacity_factor=cf, aux_loss_coeff=1.0)
    x = inputs(T)
    out = router(x)
    r = out.routing
    logits = (x @ router.weight.t()).detach()
    l_aux, combine, dispatch_mask, _ = top2gating(
        logits.clone(), cf, min_cap, drop_tokens=True, top2_2nd_expert_sampling=False
    )
    assert combine.shape[-1] == r.capacity == expert_capacity(T, E, 2, cf, min_cap)
    assert torch.equal(dense(r.expert_idx_TK, r.kept_TK, E), dispatch_mask.any(-1))
    torch.testing.assert_close(dense(r.expert_idx_TK, r.weights_TK, E), combine.sum(-1))
    # top2gating's l_aux uses first choices only; ours (= topkgating's) uses both.
    probs = logits.softmax(-1)
    first = torch.bincount(probs.argmax(-1), minlength=E).float()
    torch.testing.assert_close(l_aux, E * (probs.mean(0) * first / T).sum())
    both = torch.bincount(r.expert_idx_TK.flatten(), minlength=E).float()
    torch.testing.assert_close(out.aux_loss, E / 2 * (probs.mean(0) * both / T).sum())
    assert not torch.allclose(out.aux_loss, l_aux)
