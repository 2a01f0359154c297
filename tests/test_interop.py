"""Hugging Face interop (docs/interop.md): export -> transformers logits, refusals,
import (1 process and EP2), sparse upcycling, the moefold layout round trip."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from models.build import build_model  # noqa: E402
from models.config import MoEConfig, ModelConfig  # noqa: E402
from models.hf_map import HFRefused  # noqa: E402
from parallel.hf_load import InitSourceError, fill_from, open_source, open_upcycle  # noqa: E402
from scripts.convert_hf import export  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            ffn_hidden_size=48, max_seq_len=64, rope_theta=5e5, norm_eps=1e-6)
FAMILIES = {
    "llama": ModelConfig(**BASE),
    "llama_tied": ModelConfig(**BASE, tie_embeddings=True),
    "mixtral": ModelConfig(**BASE, moe=MoEConfig(num_experts=4, top_k=2,
                                                 expert_ffn_hidden_size=24)),
    "qwen2_moe": ModelConfig(**{**BASE, "head_dim": 16}, moe=MoEConfig(
        num_experts=4, top_k=2, expert_ffn_hidden_size=24, norm_topk_prob=False,
        num_shared_experts=1, shared_expert_ffn_hidden_size=40, shared_expert_gate=True,
        first_k_dense=1)),
}
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _perturb(model):
    """Norm weights away from 1 (what training does), so a mapping error in them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _save(cfg: ModelConfig, root: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu")
    _perturb(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = {"model": asdict(cfg), "config": {"model": asdict(cfg)}, "world_size": 1}
    path = ckpt.save(root, model=model, optimizer=opt, scheduler=sched,
                     train_state=ckpt.TrainState(step=1), meta=meta)
    return model, path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_logits_match_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = FAMILIES[family]
    model, path = _save(cfg, tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert export(path, out) == family.split("_tied")[0]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(TOKENS), hf(TOKENS).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{family}: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    # import back: logits equal the checkpoint's
    torch.manual_seed(123)
    fresh = build_model(cfg, "cpu")
    fill_from(fresh, open_source(f"hf:{out}", cfg))
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), ours)
