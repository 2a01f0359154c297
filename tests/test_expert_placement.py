"""Expert placement (parallel/expert_placement.py): the optimiser and the traffic model on
synthetic traces, and in training: a non-contiguous placement trains exactly like one
process, its checkpoint is layout-free (a single-process conversion equals the reference,
a contiguous run resumes from it), and ``auto`` builds a placement from the routing trace
the run recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel.expert_placement import (
    Placement,
    PlacementError,
    check_placement_spec,
    cross_node_rows,
    optimise_placement,
)
from tests.helpers import read_metrics
from tests.parity import check_metrics, check_model


def _paired_trace(T: int = 4000, E: int = 16, layers: int = 2, seed: int = 0):
    """Each token picks one of E/2 expert pairs (p, p + E/2): the contiguous placement
    puts the two experts of every pair on different nodes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        pair = torch.randint(0, E // 2, (T,), generator=g)
        out[f"layers.{layer}.ffn"] = torch.stack([pair, pair + E // 2], 1)
    return out


def test_optimiser_keeps_co_selected_experts_on_one_node():
    E, ep, nodes = 16, 8, 4  # 2 ranks per node, 2 experts per rank
    trace = _paired_trace(E=E)
    contiguous = Placement()
    placed = optimise_placement(trace, E, ep, nodes)
    for name, slots in placed.layers.items():
        assert sorted(slots) == list(range(E))
        node_of = {e: p // (E // nodes) for p, e in enumerate(slots)}
        assert all(node_of[p] == node_of[p + E // 2] for p in range(E // 2)), name
    before = cross_node_rows(trace, contiguous, E, ep, nodes)
    after = cross_node_rows(trace, placed, E, ep, nodes)
    assert after["rank_rows"] < 0.6 * before["rank_rows"]
    assert after["node_rows"] < 0.6 * before["node_rows"]


def test_optimiser_balances_ranks_inside_a_node():
    E, ep = 8, 4  # one node: only the load balance of the ranks matters
    g = torch.Generator().manual_seed(1)
    hot = torch.tensor([0, 1])  # experts 0 and 1 get most tokens
    idx = torch.where(torch.rand(3000, 1, generator=g) < 0.8, hot[torch.randint(0, 2, (3000, 1),
                                                                                generator=g)],
                      torch.randint(2, E, (3000, 1), generator=g))
    placed = optimise_placement({"layers.0.ffn": idx}, E, ep, 1)
    slots = placed.layers["layers.0.ffn"]
    rank_of = {e: p // 2 for p, e in enumerate(slots)}
    assert rank_of[0] != rank_of[1]  # contiguous would put both hot experts on rank 0


def test_follow_model_rewards_inter_layer_affinity():
    """ExFlow's setting: a token stays where its previous top-1 expert ran; pulling the
    next layer's experts to that node cuts the crossings the co-selection alone leaves."""
    E, ep, nodes, T = 16, 4, 4, 4000
    g = torch.Generator().manual_seed(2)
    first = torch.randint(0, E, (T, 1), generator=g)
    second = (first * 5 + 3) % E  # deterministic inter-layer affinity
    trace = {"layers.0.ffn": first, "layers.1.ffn": second}
    plain = optimise_placement(trace, E, ep, nodes)
    aff = optimise_placement(trace, E, ep, nodes, affinity_weight=1.0)
    r_plain = cross_node_rows(trace, plain, E, ep, nodes, follow=True)["rank_rows"]
    r_aff = cross_node_rows(trace, aff, E, ep, nodes, follow=True)["rank_rows"]
    # layer 0: a token starts on a random node (3 of 4 remote); layer 1: its expert
    # follows its layer-0 expert, so a perfect placement sends it nowhere
    assert r_aff == pytest.approx((0.75 + 0.0) / 2, abs=0.02)
    assert r_aff < r_plain - 0.05


def test_placement_files_are_checked(tmp_path):
    good = tmp_path / "p.json"
    Placement({"layers.0.ffn": [1, 0, 3, 2]}).save(good)
    check_placement_spec(str(good))
    assert Placement.load(good).slots("layers.0.ffn", 4) == [1, 0, 3, 2]
    assert Placement.load(good).slots("layers.1.ffn", 4) == [0, 1, 2, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"layers.0.ffn": [0, 0, 1, 2]}}))
    with pytest.raises(PlacementError, match="not a permutation"):
        check_placement_spec(str(bad))
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(PlacementError, match="not a placement file"):
        check_placement_spec(str(tmp_path / "junk.json"))
    with pytest.raises(PlacementError, match="neither contiguous"):
        check_placement_spec(str(tmp_path / "missing.json"))
    with pytest.raises(PlacementError, match="names layer"):
        Placement.load(good).check({"layers.1.ffn": 4}, str(good))


# -- in training -------------------------------------------------------------------------
# moe_tiny: 4 MoE layers of 8 experts; EP2 holds 4 per rank
SCRAMBLED = {f"layers.{i}.ffn": perm for i, perm in enumerate(
    [[6, 1, 3, 4, 0, 2, 5, 7], [7, 6, 5, 4, 3, 2, 1, 0], [0, 2, 4, 6, 1, 3, 5, 7],
     [5, 0, 7, 2, 4, 1, 6, 3]])}


@pytest.fixture(scope="module")
def placement_runs(tmp_path_factory, moefold_cache):
    from tests.inproc import train_batch
    from tests.test_parity_distributed import COMMON, MODES

    root = tmp_path_factory.mktemp("placement")
    path = Path(__file__).parent / "assets" / "placement_moe_tiny.json"
    assert Placement.load(path).layers == SCRAMBLED
    base = [*COMMON, *MODES["dropless"], "parallel.ep=2", "checkpoint.keep_last=0"]
    shared = root / "auto"  # steps 1-3 contiguous with a trace, 4-5 placed from it
    jobs = [
        ("placed", [*base, f"parallel.expert_placement={path}", "checkpoint.every=3"],
         root / "placed"),
        ("resume_contiguous", [*base, "checkpoint.resume=" + str(
            root / "placed" / "checkpoints" / "step_0000003")], root / "resume_contiguous"),
        ("trace", [*base, "logger.routing_trace_every=1", "checkpoint.every=3",
                   "trainer.stop_after_steps=3"], shared),
        ("auto", [*base, "parallel.expert_placement=auto"], shared),
    ]
    errors = train_batch(2, jobs, moefold_cache)
    return root, errors


def _check_losses(got, ref, steps):
    check_metrics(got, ref, steps, "placement")


@pytest.mark.distributed
@pytest.mark.slow
def test_placed_experts_train_like_one_process(placement_runs, single_run):
    from tests.test_parity_distributed import COMMON, MODES, STEPS, _final_model

    root, errors = placement_runs
    assert errors["placed"] is None, errors["placed"]
    ref_dir = single_run([*COMMON, *MODES["dropless"]])
    ref = read_metrics(ref_dir)
    got = read_metrics(root / "placed")
    _check_losses(got, ref, range(1, STEPS + 1))
    # the checkpoint holds experts in logical order: one process reads it as the reference
    check_model(_final_model(root / "placed"), _final_model(ref_dir), "placed")


@pytest.mark.distributed
@pytest.mark.slow
def test_contiguous_run_resumes_from_placed_checkpoint(placement_runs, single_run):
    from tests.test_parity_distributed import COMMON, MODES, STEPS

    root, errors = placement_runs
    assert errors["resume_contiguous"] is None, errors["resume_contiguous"]
    ref = read_metrics(single_run([*COMMON, *MODES["dropless"]]))
    got = read_metrics(root / "resume_contiguous")
    assert sorted(got) == [4, 5]
    _check_losses(got, ref, range(4, STEPS + 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_auto_placement_from_recorded_trace(placement_runs, single_run):
    from tests.test_parity_distributed import COMMON, MODES, STEPS

    root, errors = placement_runs
    assert errors["trace"] is None and errors["auto"] is None, (errors["trace"], errors["auto"])
    traces = sorted(p.name for p in (root / "auto" / "routing").glob("rank*.pt"))
    assert traces == ["rank0.pt", "rank1.pt"]
    saved = torch.load(root / "auto" / "routing" / "rank0.pt", weights_only=True)
    t = saved["routing"]
    assert saved["num_experts"] == {f"layers.{i}.ffn": 8 for i in range(4)}
    # 3 steps x 4 micro-batches (global batch 8 over dp 2) x 32 tokens, k=2, 4 layers
    assert sorted(t) == [f"layers.{i}.ffn" for i in range(4)]
    assert all(v.shape == (3 * 4 * 32, 2) for v in t.values())
    chosen = Placement.load(root / "auto" / "routing" / "placement.json")
    assert any(s != sorted(s) for s in chosen.layers.values())  # not the contiguous one
    ref = read_metrics(single_run([*COMMON, *MODES["dropless"]]))
    _check_losses(read_metrics(root / "auto"), ref, range(1, STEPS + 1))


def test_null_picks_are_ignored():
    """Null experts (id -1, model.moe.num_null_experts) cost no traffic and no load."""
    trace = _paired_trace(E=8, T=500)
    with_null = {n: torch.cat([t, torch.full((t.shape[0], 1), -1)], 1) for n, t in trace.items()}
    a = optimise_placement(trace, 8, 4, 2)
    b = optimise_placement(with_null, 8, 4, 2)
    assert a.layers == b.layers
    assert cross_node_rows(trace, a, 8, 4, 2) == cross_node_rows(with_null, b, 8, 4, 2)
