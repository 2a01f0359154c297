"""ParallelDims.build_meshes on real gloo processes: every mesh dim's ProcessGroup holds exactly
the ranks the pure rank math says, and collectives over it reach exactly those ranks."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.dims import DENSE_DIMS, EXPERT_DIMS, KINDS, ParallelDims

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

# world size -> layouts built one after another in the same process group.
LAYOUTS = {
    8: [
        dict(tp=2, cp=1, pp=1, ep=4, etp=1),  # attention tp2·dp4 vs experts ep4·edp2
        dict(tp=2, cp=2, pp=2, ep=2, etp=2),  # pp2, cp with ep, etp == tp
        dict(tp=1, cp=2, pp=1, ep=2, etp=2),  # etp != tp, ep·etp spans cp and dp ranks
    ],
    4: [
        dict(tp=1, cp=2, pp=1, ep=4, etp=1),  # folded: cp2·dp2 dense vs ep4 experts (EP > DP)
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_layout(world: int, sizes: dict) -> None:
    rank = dist.get_rank()
    dims = ParallelDims.from_config(SimpleNamespace(**sizes), world)
    dims.build_meshes("cpu")
    assert dims.rank == rank
    assert dims.dense_mesh.mesh_dim_names == DENSE_DIMS
    assert dims.expert_mesh.mesh_dim_names == EXPERT_DIMS
    assert dims.dense_mesh.size() == dims.expert_mesh.size() == world
    # Both full meshes place every rank at its coordinates from the rank math.
    for r in range(world):
        c = dims.coords(r)
        assert dims.dense_mesh.mesh[tuple(c[d] for d in DENSE_DIMS)].item() == r
        assert dims.expert_mesh.mesh[tuple(c[d] for d in EXPERT_DIMS)].item() == r
    assert dims.mesh("dp_cp") is dims.mesh("dp_cp")  # flattened once, handed out as is
    with pytest.raises(RuntimeError, match="already called"):
        dims.build_meshes("cpu")
    for kind in KINDS:
        want = dims.group_of(kind)
        pg = dims.group(kind)
        assert dist.get_process_group_ranks(pg) == want, (sizes, kind, rank)
        assert dims.mesh(kind).get_local_rank() == want.index(rank), (sizes, kind)
        # One bit per rank: the sum names exactly who took part.
        bits = torch.tensor([1 << rank], dtype=torch.int64)
        dist.all_reduce(bits, group=pg)
        assert bits.item() == sum(1 << r for r in want), (sizes, kind, rank, bits.item())
    # The dense mesh's own dims agree with the coordinates of the rank math.
    coords = dims.coords()
    for d in DENSE_DIMS:
        assert dims.dense_mesh.get_local_rank(d) == coords[d], (sizes, d)
    for d in EXPERT_DIMS:
        assert dims.expert_mesh.get_local_rank(d) == coords[d], (sizes, d)
    assert dims.dp_rank == coords["dp"] and dims.is_main == (rank == 0)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for sizes in LAYOUTS[world]:
            _check_layout(world, sizes)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` fresh processes and wait for them.

    forkserver: the server imports torch and this module once, then forks each worker from
    that clean, thread-free state (plain spawn re-imports torch per rank: ~1 s each on 2 cores).
    A failed assertion on any rank surfaces here as ProcessRaisedException with its traceback.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    mp.start_processes(
        fn, args=(world, _free_port(), *args), nprocs=world, start_method="forkserver"
    )


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_mesh_groups_match_rank_math(world):
    spawn(_worker, world)
