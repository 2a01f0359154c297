"""The dry run (trainer/dry_run.py): rank r of an N-rank job built on meta under the fake
process group, its memory report, the "does not fit" error, and every experiment preset
at the world size its ``# world_size: N`` line names. Meta only: nothing is allocated."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, compose_config, run_cli
from trainer.dry_run import dry_run_report

pytestmark = pytest.mark.timeout(240)

MIXTRAL_128 = ["model=mixtral_8x7b", "parallel.world_size=128", "parallel.pp=4",
               "parallel.tp=8", "parallel.ep=8", "parallel.sequence_parallel=true",
               "trainer.seq_len=4096", "trainer.micro_batch_size=1",
               "trainer.global_batch_size=64", "trainer.precision=bf16"]


def _mixtral_expected(rank: int) -> int:
    """Parameter elements rank ``rank`` stores for MIXTRAL_128 (pp4 x dp4 x tp8, ep8 over
    dp*tp so edp = 4; rank order tp-cp-ep-dp-pp): TP-split matmuls / (tp*dp), norms and
    router (replicated over TP) / dp, routed experts / (ep*edp); 8 layers a stage, the
    embedding on stage 0, the final norm and head on stage 3."""
    V, h, F, E, kv = 32000, 4096, 14336, 8, 8 * 128
    tp, dp, ep, edp = 8, 4, 8, 4
    attn = (2 * h * h + 2 * h * kv) // (tp * dp)
    layer = attn + 2 * h // dp + E * h // dp + 3 * E * h * F // (ep * edp)
    stage = rank // 32
    n = 8 * layer
    if stage == 0:
        n += V * h // (tp * dp)
    if stage == 3:
        n += h // dp + V * h // (tp * dp)
    return n


def test_mixtral_8x7b_128_ranks_cli(tmp_path, moefold_cache):
    """The CLI path: exit 0 in under a minute, memory.json complete, small RSS."""
    r = run_cli(["trainer.dry_run=true", *MIXTRAL_128, f"run_dir={tmp_path}"],
                cache_dir=moefold_cache, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads((tmp_path / "memory.json").read_text())
    for key in ("params_numel", "params_bytes", "grads_bytes", "optimizer_bytes",
                "activations_bytes", "buffers_bytes", "total_bytes"):
        assert mem[key] > 0, key
    assert mem["params_numel"] == _mixtral_expected(0)
    assert mem["params_bytes"] == 2 * mem["params_numel"]  # bf16
    assert mem["optimizer_bytes"] == 12 * mem["params_numel"]  # fp32 master + 2 moments
    parts = sum(mem[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                 "activations_bytes", "buffers_bytes"))
    assert mem["total_bytes"] == parts
    assert mem["wall_s"] < 60
    assert mem["max_rss_mib"] < 2048, "the dry run allocated real memory"
    assert 4 < mem["total_bytes"] / 2**30 < 80  # an H100-class budget, not absurd


@pytest.mark.parametrize("rank", [37, 127])
def test_mixtral_other_stages(rank):
    """Middle and last pipeline stages hold what the layout says (in-process)."""
    cfg = compose_config(["trainer.dry_run=true", *MIXTRAL_128,
                          f"parallel.dry_run_rank={rank}"])
    report = dry_run_report(cfg)
    assert report.params_numel == _mixtral_expected(rank)
    assert report.rank == rank


def test_does_not_fit(tmp_path, moefold_cache):
    r = run_cli(["trainer.dry_run=true", *MIXTRAL_128, "parallel.gpu_memory_gib=1",
                 f"run_dir={tmp_path}"], cache_dir=moefold_cache, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: needs \d+(\.\d+)? GiB on rank 0, has 1", last), last


def _world_size(path: Path) -> int:
    """``# world_size: N`` among the file's leading comment lines (default 1)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*world_size:\s*(\d+)", line)
        if m:
            return int(m.group(1))
    return 1


EXPERIMENTS = sorted((REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_dry_runs(path):
    n = _world_size(path)
    cfg = compose_config([f"experiment={path.stem}", "trainer.dry_run=true",
                          f"parallel.world_size={n}"])
    report = dry_run_report(cfg)
    assert report.world_size == n and report.params_numel > 0
    assert report.total_bytes > report.params_bytes > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_fsdp_buffers_follow_prefetch_and_grad_sync():
    """FSDP's transient buffers in the estimate: one more gathered block per block of
    prefetch, and with grad_sync=last over 2 micro-batches every block's unsharded fp32
    gradients (held until the last backward) instead of one block's."""
    base = ["trainer.dry_run=true", "model=moe_tiny", "parallel.world_size=4",
            "parallel.dp_engine=fsdp", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=8", "trainer.precision=fp32"]

    def buffers(*extra):
        return dry_run_report(compose_config([*base, *extra])).buffers

    one, two = buffers("parallel.fsdp_prefetch=1"), buffers("parallel.fsdp_prefetch=2")
    every = buffers("parallel.fsdp_grad_sync=every")
    last = buffers("parallel.fsdp_grad_sync=last")
    assert two["fsdp_unsharded_params"] == one["fsdp_unsharded_params"] * 3 // 2  # equal blocks
    assert buffers("parallel.fsdp_prefetch=0") == one  # FSDP2's implicit one-ahead
    n_blocks = 4  # moe_tiny
    assert last["fsdp_unsharded_grads"] == n_blocks * every["fsdp_unsharded_grads"]


def _two_batch_reports(extra: list[str], flag: str, world: int = 2):
    """Dry-run reports of an EP 2 layout (one micro-batch of 1 per step and rank, fp32)
    without and with ``flag``."""
    base = ["trainer.dry_run=true", f"parallel.world_size={world}", "parallel.ep=2",
            "trainer.micro_batch_size=1", "trainer.precision=fp32", *extra]
    return (dry_run_report(compose_config(base)),
            dry_run_report(compose_config([*base, flag])))


def test_two_batch_overlap_counts_two_micro_batches():
    """parallel.two_batch_overlap holds a pair's activations (and dispatch buffers) at once:
    the estimate counts two micro-batches in flight."""
    one, two = _two_batch_reports(["model=moe_tiny", "parallel.dp_engine=ddp",
                                   "trainer.global_batch_size=8"],
                                  "parallel.two_batch_overlap=true")
    assert (one.microbatches_in_flight, two.microbatches_in_flight) == (1.0, 2.0)
    assert two.activations_bytes == 2 * one.activations_bytes
    assert two.buffers["ep_dispatch"] == 2 * one.buffers["ep_dispatch"]


def test_two_batch_overlap_under_pp_counts_pairs_in_flight():
    """Under PP the pipeline's micro-batches are pairs: 1F1B's rank 0 holds pp of them,
    i.e. 2 * pp micro-batches' activations, and the p2p buffers carry a pair."""
    one, two = _two_batch_reports(["model=moe_tiny", "parallel.pp=2",
                                   "trainer.global_batch_size=16"],
                                  "parallel.two_batch_overlap=true", world=4)
    assert (one.microbatches_in_flight, two.microbatches_in_flight) == (2.0, 4.0)
    assert two.buffers["pp_p2p"] == 2 * one.buffers["pp_p2p"]


@pytest.mark.parametrize("model, blocks", [
    (["model=moe_tiny", "parallel.dp_engine=ddp"], ["layer 1"]),  # an MoE block
    # hybrid MoM+MoE: a Mamba block (wrapped whole), then attention with the MoE FFN
    (["model=mom_moe_tiny", "data=digits_chameleon"], ["layer 0", "layer 1"]),
], ids=["moe_tiny", "mom_moe_tiny"])
def test_two_batch_overlap_activation_checkpointing_estimate(model, blocks):
    """Two-batch overlap + activation checkpointing: each block keeps more than its input
    (router, exchanged rows, combine inputs) but far less than without recompute."""
    full, ac = _two_batch_reports([*model, "trainer.global_batch_size=8",
                                   "parallel.two_batch_overlap=true"],
                                  "parallel.activation_checkpointing=true")
    for block in blocks:
        assert ac.activations_by_layer[block] < 0.6 * full.activations_by_layer[block]
    assert ac.recompute_bytes > 0 and ac.microbatches_in_flight == 2.0
