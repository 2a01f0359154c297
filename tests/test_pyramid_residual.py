"""Pyramid MoE (``model.moe.num_experts`` per layer) and residual MoE (``model.moe.residual``),
DeepSpeed-MoE (arXiv 2201.05596): config validation, the built model against the analytic
counts, the residual mix against the paper's formula, ragged MoE statistics, the planner
and the meta-device dry run, and parity of N gloo processes with one (EP, PP with different
expert counts per stage, TP+SP+EP with the residual branch). The checkpoint resharding of
a pyramid model is in tests/test_reshard_distributed.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from models.config import ModelConfig, MoEConfig, experts_per_layer
from models.flops import param_counts, training_flops_per_token
from models.moe import MoELayer
from models.transformer import Transformer
from parallel.dims import ParallelDims
from parallel.moe_stats import MoEStats
from tests.helpers import compose_config, read_metrics
from tests.parity import check_metrics, check_model, reference_runs
from tests.parity import layout_runs as parity_layouts
from tests.test_parity_distributed import COMMON, _final_model
from trainer.config import validate
from trainer.errors import ConfigError
from trainer.planner import enumerate_layouts
from trainer.run_logger import render_expert_load

PYRAMID = ["model.moe.num_experts=[0,4,8,8]", "model.moe.first_k_dense=1"]
RESIDUAL = ["model.moe.num_experts=[4,4,8,8]", "model.moe.residual=true", "model.moe.top_k=1",
            "model.moe.num_shared_experts=0"]


def _cfg(**moe) -> ModelConfig:
    base = dict(top_k=1, expert_ffn_hidden_size=32)
    return ModelConfig(num_layers=4, moe=MoEConfig(**{**base, **moe}))


# ------------------------------------------------------------------ config and model
@pytest.mark.parametrize("overrides, world, message", [
    (["model.moe.num_experts=[4,8]"], 1,
     "model.moe.num_experts=[4, 8] must be an int or have model.num_layers=4 entries"),
    (["model.moe.num_experts=[0,4,8,8]"], 1,
     "model.moe.num_experts[0]=0 but layer 0 is a MoE layer"),
    (["model.moe.num_experts=[4,4,8,8]", "model.moe.first_k_dense=1"], 1,
     "model.moe.num_experts[0]=4 but layer 0 is dense"),
    (["model.moe.num_experts=[4,6,8,8]", "parallel.ep=4"], 4,
     "parallel.ep=4 does not divide model.moe.num_experts[1]=6 (valid: 1, 2, 3, 6)"),
    (["model.moe.num_experts=[4,2,8,8]", "model.moe.top_k=3"], 1,
     "model.moe.top_k=3 must be in 1..2 (the fewest experts of a MoE layer"),
    (["model.moe.num_experts=[4,4,6,8]", "model.moe.num_groups=4", "model.moe.group_topk=2"], 1,
     "model.moe.num_groups=4 does not divide model.moe.num_experts[2]=6"),
    (["model.moe.residual=true"], 1, "model.moe.residual=true is its own dense branch"),
    (["model=dense_tiny", "model.moe.residual=true"], 1, "model.moe.residual=true needs"),
    (["model.moe.num_experts=[4,4,x,8]"], 1, "must be an int or a list of ints"),
])
def test_bad_per_layer_configs_give_one_line(overrides, world, message):
    cfg = compose_config([*overrides, "trainer.global_batch_size=16"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_holds_each_layers_experts_and_matches_analytic_counts():
    cfg = _cfg(num_experts=[0, 4, 8, 16], first_k_dense=1, residual=True)
    assert experts_per_layer(cfg) == [0, 4, 8, 16]
    assert experts_per_layer(_cfg(num_experts=8, layer_freq=2)) == [8, 0, 8, 0]
    with torch.device("meta"):
        model = Transformer(cfg)
    layers = model.moe_layers()
    assert [m.experts.w1.shape[0] for m in layers] == [4, 8, 16]
    assert [m.router.weight.shape[0] for m in layers] == [4, 8, 16]
    assert all(m.residual_coef.weight.shape == (2, 64) for m in layers)
    assert all(m.shared_experts.w1.weight.shape == (32, 64) for m in layers)  # expert width
    total, active = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    expert = 3 * 64 * 32
    assert total - active == (4 + 8 + 16 - 3) * expert  # top-1 active
    # a pyramid's FLOPs count each layer's router; uniform 8 has the same active experts
    uni = _cfg(num_experts=[0, 8, 8, 8], first_k_dense=1, residual=True)
    assert training_flops_per_token(cfg, 32) - training_flops_per_token(uni, 32) == 6 * 64 * (
        4 + 8 + 16 - 24)


def test_residual_mix_is_the_papers_formula():
    """out = softmax(x W_c^T)[0] * routed(x) + softmax(x W_c^T)[1] * dense_ffn(x),
    computed here from the layer's own routed path and dense branch called separately."""
    torch.manual_seed(0)
    cfg = _cfg(num_experts=4, residual=True)
    model = Transformer(cfg)
    model.init_weights()
    layer: MoELayer = model.moe_layers()[0]
    x = torch.randn(2, 5, 64)
    got = layer(x)
    dense, coef = layer.shared_experts, layer.residual_coef
    layer.shared_experts = layer.residual_coef = None  # the routed path alone
    routed = layer(x)
    layer.shared_experts, layer.residual_coef = dense, coef
    c = torch.softmax(x @ coef.weight.T, dim=-1)
    want = c[..., :1] * routed + c[..., 1:] * dense(x)
    torch.testing.assert_close(got, want)
    assert (c[..., 0] - 0.5).abs().max() > 1e-4  # the mix is per token, not a constant half
    got.sum().backward()
    assert coef.weight.grad.abs().sum() > 0 and dense.w1.weight.grad.abs().sum() > 0


def test_ragged_stats_expert_bias_and_heatmap():
    """The [layers, max E] table: NaN past a layer's experts; max/mean and the expert bias
    update over the layer's own experts."""
    torch.manual_seed(0)
    cfg = _cfg(num_experts=[2, 4, 0, 8], layer_freq=[1, 1, 0, 1], expert_bias=True, top_k=1)
    model = Transformer(cfg)
    model.init_weights()
    dims = ParallelDims.from_config(SimpleNamespace(tp=1, cp=1, pp=1, ep=1, etp=1), 1)
    stats = MoEStats(model, dims, [True, True, False, True], cfg.moe.num_experts, 1,
                     torch.device("cpu"))
    model(torch.randint(0, 2048, (2, 16)))
    out = stats.pop()
    c = out["counts_LE"]
    assert c.shape == (3, 8)
    assert c[0, 2:].isnan().all() and c[1, 4:].isnan().all() and not c[2].isnan().any()
    assert torch.nansum(c, dim=1).tolist() == [32.0, 32.0, 32.0]  # 32 tokens, top-1
    want = max(float(c[i, :E].max() / c[i, :E].mean()) for i, E in enumerate((2, 4, 8)))
    assert float(out["expert_load_max"]) == pytest.approx(want)
    bias = model.moe_layers()[0].router.expert_bias
    assert bias.shape == (2,) and bias.abs().sum() > 0
    fig = render_expert_load(c, [0, 1, 3], 1)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    share = c[0, :2] / c[0, :2].sum() * 2
    assert f"max {float(share.max()):.2f}x" in labels[0]


def test_planner_and_dry_run_use_per_layer_counts():
    base = OmegaConf.to_object(compose_config(["model.moe.num_experts=[0,6,12,12]",
                                               "model.moe.first_k_dense=1"]))
    eps = {lay.ep for lay in enumerate_layouts(base, 12, 12)}
    assert eps == {1, 2, 3, 6}  # divisors of gcd(6, 12), not of 12
    from trainer.dry_run import dry_run_report

    over = [*PYRAMID, "trainer.dry_run=true", "parallel.world_size=2", "parallel.ep=2",
            "parallel.dp_engine=ddp", "trainer.global_batch_size=16"]
    report = dry_run_report(compose_config(over))
    with torch.device("meta"):
        model = Transformer(OmegaConf.to_object(compose_config(over).model))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    assert experts == (4 + 8 + 8) * 3 * 64 * 64
    assert report.params_numel == total - experts // 2  # dense replicated, experts / ep


# ------------------------------------------------------------------ parity
STEPS = 5
MODES = {
    "pyramid": [*PYRAMID, "model.moe.expert_bias=true"],
    "residual": RESIDUAL,
}
# (plain EP2 alone was folded into these two for CI time; both modes are pyramids)
LAYOUTS = [
    # stage 0 holds layers 0-1 (dense, 4 experts), stage 1 layers 2-3 (8 experts each)
    ("pp2xdp2_ep2_pyramid", 4, "pyramid", ["parallel.pp=2", "parallel.ep=2"]),
    # the dense branch is a sequence-parallel MLP like the shared experts, the mix weight a
    # TP-shared parameter like the router's
    ("tp2_sp_ep2_residual", 2, "residual",
     ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"]),
]


@pytest.fixture(scope="module")
def references(single_run):
    return reference_runs(single_run, COMMON, MODES, STEPS)


@pytest.fixture(scope="module")
def layout_runs(request, tmp_path_factory, moefold_cache):
    return parity_layouts(request, tmp_path_factory.mktemp("pyramid"), moefold_cache, LAYOUTS,
                          COMMON, MODES, test_pyramid_residual_layout_matches_single_process)


@pytest.mark.distributed
@pytest.mark.parametrize("name, nproc, mode, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_pyramid_residual_layout_matches_single_process(name, nproc, mode, extra, references,
                                                        layout_runs):
    run_dir = layout_runs(name)
    ref_metrics, ref_model = references[mode]
    got = read_metrics(run_dir)
    check_metrics(got, ref_metrics, range(1, STEPS + 1), name,
                  keys=("loss", "lm_loss", "aux_loss", "grad_norm", "expert_load_max"))
    model = _final_model(run_dir)
    if mode == "pyramid":
        assert ref_model["layers.1.ffn.experts.w1"].shape[0] == 4
        assert ref_model["layers.3.ffn.experts.w1"].shape[0] == 8
    else:
        assert "layers.0.ffn.residual_coef.weight" in ref_model
    check_model(model, ref_model, name)
