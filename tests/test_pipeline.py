"""Pipeline stage splitting, stage placement, chunks and the schedule estimates (single
process; the distributed parity is in test_parity_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from models.build import build_model
from models.config import ModelConfig, MoEConfig
from parallel.pipeline import (
    PipelineSplit,
    bubble_fraction,
    check_microbatches,
    in_flight,
    split_layers,
    stage_chunks,
    stage_module,
)


def test_even_split_gives_the_remainder_to_middle_stages():
    assert split_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert split_layers(10, 4) == [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(5, 3, [1, 3, 1]) == [range(0, 1), range(1, 4), range(4, 5)]
    with pytest.raises(ValueError, match="summing to model.num_layers=5"):
        split_layers(5, 3, [1, 1, 1])
    with pytest.raises(ValueError, match="fewer than the 4 pipeline stages"):
        split_layers(3, 4)


def test_stage_placement_looped_and_v():
    """Looped: rank r runs stages r, r+pp, ...; V: down then back up, so rank 0 holds the
    first and the last stage (torch's own mapping is the oracle)."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    for pp, vpp, style in [(2, 2, "loop"), (4, 3, "loop"), (2, 2, "v"), (4, 2, "v")]:
        want = generate_stage_to_rank_mapping(pp, pp * vpp, style=style)
        for rank in range(pp):
            split = PipelineSplit(pp * vpp * 2, pp, rank, vpp=vpp, style=style)
            assert split.stages == [s for s in range(pp * vpp) if want[s] == rank]
            assert split.layers == sorted(i for s in split.stages for i in split.ranges[s])
    v0 = PipelineSplit(8, 2, 0, vpp=2, style="v")
    assert v0.stages == [0, 3] and v0.has_first and v0.has_last
    loop1 = PipelineSplit(8, 2, 1, vpp=2, style="loop")
    assert loop1.stages == [1, 3] and not loop1.has_first and loop1.has_last


def test_schedule_constraints():
    check_microbatches("zbv", 2, 2, 4)
    check_microbatches("interleaved_1f1b", 4, 2, 8)
    with pytest.raises(ValueError, match="runs one stage per rank"):
        check_microbatches("1f1b", 2, 2, 4)
    with pytest.raises(ValueError, match="needs parallel.vpp=2"):
        check_microbatches("zbv", 2, 1, 4)
    with pytest.raises(ValueError, match="at least 4 micro-batches"):
        check_microbatches("gpipe", 4, 1, 3)
    with pytest.raises(ValueError, match=r"\(5\) to be a multiple of 2"):
        check_microbatches("interleaved_zb", 2, 2, 5)


def test_bubble_and_memory_estimates():
    # 1F1B/GPipe: (p-1)/(m+p-1); interleaving divides the warm-up by vpp
    assert bubble_fraction("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("gpipe", 1, 8) == 0
    assert bubble_fraction("interleaved_1f1b", 4, 12, vpp=2) == pytest.approx(3 / 27)
    # ZB-H1 keeps a third of 1F1B's idle time; ZB-V none (equal F, B_input, B_weight)
    assert bubble_fraction("interleaved_zb", 4, 12) == pytest.approx(3 / 39)
    assert bubble_fraction("zbv", 4, 12, vpp=2) == 0
    assert in_flight("gpipe", 4, 0, 12) == 12
    assert [in_flight("1f1b", 4, r, 12) for r in range(4)] == [4, 3, 2, 1]
    # interleaved warm-up (vpp-1)*pp + 2*(pp-1-rank) + 1 chunk-micro-batches, / vpp
    assert in_flight("interleaved_1f1b", 4, 0, 8, vpp=2) == pytest.approx((4 + 6 + 1) / 2)
    assert in_flight("interleaved_1f1b", 4, 3, 8, vpp=2) == pytest.approx(5 / 2)


def _tiny(num_layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=num_layers, num_heads=2,
                       num_kv_heads=1, ffn_hidden_size=32, max_seq_len=16,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8))


def test_stages_compose_to_the_whole_model():
    """Running the stages one after another equals the unsplit model, and every stage
    parameter keeps the unsplit model's name and value."""
    torch.manual_seed(0)
    full = build_model(_tiny(5))
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


@pytest.mark.parametrize("style", ["loop", "v"])
def test_chunks_share_the_stage_module_and_compose(style):
    """With two stages per rank the chunks hold (not copy) the stage module's submodules
    under the global names, and running all chunks in stage order equals the model."""
    torch.manual_seed(0)
    full = build_model(_tiny(8))
    tokens = torch.randint(0, 64, (2, 8))
    chunk_of = {}
    for rank in range(2):
        split = PipelineSplit(8, 2, rank, vpp=2, style=style)
        module = stage_module(full, split)
        chunks = stage_chunks(module, split)
        shared = dict(module.named_parameters())
        seen = {}
        for s, chunk in zip(split.stages, chunks):
            assert [int(k) for k in chunk.layers] == list(split.ranges[s])
            assert (chunk.tok_embeddings is not None) == (s == 0)
            assert (chunk.output is not None) == (s == 3)
            for name, p in chunk.named_parameters():
                assert p is shared[name], name
                seen[name] = p
            chunk_of[s] = chunk
        assert seen.keys() == shared.keys()  # the chunks cover the stage module exactly
    h = tokens
    for s in range(4):
        h = chunk_of[s](h)
    torch.testing.assert_close(h, full(tokens))
