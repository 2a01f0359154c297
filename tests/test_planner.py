"""The folding planner (trainer/planner.py, parallel/cost_model.py, scripts/plan.py):
deterministic plans whose candidates pass the trainer's validation and whose memory is the
dry run's; plan.layout; the "fits nowhere" exit; EP bytes measured on gloo vs the cost
model; parallel.auto on 4 CPU processes against one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from parallel.cost_model import ep_bytes_per_layer, ep_units_per_token
from parallel.memory import GIB
from tests.distributed_utils import spawn
from tests.helpers import FAST, REPO, compose_config, read_metrics
from tests.inproc import run_jobs
from trainer.config import validate
from trainer.dry_run import dry_run_report
from trainer.errors import ConfigError
from trainer.planner import apply_layout, parse_layout, plan

pytestmark = pytest.mark.timeout(240)

CPU4 = ["cluster.gpu=cpu", "cluster.gpus_per_node=4", *FAST, "trainer.global_batch_size=8"]


def _overrides(c: dict) -> list[str]:
    return [f"parallel.tp={c['tp']}", f"parallel.cp={c['cp']}", f"parallel.pp={c['pp']}",
            f"parallel.vpp={c['vpp']}", f"parallel.pp_schedule={c['pp_schedule']}",
            f"parallel.ep={c['ep']}", f"parallel.etp={c['etp']}",
            f"parallel.dispatcher={c['dispatcher']}",
            f"parallel.activation_checkpointing={c['recompute']}",
            f"parallel.sequence_parallel={c['tp'] > 1}",
            f"parallel.two_batch_overlap={c['two_batch']}",
            f"trainer.micro_batch_size={c['micro_batch_size']}"]


def test_small_plan_deterministic_valid_and_dry_run_memory():
    cfg = compose_config(CPU4 + ["plan.top=4"])
    a, b = plan(cfg, 4, top=4), plan(cfg, 4, top=4)
    strip = lambda r: [{k: v for k, v in c.items()} for c in r["candidates"]]  # noqa: E731
    assert strip(a) == strip(b) and len(a["candidates"]) == 4
    times = [c["step_time_s"] for c in a["candidates"]]
    assert times == sorted(times)
    for c in a["candidates"]:
        assert c["fits"] and c["tp"] * c["cp"] * c["dp"] * c["pp"] == 4
        ov = CPU4 + _overrides(c) + ["parallel.world_size=4"]
        validate(compose_config(ov), 4)  # the trainer's own validation
    # the top two really build: the dry run of rank 0 gives the planner's memory (rank 0
    # is one of the ranks the planner checks; it reports the worst of them)
    for c in a["candidates"][:2]:
        rep = dry_run_report(compose_config(CPU4 + _overrides(c) + ["parallel.world_size=4"]))
        assert rep.total_bytes / GIB <= c["memory_gib"] + 1e-9
        if c["pp"] == 1:
            assert rep.total_bytes / GIB == pytest.approx(c["memory_gib"], abs=1e-3)
    assert sum(a["ruled_out"].values()) + len(a["candidates"]) == a["enumerated"]


def test_plan_layout_evaluation():
    cfg = compose_config(CPU4)
    r = plan(cfg, 4, layout="tp=2 pp=2 ep=2 mbs=1 recompute=true")
    e = r["evaluated"]
    assert (e["tp"], e["pp"], e["ep"], e["dp"], e["edp"], e["recompute"]) == \
        (2, 2, 2, 1, 1, True)
    assert e["fits"] and e["memory_gib"] > 0 and e["step_time_s"] == pytest.approx(
        sum(e["breakdown"].values()))
    assert e["breakdown"]["tp"] > 0 and e["breakdown"]["ep"] > 0
    with pytest.raises(ConfigError, match="parallel.tp=3"):
        plan(cfg, 4, layout="tp=3")
    base = parse_layout("ep=4 etp=1", cfg_obj := __import__("omegaconf").OmegaConf.to_object(
        cfg), 4)
    assert apply_layout(cfg_obj, base).parallel.ep == 4


def test_ep_overlap_in_the_cost_model_and_the_two_batch_candidates():
    """The EP exchange hides behind the shared experts (parallel.overlap: at most half of
    it) and, with the two-batch overlap, behind the other micro-batch's MoE blocks; the
    hidden part leaves the step time, nothing else moves; the planner offers the two-batch
    overlap only where it runs (under PP too), and its memory counts the pair."""
    import dataclasses

    from omegaconf import OmegaConf

    from parallel.cost_model import Layout, step_time
    from trainer.planner import enumerate_layouts, hardware

    cfg = OmegaConf.to_object(compose_config(CPU4))
    hw = hardware(cfg.cluster)
    seq, gbs = cfg.trainer.seq_len, cfg.trainer.global_batch_size

    def est(**kw):
        return step_time(cfg.model, Layout(world=4, ep=4, **kw), hw, seq, gbs)

    off, shared, pair = est(overlap=False), est(), est(two_batch=True)
    raw = off.breakdown["ep"]
    assert raw > 0 and off.hidden["ep"] == 0
    assert 0 < shared.hidden["ep"] <= raw / 2 + 1e-15
    assert shared.hidden["ep"] < pair.hidden["ep"] <= raw + 1e-15
    for e in (shared, pair):
        assert e.breakdown["ep"] == pytest.approx(raw - e.hidden["ep"])
        assert e.breakdown["compute"] == off.breakdown["compute"]
    # one micro-batch per rank and step: nothing to pair with
    lone = step_time(cfg.model, Layout(world=4, ep=4, micro_batch_size=2, two_batch=True),
                     hw, seq, gbs)
    assert lone.hidden["ep"] == est(micro_batch_size=2).hidden["ep"]
    lays = list(enumerate_layouts(cfg, 4, 4))
    paired = [x for x in lays if x.two_batch]
    assert paired and all(x.ep > 1 and x.dispatcher == "alltoall" for x in paired)
    assert any(x.pp > 1 for x in paired)  # under PP the pipeline's micro-batches are pairs
    # ... whose bubble is that of half as many micro-batches
    pp_lay = next(x for x in paired if x.pp > 1)
    pp_plain = dataclasses.replace(pp_lay, two_batch=False)
    assert step_time(cfg.model, pp_lay, hw, seq, gbs).breakdown["compute"] == step_time(
        cfg.model, pp_plain, hw, seq, gbs).breakdown["compute"]
    paired = [x for x in paired if x.pp == 1]
    plain = dataclasses.replace(paired[0], two_batch=False)
    assert plain in lays
    text = "ep={} mbs={} two_batch={}".format(plain.ep, plain.micro_batch_size, "{}")
    one = plan(compose_config(CPU4), 4, layout=text.format("false"))["evaluated"]
    two = plan(compose_config(CPU4), 4, layout=text.format("true"))["evaluated"]
    assert two["two_batch"] and two["memory"]["activations_bytes"] > \
        one["memory"]["activations_bytes"]
    # the exchange hides; the last pair's second reduce-scatter costs
    assert two["breakdown"]["ep"] < one["breakdown"]["ep"]
    assert two["breakdown"]["dp"] > one["breakdown"]["dp"]


def test_fits_nowhere_cli_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "scripts.plan", "cluster.gpus=2", "cluster.gpu=cpu",
         "cluster.gpus_per_node=2", "cluster.memory_gib=0.0001", *FAST,
         f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "fits no layout on 2 x cpu" in err[0], r.stderr[-1500:]
    assert json.loads((tmp_path / "plan.json").read_text())["candidates"] == []


# ---------------------------------------------------------------- bytes: measured vs model
E, K, D, T = 8, 2, 16, 512


def _bytes_worker(rank: int, world: int):
    from models.router import Routing
    from parallel.dispatch import AllToAllDispatcher

    out = {"idx": None}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g)
    idx = torch.randn(T, E, generator=g).topk(K, -1).indices  # ~uniform routing
    out["idx"] = idx
    for dedup in (True, False):
        disp = AllToAllDispatcher(dist.group.WORLD, E, dedup=dedup)
        x_nd, _, ctx = disp.dispatch(x, Routing(idx, torch.full((T, K), 1.0 / K), E))
        disp.combine(x_nd, ctx)
        out[dedup] = disp.bytes_sent
    return out


def _units(idx: torch.Tensor, world: int, dedup: bool) -> torch.Tensor:
    """[world] rows this rank's tokens send to each EP rank (a token once per destination
    with dedup, once per slot without)."""
    dest = idx // (E // world)
    if dedup:
        return torch.stack([(dest == p).any(1).sum() for p in range(world)])
    return torch.bincount(dest.flatten(), minlength=world)


@pytest.mark.distributed
def test_ep_bytes_measured_equal_cost_model():
    """AllToAllDispatcher.bytes_sent (dispatch + combine, fp32 rows) on 4 gloo ranks vs the
    cost model: per rank, dispatch sends its off-rank units and combine returns the units
    it received, so bytes = (sent + received units) * row; summed over the EP group that is
    exactly the model's ``ep_bytes_per_layer`` (2 * units * row) with the measured units;
    the uniform-routing expectation of units is within 5% of what random routing gives."""
    world = 4
    res = spawn(_bytes_worker, world)
    for dedup in (True, False):
        units = torch.stack([_units(res[r]["idx"], world, dedup) for r in range(world)])
        off = units.clone().fill_diagonal_(0)  # [source, destination], self not sent
        measured = [res[r][dedup] for r in range(world)]
        for r in range(world):
            assert measured[r] == int(off[r].sum() + off[:, r].sum()) * D * 4
        total_units = int(off.sum())
        assert sum(measured) == ep_bytes_per_layer(T * world, D, total_units / (T * world),
                                                   elem_bytes=4)
        expect = ep_units_per_token(E, K, world, "alltoall", dedup)
        assert total_units / (T * world) == pytest.approx(expect, rel=0.05)
        print(f"dedup={dedup}: measured {sum(measured)} B over {world} ranks, model "
              f"(measured routing) {ep_bytes_per_layer(T * world, D, total_units / (T * world), 4):.0f}"
              f" B, model (uniform) {ep_bytes_per_layer(T * world, D, expect, 4):.0f} B")


# ---------------------------------------------------------------- parallel.auto parity
AUTO = [*FAST, "trainer.micro_batch_size=1", "trainer.global_batch_size=8",
        "trainer.max_steps=3", "optim.eps=1e-6", "model.moe.expert_bias=true",
        "checkpoint.save_final=false"]


@pytest.mark.distributed
def test_parallel_auto_four_processes_match_one(tmp_path, moefold_cache):
    jobs = [("one", 1, AUTO, tmp_path / "one"),
            ("auto4", 4, AUTO + ["parallel.auto=true", "cluster.gpu=cpu",
                                 "cluster.gpus_per_node=4"], tmp_path / "auto4")]
    errors = run_jobs(jobs, moefold_cache)
    assert not any(errors.values()), errors
    ref, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "auto4")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)


def test_cp_traffic_uses_the_attention_kind_kv_width():
    """CP all-gathers the K and V the attention core gets: GQA's kv heads, or MLA's
    up-projected per-head K and V (DeepSeek-V3: 128 heads x (128 + 64 + 128))."""
    from omegaconf import OmegaConf

    from parallel.cost_model import cp_kv_width

    def width(model: str) -> int:
        return cp_kv_width(OmegaConf.to_object(compose_config([f"model={model}"]).model))

    assert width("moe_tiny") == 2 * 2 * 16  # 2 kv heads of 64 / 4 = 16
    assert width("deepseek_v3") == 128 * (128 + 64 + 128)
