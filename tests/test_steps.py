"""Steppable forwards (models/steps.py), on one process: the generator protocol, hook
replay, and that a stepped forward computes exactly the plain one (the multi-rank
interleaving, with exchanges in flight, is in tests/test_overlap_distributed.py and the
training parity layouts ``*_two_batch``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.steps import call_steps, interleave, run, start
from tests.test_model import seeded, tiny


def _counter(name: str, pauses: int, log: list):
    for i in range(pauses):
        log.append((name, i))
        yield
    log.append((name, "end"))
    return name.upper()


def test_interleave_round_robin_and_results():
    log = []
    out = interleave([_counter("a", 2, log), _counter("b", 1, log), _counter("c", 0, log)])
    assert out == ["A", "B", "C"]
    # one stretch of each in turn; a finished generator leaves the rotation
    assert log == [("a", 0), ("b", 0), ("c", "end"), ("a", 1), ("b", "end"), ("a", "end")]
    assert run(_counter("d", 3, [])) == "D"
    assert start(_counter("e", 0, [])) == (False, "E")
    paused = _counter("f", 1, [])
    assert start(paused) == (True, None) and run(paused) == "F"


class _Stepped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return run(self.forward_steps(x))

    def forward_steps(self, x):
        h = self.lin(x)
        yield
        return h * 2


def test_call_steps_replays_plain_hooks_and_refuses_others():
    m = _Stepped()
    m.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    m.register_forward_hook(lambda mod, args, out: out - 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(run(call_steps(m, x)), m(x), rtol=0, atol=0)
    plain = nn.Linear(4, 4)  # no forward_steps: one plain call, no pause
    assert start(call_steps(plain, x))[0] is False
    m.register_forward_pre_hook(lambda mod, args, kwargs: None, with_kwargs=True)
    with pytest.raises(RuntimeError, match="keyword-argument forward pre-hooks"):
        run(call_steps(m, x))


@pytest.mark.parametrize("moe", [
    dict(num_shared_experts=1, shared_expert_gate=True, aux_loss_coeff=0.01),
    dict(residual=True, z_loss_coeff=0.001),
], ids=["shared_gate_aux", "residual_zloss"])
def test_stepped_forward_equals_forward(moe):
    cfg = tiny(moe=dict(num_experts=4, top_k=2, expert_ffn_hidden_size=16, **moe))
    model = seeded(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    want = model(tokens)
    want_stats = [layer.pop_stats() for layer in model.moe_layers()]
    got = run(model.forward_steps(tokens))
    assert torch.equal(got, want)
    for layer, ref in zip(model.moe_layers(), want_stats):
        got_stats = layer.pop_stats()
        for key, value in ref.items():
            assert torch.equal(got_stats[key], value), key
    # two micro-batches interleaved = each alone (one process: nothing pauses mid-layer)
    other = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = interleave([model.forward_steps(tokens), model.forward_steps(other)])
    assert torch.equal(a, want) and torch.equal(b, model(other))
