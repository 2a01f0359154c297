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
from models.config import ModelConfig, MoEConfig  # noqa: E402
from models.hf_map import HFRefused  # noqa: E402
from parallel.hf_load import InitSourceError, dcp_model_state, fill_from, open_source, open_upcycle  # noqa: E402
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


REFUSED = {
    "sigmoid": (dict(score_func="sigmoid", num_groups=2, group_topk=1, expert_bias=True),
                "score_func=sigmoid"),
    "ungated_shared": (dict(num_shared_experts=1, shared_expert_ffn_hidden_size=24),
                       "shared_expert_gate"),
    "no_renorm": (dict(norm_topk_prob=False), "norm_topk_prob=false"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_family_one_line(case, tmp_path, capsys):
    from scripts.convert_hf import main

    kw, words = REFUSED[case]
    cfg = ModelConfig(**BASE, moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=24,
                                            **kw))
    _, path = _save(cfg, tmp_path / "ckpt")
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "hf").exists()  # nothing written


def test_import_config_mismatch_one_line(tmp_path):
    cfg = FAMILIES["mixtral"]
    _, path = _save(cfg, tmp_path / "ckpt")
    export(path, tmp_path / "hf")
    other = replace(cfg, norm_eps=1e-5)
    with pytest.raises(HFRefused, match="rms_norm_eps") as e:
        open_source(f"hf:{tmp_path / 'hf'}", other)
    assert "\n" not in str(e.value)


def test_moefold_layout_round_trip(tmp_path):
    """MoT checkpoints export to our flat layout; it reads back bit-equal."""
    from safetensors.torch import load_file

    cfg = ModelConfig(**{**BASE, "vocab_size": 32}, arch="mot",
                      moe=MoEConfig(num_experts=0))
    model, path = _save(cfg, tmp_path / "ckpt")
    assert export(path, tmp_path / "out") == "moefold"
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["moefold_format"] and meta["model"]["arch"] == "mot"
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_upcycle_output_equals_dense(tmp_path):
    """Every expert = the dense FFN, top-k weights summing to 1: same logits."""
    dense_cfg = ModelConfig(**{**BASE, "ffn_hidden_size": 24})
    dense, path = _save(dense_cfg, tmp_path / "dense")
    moe_cfg = replace(dense_cfg, moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=24,
                                                upcycle_from=str(path)))
    torch.manual_seed(5)
    moe = build_model(moe_cfg, "cpu")
    fill_from(moe, open_upcycle(str(path), moe_cfg, seed=5))
    with torch.no_grad():
        diff = (moe(TOKENS) - dense(TOKENS)).abs().max().item()
    print(f"upcycled vs dense: max |logits diff| = {diff:.2e}")
    assert diff < 1e-5
    bad = replace(moe_cfg, moe=replace(moe_cfg.moe, norm_topk_prob=False))
    with pytest.raises(InitSourceError, match="cannot upcycle exactly"):
        open_upcycle(str(path), bad, seed=5)


# -- through the trainer: import then train; an EP2 import; upcycling's first step -------
TRAIN = ["trainer.seq_len=16", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
         "trainer.eval_every=0", "logger.console=plain", "logger.tensorboard=false",
         "logger.expert_load_every=0", "optim.warmup_steps=1", "trainer.max_steps=1",
         "model.vocab_size=2048", "model.hidden_size=32", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
         "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"]
MIXTRAL = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=32",
           "model.moe.num_shared_experts=0", "model.ffn_hidden_size=32"]


def _loss(run_dir: Path) -> float:
    from tests.helpers import read_metrics
    return read_metrics(run_dir)[1]["lm_loss"]


def test_trainer_import_ep2_and_upcycle(tmp_path, moefold_cache):
    from tests.inproc import run_jobs, train_here

    # a trained Mixtral-family run -> HF export -> init_from in 1 and 2 (EP2) processes
    train_here([*TRAIN, *MIXTRAL], tmp_path / "src", moefold_cache)
    export(tmp_path / "src" / "checkpoints", tmp_path / "hf")
    init = [*TRAIN, *MIXTRAL, f"model.init_from=hf:{tmp_path / 'hf'}", "trainer.seed=7"]
    errors = run_jobs([("one", 1, init, tmp_path / "one"),
                       ("ep2", 2, [*init, "parallel.ep=2"], tmp_path / "ep2")], moefold_cache)
    assert not any(errors.values()), errors
    one, ep2 = _loss(tmp_path / "one"), _loss(tmp_path / "ep2")
    print(f"init_from: 1 process {one:.6f}, EP2 {ep2:.6f}")
    assert abs(one - ep2) < 1e-5 * abs(one)
    # the imported weights are the exported ones (a seed-7 init would differ)
    cfg, st, _ = dcp_model_state(
        tmp_path / "src" / "checkpoints")
    torch.manual_seed(0)
    m = build_model(cfg, "cpu")
    fill_from(m, open_source(f"hf:{tmp_path / 'hf'}", cfg))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in st.items())

    # upcycling: a dense "checkpoint" of its initial weights (lr 1e-12) -> MoE from it: the
    # first-step loss (same seed, same batch) equals the dense one
    dense = [*TRAIN, "model.moe.num_experts=0", "model.ffn_hidden_size=32", "optim.lr=1e-12", "optim.min_lr=0"]
    train_here(dense, tmp_path / "dense", moefold_cache)
    up = [*TRAIN, *MIXTRAL, f"model.moe.upcycle_from={tmp_path / 'dense' / 'checkpoints'}",
          "model.moe.upcycle_noise=0"]
    train_here(up, tmp_path / "up", moefold_cache)
    d, u = _loss(tmp_path / "dense"), _loss(tmp_path / "up")
    print(f"upcycled first step {u:.7f} vs dense {d:.7f}")
    assert abs(u - d) < 1e-5 * abs(d)
