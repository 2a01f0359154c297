"""ParallelDims rank math against megatron-core's RankGenerator (pure integers, no processes)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from parallel.dims import KINDS, ParallelDims

ps = pytest.importorskip("megatron.core.parallel_state")

MEGATRON_ORDER = "tp-cp-ep-dp-pp"  # Megatron-Core's default, written out: the oracle

# Our group kind -> (Megatron generator side, RankGenerator token).
MEGATRON_TOKEN = {
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "pp": ("dense", "pp"),
    "dp_cp": ("dense", "dp-cp"),
    "tp_cp": ("dense", "tp-cp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "edp": ("expert", "dp"),
    "ep_etp": ("expert", "tp-ep"),
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _all_layouts(world: int):
    """Every (pp, tp, cp, ep, etp) that fits ``world``."""
    for pp in _divisors(world):
        stage = world // pp
        for cp, etp in itertools.product(_divisors(stage), _divisors(stage)):
            for tp in _divisors(stage // cp):
                for ep in _divisors(stage // etp):
                    yield dict(pp=pp, tp=tp, cp=cp, ep=ep, etp=etp)


# Large worlds: hand-picked folded layouts (EP > DP, CP with EP, ETP != TP, PP > 1) and
# public recipes (Mixtral-8x22B: TP2 PP8 EP8 on 128 GPUs).
BIG = [
    (32, dict(pp=2, tp=2, cp=2, ep=8, etp=1)),
    (32, dict(pp=1, tp=4, cp=1, ep=8, etp=2)),
    (64, dict(pp=4, tp=2, cp=2, ep=16, etp=1)),
    (64, dict(pp=2, tp=4, cp=2, ep=4, etp=2)),
    (128, dict(pp=8, tp=2, cp=1, ep=8, etp=1)),
    (128, dict(pp=4, tp=2, cp=4, ep=32, etp=1)),
    (128, dict(pp=2, tp=8, cp=1, ep=4, etp=4)),
    (192, dict(pp=3, tp=2, cp=2, ep=16, etp=1)),
    (256, dict(pp=4, tp=4, cp=2, ep=64, etp=1)),
    (256, dict(pp=2, tp=2, cp=8, ep=8, etp=2)),
    (256, dict(pp=8, tp=8, cp=1, ep=8, etp=4)),
    (256, dict(pp=1, tp=1, cp=1, ep=256, etp=1)),
    (512, dict(pp=8, tp=4, cp=2, ep=16, etp=2)),
]
SMALL_WORLDS = [1, 2, 3, 4, 6, 8, 12, 16]


def _layouts():
    for w in SMALL_WORLDS:
        for lay in _all_layouts(w):
            yield w, lay
    yield from BIG


def _make(world: int, **sizes) -> ParallelDims:
    return ParallelDims.from_config(SimpleNamespace(**sizes), world)


def _megatron(d: ParallelDims):
    dense = ps.RankGenerator(
        tp=d.tp, ep=1, dp=d.dp, pp=d.pp, cp=d.cp, order=MEGATRON_ORDER, rank_offset=0
    )
    expert = ps.RankGenerator(
        tp=d.etp, ep=d.ep, dp=d.edp, pp=d.pp, cp=1, order=MEGATRON_ORDER, rank_offset=0
    )
    return {"dense": dense, "expert": expert}


def test_sweep_covers_folded_layouts():
    layouts = list(_layouts())
    assert len(layouts) > 1000 and max(w for w, _ in layouts) >= 256
    dims = [_make(w, **lay) for w, lay in layouts]
    assert any(d.ep > d.dp for d in dims)
    assert any(d.cp > 1 and d.ep > 1 for d in dims)
    assert any(d.etp != d.tp and d.pp > 1 for d in dims)


@pytest.mark.parametrize("world", SMALL_WORLDS + ["big"])
def test_groups_equal_megatron_rank_generator(world):
    cases = BIG if world == "big" else [(world, lay) for lay in _all_layouts(world)]
    for w, lay in cases:
        d = _make(w, **lay)
        gens = _megatron(d)
        for kind in KINDS:
            side, token = MEGATRON_TOKEN[kind]
            want = gens[side].get_ranks(token)
            got = d.groups(kind)
            # Same groups (as sets of sets) and, stronger, the same order of groups and of
            # ranks inside each group, so a group-local rank means what it means in Megatron.
            assert {frozenset(g) for g in got} == {frozenset(g) for g in want}, (w, lay, kind)
            assert got == want, (w, lay, kind)
        assert gens["dense"].get_ranks("pp") == gens["expert"].get_ranks("pp")


@pytest.mark.parametrize("world", [8, 12, 16])
def test_coords_and_groups_agree(world):
    """Independent of Megatron: a group = ranks equal in every coordinate but the group's."""
    for lay in _all_layouts(world):
        d = _make(world, **lay)
        coords = [d.coords(r) for r in range(world)]
        for kind, (side, gdims) in KINDS.items():
            dims = ("pp", "dp", "cp", "tp") if side == "dense" else ("pp", "edp", "ep", "etp")
            for r in range(world):
                key = [coords[r][x] for x in dims if x not in gdims]
                same = [
                    q for q in range(world) if [coords[q][x] for x in dims if x not in gdims] == key
                ]
                assert d.group_of(kind, r) == same, (lay, kind, r)
            assert len(d.groups(kind)[0]) == d.size(kind)


def test_design_example_w16():
    """DESIGN.md §3: attention TP2·CP2·PP2 (DP2), experts ETP1·EP4 (EDP2) on 16 ranks."""
    d = _make(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    assert (d.dp, d.edp) == (2, 2)
    assert d.groups("tp_cp") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert d.groups("ep") == d.groups("tp_cp")
    assert d.groups("pp") == [[i, i + 8] for i in range(8)]
    assert d.groups("dp_cp")[0] == [0, 2, 4, 6]
    assert d.groups("edp")[0] == [0, 4]
    assert d.coords(13) == dict(pp=1, dp=1, cp=0, tp=1, edp=1, ep=1, etp=0)
    text = d.describe()
    assert "folding: every attention tp×cp group is exactly an expert ep×etp group" in text
    assert "(pp, edp, ep, etp) = (2, 2, 4, 1)" in text
    assert "[0,1,2,3] [4,5,6,7]" in text


def test_describe_without_folding_and_truncation():
    d = _make(64, tp=2, cp=1, pp=1, ep=8, etp=1)
    text = d.describe()
    assert "folding:" not in text  # ep groups span tp groups of different dp ranks
    assert "(48 more ranks)" in text
    assert len(text.splitlines()) < 40


def test_data_rank_shared_by_cp_tp_pp():
    d = _make(16, tp=2, cp=2, pp=2, ep=4, etp=1)
    for r in range(16):
        d.rank = r
        for kind in ("cp", "tp", "pp", "tp_cp"):
            assert {d.coords(q)["dp"] for q in d.group_of(kind)} == {d.dp_rank}
        assert sorted(d.coords(q)["dp"] for q in d.group_of("dp")) == list(range(d.dp_size))
    d.rank = 0
    assert d.is_main and d.is_first_stage and not d.is_last_stage
    d.rank = 9
    assert not d.is_main and d.is_last_stage and d.pp_rank == 1


@pytest.mark.parametrize(
    "world, sizes, message",
    [
        (
            8,
            dict(tp=1, cp=1, pp=1, ep=3, etp=1),
            "parallel.ep=3 does not fit world size 8 with parallel.pp=1, parallel.etp=1 "
            "(valid ep: 1, 2, 4, 8)",
        ),
        (
            8,
            dict(tp=1, cp=1, pp=3, ep=1, etp=1),
            "parallel.pp=3 does not fit world size 8 (valid pp: 1, 2, 4, 8)",
        ),
        (
            16,
            dict(tp=2, cp=3, pp=2, ep=1, etp=1),
            "parallel.cp=3 does not fit world size 16 with parallel.pp=2 (valid cp: 1, 2, 4, 8)",
        ),
        (
            8,
            dict(tp=4, cp=4, pp=1, ep=1, etp=1),
            "parallel.tp=4 does not fit world size 8 with parallel.pp=1, parallel.cp=4 "
            "(valid tp: 1, 2)",
        ),
        (
            8,
            dict(tp=2, cp=1, pp=2, ep=2, etp=8),
            "parallel.etp=8 does not fit world size 8 with parallel.pp=2 (valid etp: 1, 2, 4)",
        ),
        (
            16,
            dict(tp=1, cp=1, pp=2, ep=4, etp=4),
            "parallel.ep=4 does not fit world size 16 with parallel.pp=2, parallel.etp=4 "
            "(valid ep: 1, 2)",
        ),
        (
            12,
            dict(tp=2, cp=1, pp=1, ep=8, etp=1),
            "parallel.ep=8 does not fit world size 12 with parallel.pp=1, parallel.etp=1 "
            "(valid ep: 1, 2, 3, 4, 6, 12)",
        ),
        (8, dict(tp=0, cp=1, pp=1, ep=1, etp=1), "parallel.tp=0 must be a positive integer"),
        (8, dict(tp=1, cp=1, pp=1, ep="2", etp=1), "parallel.ep='2' must be a positive integer"),
        (0, dict(tp=1, cp=1, pp=1, ep=1, etp=1), "world size 0 must be a positive integer"),
    ],
)
def test_config_errors(world, sizes, message):
    # parallel/ raises plain ValueErrors; config validation turns them into ConfigErrors
    # (tests/test_config.py checks that path)
    with pytest.raises(ValueError) as err:
        _make(world, **sizes)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_unknown_kind_and_meshes_before_build():
    d = _make(4, tp=2, cp=1, pp=1, ep=2, etp=1)
    with pytest.raises(KeyError, match="valid: tp, cp"):
        d.groups("fsdp")
    with pytest.raises(RuntimeError, match="build_meshes"):
        d.group("ep")
    assert d.size("dp_cp") == 2 and d.size("ep_etp") == 2 and d.enabled("tp")
    assert not d.enabled("cp")
