"""Tensor / sequence parallelism (parallel/tensor_parallel.py) on real gloo processes against
the single-process model with identical weights: the masked LM loss and every parameter's
full gradient must match, for dense, tied-embedding and MoE (shared experts) models, under
TP and TP+SP, on 2 and 4 ranks.

Every rank builds the full model from the same seed (the reference), parallelises a deep
copy, and runs the same batch through both. One spawn per world size runs every case
(spawning dominates the runtime); each rank returns its mismatches, the parent asserts.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from models.build import build_model
from models.config import ModelConfig, MoEConfig
from parallel.dims import ParallelDims
from parallel.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
    tp_cross_entropy_sum,
)
from tests.distributed_utils import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
B, T = 2, 8


def _cfg(kind: str, heads: int = 4, kv_heads: int = 2, vocab: int = 64) -> ModelConfig:
    moe = MoEConfig(num_experts=0)
    if kind == "moe":
        moe = MoEConfig(
            num_experts=4,
            top_k=2,
            expert_ffn_hidden_size=16,
            layer_freq=[0, 1],  # one dense layer, one MoE layer
            num_shared_experts=1,
            shared_expert_gate=True,
            aux_loss_coeff=0.01,
            seq_aux_loss_coeff=0.01,
            z_loss_coeff=0.001,
        )
    return ModelConfig(
        name=f"tp_{kind}",
        vocab_size=vocab,
        hidden_size=32,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=48,
        max_seq_len=32,
        tie_embeddings=kind == "tied",
        moe=moe,
    )


def _batch(vocab: int, seed: int, packed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "tokens": torch.randint(0, vocab, (B, T), generator=g),
        "labels": torch.randint(0, vocab, (B, T), generator=g),
        "loss_mask": (torch.rand(B, T, generator=g) > 0.25).float(),
        "position_ids": None,
    }
    if packed:  # two documents per row: positions restart (RoPE must see the true ones)
        batch["position_ids"] = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)])
        batch["position_ids"] = batch["position_ids"].expand(B, T).contiguous()
    return batch


def _loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["tokens"], batch["position_ids"])
    total = tp_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"])
    return total / batch["loss_mask"].sum(), logits


def _check_case(name: str, cfg: ModelConfig, tp_mesh, sp: bool, packed: bool) -> list[str]:
    """Run one case on this rank; return human-readable mismatches (empty = pass)."""
    errors: list[str] = []
    tp = tp_mesh.size()
    torch.manual_seed(1234)
    ref = build_model(cfg)
    model = apply_tensor_parallel(copy.deepcopy(ref), tp_mesh, sequence_parallel=sp)
    batch = _batch(cfg.vocab_size, seed=7, packed=packed)

    ref_loss, ref_logits = _loss(ref, batch)
    ref_loss.backward()
    loss, logits = _loss(model, batch)
    loss.backward()

    # The layout claims: vocab-sharded logits, sharded attention weights, plain router.
    if not (isinstance(logits, DTensor) and logits.placements == (Shard(2),)):
        errors.append(f"{name}: logits are not a vocab-sharded DTensor: {type(logits)}")
    elif logits.to_local().shape[-1] != cfg.vocab_size // tp:
        errors.append(f"{name}: local logits {tuple(logits.to_local().shape)} not vocab/tp")
    else:
        torch.testing.assert_close(logits.full_tensor(), ref_logits, **GRAD_TOL)
    wq = model.layers["0"].attention.wq.weight
    if not (isinstance(wq, DTensor) and wq.placements == (Shard(0),)):
        errors.append(f"{name}: wq is not column-sharded")
    if cfg.moe.num_experts:
        moe = model.layers["1"].ffn
        if isinstance(moe.router.weight, DTensor) or isinstance(moe.experts.w1, DTensor):
            errors.append(f"{name}: router/experts should stay plain (replicated) tensors")
        if not isinstance(moe.shared_experts.w2.weight, DTensor):
            errors.append(f"{name}: shared experts are not tensor parallel")

    if not torch.allclose(loss, ref_loss, rtol=LOSS_RTOL, atol=0):
        errors.append(f"{name}: loss {loss.item():.8f} != reference {ref_loss.item():.8f}")

    ref_params = dict(ref.named_parameters())
    got_params = dict(model.named_parameters())
    if ref_params.keys() != got_params.keys():
        errors.append(f"{name}: parameter names differ: {ref_params.keys() ^ got_params.keys()}")
    for pname, p in got_params.items():
        ref_grad = ref_params[pname].grad
        if p.grad is None or ref_grad is None:
            errors.append(f"{name}: {pname} grad missing (tp={p.grad is None})")
            continue
        grad = p.grad
        if isinstance(p, DTensor):
            # Sharded weights: gradient sharded alike; replicated ones (SP norms) must be
            # Replicate, so a rank's local gradient is the whole true gradient.
            if grad.placements != p.placements:
                errors.append(f"{name}: {pname} grad {grad.placements} != param {p.placements}")
            grad = grad.full_tensor()
        elif ".experts." in pname:
            # Routed experts saw only this TP rank's tokens (the MoE token split): their
            # true gradient is the sum over the TP ranks (edp, reduced by the DP engine).
            grad = grad.clone()
            dist.all_reduce(grad, group=tp_mesh.get_group())
        try:
            torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)
        except AssertionError as e:
            errors.append(f"{name}: {pname} grad mismatch: {str(e).splitlines()[-3:]}")
    return errors


def _tp_mesh(world: int):
    dims = ParallelDims.from_config(SimpleNamespace(tp=world, cp=1, pp=1, ep=1, etp=1), world)
    dims.build_meshes("cpu")
    return dims.mesh("tp")


def _run_world2(rank: int, world: int) -> dict:
    mesh = _tp_mesh(world)
    errors: list[str] = []
    for kind in ("dense", "tied", "moe"):
        for sp in (False, True):
            name = f"tp{world}{'+sp' if sp else ''} {kind}"
            errors += _check_case(name, _cfg(kind), mesh, sp, packed=kind == "dense")
    # GQA: kv heads are split, never replicated -> a clear error naming the values.
    gqa_error = None
    try:
        apply_tensor_parallel(
            build_model(_cfg("dense", heads=4, kv_heads=1)), mesh, sequence_parallel=False
        )
    except ValueError as e:
        gqa_error = str(e)
    # SP cuts the sequence into tp equal chunks: an odd length is refused up front.
    seq_error = None
    model = apply_tensor_parallel(build_model(_cfg("dense")), mesh, sequence_parallel=True)
    try:
        model(torch.zeros(B, T - 1, dtype=torch.long))
    except ValueError as e:
        seq_error = str(e)
    return {"errors": errors, "gqa_error": gqa_error, "seq_error": seq_error}


def _run_world4(rank: int, world: int) -> dict:
    mesh = _tp_mesh(world)
    errors: list[str] = []
    for kind in ("dense", "moe"):
        for sp in (False, True):
            name = f"tp{world}{'+sp' if sp else ''} {kind}"
            errors += _check_case(name, _cfg(kind, heads=4, kv_heads=4), mesh, sp, packed=sp)
    return {"errors": errors}


def test_tp2_and_sp_match_single_device():
    results = spawn(_run_world2, 2)
    for rank, res in enumerate(results):
        assert not res["errors"], f"rank {rank}:\n" + "\n".join(res["errors"])
        msg = res["gqa_error"]
        assert msg is not None, "kv_heads=1 with tp=2 must raise"
        assert "tp=2" in msg and "model.num_kv_heads=1" in msg and "model.num_heads=4" in msg
        assert res["seq_error"] is not None and f"seq_len={T - 1} with tp=2" in res["seq_error"]


def test_tp4_and_sp_match_single_device():
    results = spawn(_run_world4, 4)
    for rank, res in enumerate(results):
        assert not res["errors"], f"rank {rank}:\n" + "\n".join(res["errors"])


def test_check_tensor_parallel_names_valid_sizes():
    cfg = _cfg("dense", heads=8, kv_heads=2)
    kw = dict(seq_len=32, sequence_parallel=False, world_size=8)
    check_tensor_parallel(cfg, 2, **kw)  # fine
    with pytest.raises(ValueError, match=r"tp=4 .*num_kv_heads=2 \(valid tp: 1, 2\).*num_heads=8"):
        check_tensor_parallel(cfg, 4, **kw)
    with pytest.raises(ValueError, match=r"seq_len=33 must be a multiple of parallel.tp=2"):
        check_tensor_parallel(cfg, 2, **{**kw, "seq_len": 33, "sequence_parallel": True})


def test_cross_entropy_sum_plain_fallback_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = (torch.rand(2, 5) > 0.3).float()
    want = sum(
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]] * mask[b, t]
        for b in range(2)
        for t in range(5)
    )
    torch.testing.assert_close(tp_cross_entropy_sum(logits, labels, mask), want)
