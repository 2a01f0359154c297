"""Learning-rate schedules, optimizer groups, and checkpoint directory mechanics."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from models import build_model
from models.config import ModelConfig, MoEConfig
from trainer import checkpoint as ckpt
from trainer.config import OptimConfig
from trainer.errors import CheckpointError
from trainer.optim import build_optimizer, build_scheduler, lr_at

BASE = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_style="cosine")


def test_warmup_is_linear_and_reaches_peak():
    assert [lr_at(s, BASE, 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd", "constant"])
def test_decay_endpoints(style):
    cfg = replace(BASE, decay_style=style, wsd_decay_fraction=0.2)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    end = lr_at(100, cfg, 100)
    assert end == pytest.approx(1.0 if style == "constant" else 0.1)
    # monotone non-increasing after warmup
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))


def test_cosine_midpoint_and_wsd_plateau():
    assert lr_at(55, BASE, 100) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    wsd = replace(BASE, decay_style="wsd", wsd_decay_fraction=0.2)
    assert lr_at(79, wsd, 100) == 1.0 and lr_at(90, wsd, 100) == pytest.approx(0.55)


def test_scheduler_follows_lr_at():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, BASE)
    sched = build_scheduler(opt, BASE, 100)
    seen = []
    for _ in range(30):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, BASE, 100) for s in range(30)])


def _tiny() -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      ffn_hidden_size=32, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    return model


def test_no_weight_decay_on_norms_biases_embeddings():
    model = _tiny()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({by_id[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert "tok_embeddings.weight" in no_decay and "norm.weight" in no_decay
    assert "layers.0.attention.wq.weight" in decay and "layers.0.ffn.experts.w1" in decay
    assert decay | no_decay == set(by_id.values())


def _save(root, step, model, keep_last=0):
    opt = build_optimizer(model, BASE)
    sched = build_scheduler(opt, BASE, 10)
    return ckpt.save(root, model=model, optimizer=opt, scheduler=sched,
                     train_state=ckpt.TrainState(step=step, consumed_samples=step * 8),
                     meta={"model": {}}, keep_last=keep_last)


def test_latest_pointer_keep_last_and_no_overwrite(tmp_path):
    model = _tiny()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert (tmp_path / "latest").read_text().strip() == "step_0000006"
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        _save(tmp_path, 6, model)
    # temporary directories are never picked for resume; an incomplete newest step_* is
    # an error naming it (no silent fallback to step 6)
    (tmp_path / ".tmp-step_0000008").mkdir()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_0000006"
    (tmp_path / "step_0000010").mkdir()
    with pytest.raises(CheckpointError, match="step_0000010 is unreadable.*step_0000006"):
        ckpt.resolve_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "step_0000010"), tmp_path)


def test_round_trip_restores_model_optimizer_and_position(tmp_path):
    model = _tiny()
    opt = build_optimizer(model, BASE)
    sched = build_scheduler(opt, BASE, 10)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path = ckpt.save(tmp_path, model=model, optimizer=opt, scheduler=sched,
                     train_state=ckpt.TrainState(step=3, consumed_samples=24),
                     meta={"model": {"hidden_size": 16}})
    fresh = _tiny()
    fresh_opt = build_optimizer(fresh, BASE)
    fresh_sched = build_scheduler(fresh_opt, BASE, 10)
    state = ckpt.load(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched,
                      expected_model={"hidden_size": 16})
    assert (state.step, state.consumed_samples) == (3, 24)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    p0, q0 = next(iter(opt.state.values())), next(iter(fresh_opt.state.values()))
    assert torch.equal(p0["exp_avg"], q0["exp_avg"])
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        ckpt.load(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched,
                  expected_model={"hidden_size": 32})
