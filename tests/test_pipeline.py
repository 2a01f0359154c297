"""Pipeline stage splitting (single process; the distributed parity is in
test_parity_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig, MoEConfig
from models.transformer import build_model
from parallel.pipeline import PipelineSplit, bubble_fraction, split_layers, stage_module


def test_even_split_gives_the_remainder_to_middle_stages():
    assert split_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert split_layers(10, 4) == [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(5, 3, [1, 3, 1]) == [range(0, 1), range(1, 4), range(4, 5)]
    with pytest.raises(ValueError, match="summing to model.num_layers=5"):
        split_layers(5, 3, [1, 1, 1])
    with pytest.raises(ValueError, match="fewer than parallel.pp=4"):
        split_layers(3, 4)


def test_bubble_fraction():
    assert bubble_fraction("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("gpipe", 1, 8) == 0


def test_stages_compose_to_the_whole_model():
    """Running the stages one after another equals the unsplit model, and every stage
    parameter keeps the unsplit model's name and value."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=5, num_heads=2,
                      num_kv_heads=1, ffn_hidden_size=32, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8))
    torch.manual_seed(0)
    full = build_model(cfg)
    want = dict(full.named_parameters())
    tokens = torch.randint(0, 64, (2, 8))
    h, names = tokens, set()
    for s in range(3):
        stage = stage_module(full, PipelineSplit(5, 3, s, [1, 3, 1]))
        for name, p in stage.named_parameters():
            assert torch.equal(p, want[name]), name
            names.add(name)
        h = stage(h)
    assert names == set(want)
    torch.testing.assert_close(h, full(tokens))
