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


def test_paired_call_and_stepped_units_compiled():
    """``model(a, paired=...)`` is the two stepped forwards in one call; the blocks'
    whole-call submodules (``stepped_units``: what FSDP shards and compile compiles under
    the two-batch overlap) hold every block parameter but the norms and MoE gate/mix
    weights, and compiling them leaves the pair's outputs unchanged."""
    from torch._dynamo.testing import CompileCounter

    from parallel.parallelize import compile_blocks

    cfg = tiny()  # a dense block, then MoE blocks with a shared expert
    model = seeded(cfg)
    a, b = (torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(2))
    want = (model(a), model(b))
    got = model(a, paired={"tokens_BT": b})
    assert isinstance(got, tuple) and all(torch.equal(g, w) for g, w in zip(got, want))
    for block in model.layers.values():
        units = block.stepped_units()
        inside = {id(p) for u in units for p in u.parameters()}
        rest = [n for n, p in block.named_parameters() if id(p) not in inside]
        assert all("norm" in n or ".experts." in n or n.startswith("ffn.experts")
                   or "shared_gate" in n or "residual_coef" in n for n in rest), rest
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_blocks(model, torch.device("cpu"), counter, stepped=True)
    got = model(a, paired={"tokens_BT": b})
    assert counter.frame_count > 0  # the units really went through dynamo
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


class _SquareObjective:
    """The runners' duck-typed objective: sums [1] per micro-batch, value = sums / n."""

    def sums(self, out, mb):
        return out.float().square().sum().view(1)

    def value(self, sums, normaliser):
        return sums.sum() / normaliser.sum()


class _NoStats:
    def count_dispatch(self):
        self.calls = getattr(self, "calls", 0) + 1


def test_two_batch_loop_equals_micro_batch_loop_odd_count():
    """Pairs and an odd last micro-batch: the same sums and gradients as the plain loop,
    the DP seam told which backward is the step's last."""
    import contextlib

    from parallel.runner import MicroBatchLoop, TwoBatchLoop

    cfg = tiny()
    gen = torch.Generator().manual_seed(3)
    mbs = [{"tokens": torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)}
           for _ in range(3)]
    norm = torch.tensor([3.0 * 2 * 16 * cfg.vocab_size])
    out = {}
    for loop_cls in (MicroBatchLoop, TwoBatchLoop):
        model, seen, stats = seeded(cfg), [], _NoStats()
        loop = loop_cls(model, _SquareObjective(), "llm", contextlib.nullcontext, stats,
                        before_micro_batch=lambda i, last, s=seen: s.append((i, last)))
        sums = loop.run(mbs, norm, train=True)
        out[loop_cls] = (sums, {n: p.grad for n, p in model.named_parameters()}, seen,
                         stats.calls)
    plain, two = out[MicroBatchLoop], out[TwoBatchLoop]
    torch.testing.assert_close(two[0], plain[0], rtol=1e-6, atol=0)
    for name, g in plain[1].items():
        torch.testing.assert_close(two[1][name], g, rtol=1e-5, atol=1e-8, msg=name)
    assert plain[2] == [(0, False), (1, False), (2, True)] and plain[3] == 3
    assert two[2] == [(1, False), (2, True)] and two[3] == 2  # one call per backward


def _saved_bytes_and_grads(model, tokens):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(model.forward_steps(tokens))
    out.float().square().mean().backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters()}


def test_stepped_activation_checkpointing_recomputes_attention_and_experts():
    """Under the two-batch overlap activation checkpointing recomputes each block's
    attention and experts inside forward_steps: far fewer bytes saved for backward, the
    same gradients."""
    from parallel.activation_checkpoint import apply_activation_checkpointing

    cfg = tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    plain_bytes, plain_grads = _saved_bytes_and_grads(seeded(cfg), tokens)
    model = seeded(cfg)
    apply_activation_checkpointing(model, stepped=True)
    assert all(b.recompute_in_steps for b in model.layers.values())
    ac_bytes, ac_grads = _saved_bytes_and_grads(model, tokens)
    assert ac_bytes < 0.6 * plain_bytes, (ac_bytes, plain_bytes)
    for name, g in plain_grads.items():
        torch.testing.assert_close(ac_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_name", ["mot_moe_tiny", "mom_moe_tiny"])
def test_stepped_recompute_mot_and_mom(model_name):
    """MoT/MoM under the two-batch overlap: the paired call equals two plain calls, and
    activation checkpointing recomputes inside MoT blocks' steps (attention branch, dense
    modalities' SwiGLU, experts) and wraps Mamba blocks: fewer bytes saved, same
    gradients."""
    from omegaconf import OmegaConf

    from models import build_model
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from tests.helpers import compose_config

    cfg = OmegaConf.to_object(compose_config([f"model={model_name}"]).model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
    ids = torch.randint(0, len(cfg.mot.modalities), (2, 32), generator=gen)
    ids2 = torch.randint(0, len(cfg.mot.modalities), (2, 32), generator=gen)

    def grads(model):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            a, b = model(tokens, modality_ids_BT=ids,
                         paired={"tokens_BT": tokens.flip(0), "modality_ids_BT": ids2})
        (a.float().square().mean() + b.float().square().mean()).backward()
        return sum(saved), (a, b), {n: p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    plain = build_model(cfg, "cpu")
    want = (plain(tokens, modality_ids_BT=ids), plain(tokens.flip(0), modality_ids_BT=ids2))
    plain_bytes, outs, plain_grads = grads(plain)
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    apply_activation_checkpointing(model, stepped=True)
    ac_bytes, _, ac_grads = grads(model)
    assert ac_bytes < 0.8 * plain_bytes, (ac_bytes, plain_bytes)
    # a wrapped (Mamba) block's parameter names gain the wrapper's prefix
    ac_grads = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in ac_grads.items()}
    assert ac_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(ac_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
