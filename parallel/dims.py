"""The rank layout: one object that knows which ranks form which group (MoE parallel folding).

``W = PP·TP·CP·DP = PP·ETP·EP·EDP``. Inside one pipeline stage the same block of ranks is
read twice: by the dense side (attention, norms, embeddings, dense MLPs) as ``dp × cp × tp``
and by the expert side (routed experts) as ``edp × ep × etp``. Ranks are numbered in
Megatron-Core's default order ``"tp-cp-ep-dp-pp"`` (tp varies fastest) on both sides, so every
group equals Megatron's ``RankGenerator`` for the same sizes (the tests use it as the oracle).

The rank math is plain integers and tensors: validation, coordinates and group lists need no
process group. ``build_meshes`` then turns the same rank grids into two ``DeviceMesh`` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from parallel.collectives import all_reduce_sum

ORDER = "tp-cp-ep-dp-pp"  # fastest-varying first, as Megatron-Core's default
DENSE_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")
# Our dim name -> the RankGenerator token it plays on its side.
_TOKEN = {"pp": "pp", "dp": "dp", "cp": "cp", "tp": "tp", "edp": "dp", "ep": "ep", "etp": "tp"}
# Group kind -> (side, mesh dims of the group, slowest first). Rank order inside a group
# follows the mesh: the last dim varies fastest (tp inside tp_cp, etp inside ep_etp).
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "pp": ("dense", ("pp",)),
    "dp_cp": ("dense", ("dp", "cp")),  # dense-parameter gradient reduction / FSDP
    "tp_cp": ("dense", ("cp", "tp")),  # the attention tp×cp block
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("etp",)),
    "edp": ("expert", ("edp",)),  # routed-expert gradient reduction / FSDP
    "ep_etp": ("expert", ("ep", "etp")),  # expert model-parallel group
}


def divisors(n: int) -> str:
    """"1, 2, 4, 8" for 8: the valid sizes named in error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(eq=False)
class ParallelDims:
    """Sizes of every parallel dimension, the rank math, and (after ``build_meshes``) meshes.

    Build it with :meth:`from_config`; ``rank`` is this process's global rank (0 until
    ``build_meshes`` reads it from ``torch.distributed``, or pass it for rank math).
    """

    world_size: int
    tp: int
    cp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int
    rank: int = 0
    _meshes: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, parallel_cfg: Any, world_size: int, rank: int = 0) -> ParallelDims:
        """Validate ``parallel.{tp,cp,pp,ep,etp}`` against ``world_size`` and derive dp, edp.

        Raises ``ValueError`` with one line naming the key, its value and the valid values.
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size {world_size!r} must be a positive integer")
        sizes = {}
        for key in ("tp", "cp", "pp", "ep", "etp"):
            v = getattr(parallel_cfg, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{key}={v!r} must be a positive integer")
            sizes[key] = v

        def fit(key: str, room: int, given: str) -> None:
            if room % sizes[key]:
                with_ = f" with {given}" if given else ""
                raise ValueError(
                    f"parallel.{key}={sizes[key]} does not fit world size {world_size}{with_} "
                    f"(valid {key}: {divisors(room)})"
                )

        pp, cp, tp, ep, etp = (sizes[k] for k in ("pp", "cp", "tp", "ep", "etp"))
        fit("pp", world_size, "")
        fit("cp", world_size // pp, f"parallel.pp={pp}")
        fit("tp", world_size // (pp * cp), f"parallel.pp={pp}, parallel.cp={cp}")
        fit("etp", world_size // pp, f"parallel.pp={pp}")
        fit("ep", world_size // (pp * etp), f"parallel.pp={pp}, parallel.etp={etp}")
        return cls(
            world_size=world_size,
            tp=tp,
            cp=cp,
            pp=pp,
            ep=ep,
            etp=etp,
            dp=world_size // (pp * cp * tp),
            edp=world_size // (pp * etp * ep),
            rank=rank,
        )

    def __post_init__(self) -> None:
        W = self.world_size
        if (
            self.pp * self.dp * self.cp * self.tp != W
            or self.pp * self.edp * self.ep * self.etp != W
        ):
            raise ValueError(f"parallel sizes {self!r} do not multiply to world size {W}")
        # Folding only works because both sides cut the world into the same pipeline stages.
        if sorted(self._groups("dense", ("pp",))) != sorted(self._groups("expert", ("pp",))):
            raise RuntimeError(f"pp groups of the dense and expert sides differ for {self!r}")

    # ---------------------------------------------------------------- pure rank math
    def size(self, name: str) -> int:
        """Size of a dim or group kind (``dp_cp`` -> dp·cp, ``ep_etp`` -> ep·etp, ...)."""
        if name in KINDS:
            return math.prod(getattr(self, d) for d in KINDS[name][1])
        return getattr(self, name)

    def _side_sizes(self, side: str) -> dict[str, int]:
        dims = DENSE_DIMS if side == "dense" else EXPERT_DIMS
        return {d: getattr(self, d) for d in dims}

    @cached_property
    def _grids(self) -> dict[str, torch.Tensor]:
        """Per side, the rank grid with shape = the mesh dims (e.g. [pp, dp, cp, tp]).

        arange(W) reshaped by the order string (slowest first, so the first token of ORDER is
        the last, fastest, axis), then permuted into the mesh's dim order. The token the side
        does not use (ep on the dense side, cp on the expert side) has size 1 and is dropped.
        """
        grids = {}
        tokens = list(reversed(ORDER.split("-")))  # slowest first
        for side, dims in (("dense", DENSE_DIMS), ("expert", EXPERT_DIMS)):
            by_token = {_TOKEN[d]: s for d, s in self._side_sizes(side).items()}
            t = torch.arange(self.world_size).reshape([by_token.get(tok, 1) for tok in tokens])
            perm = [tokens.index(_TOKEN[d]) for d in dims]
            perm += [i for i in range(len(tokens)) if i not in perm]
            grids[side] = t.permute(perm).reshape([getattr(self, d) for d in dims])
        return grids

    def _groups(self, side: str, gdims: tuple[str, ...]) -> list[list[int]]:
        dims = DENSE_DIMS if side == "dense" else EXPERT_DIMS
        grid = self._grids[side]
        rest = [dims.index(d) for d in dims if d not in gdims]
        t = grid.permute(rest + [dims.index(d) for d in gdims])
        return t.reshape(-1, math.prod(getattr(self, d) for d in gdims)).tolist()

    def groups(self, kind: str) -> list[list[int]]:
        """All rank groups of ``kind`` (one of KINDS), in Megatron's group and member order."""
        if kind not in KINDS:
            raise KeyError(f"unknown group kind {kind!r} (valid: {', '.join(KINDS)})")
        return self._groups(*KINDS[kind])

    def group_of(self, kind: str, rank: int | None = None) -> list[int]:
        """The ranks of the ``kind`` group that contains ``rank`` (default: this rank)."""
        rank = self.rank if rank is None else rank
        return next(g for g in self.groups(kind) if rank in g)

    def coords(self, rank: int | None = None) -> dict[str, int]:
        """Coordinates of ``rank`` on both meshes: pp, dp, cp, tp, edp, ep, etp."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        out: dict[str, int] = {}
        for side, dims in (("dense", DENSE_DIMS), ("expert", EXPERT_DIMS)):
            idx = (self._grids[side] == rank).nonzero()[0].tolist()
            out.update(zip(dims, idx))
        return out

    @property
    def dp_rank(self) -> int:
        """Data-loading rank: CP (and TP, PP) ranks of one dp rank read the same samples."""
        return self.coords()["dp"]

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def pp_rank(self) -> int:
        return self.coords()["pp"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def enabled(self, name: str) -> bool:
        return self.size(name) > 1

    # ---------------------------------------------------------------- meshes
    def build_meshes(self, device_type: str) -> None:
        """Create the dense and expert DeviceMeshes and the flattened views (collective).

        Every rank must call this, in the same order, after ``init_process_group``.
        """
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError("build_meshes needs torch.distributed to be initialised")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"ParallelDims was built for world size {self.world_size}, "
                f"torch.distributed has {dist.get_world_size()}"
            )
        if self._meshes:
            raise RuntimeError("build_meshes was already called on this ParallelDims")
        self.rank = dist.get_rank()
        dense = DeviceMesh(device_type, self._grids["dense"], mesh_dim_names=DENSE_DIMS)
        expert = DeviceMesh(device_type, self._grids["expert"], mesh_dim_names=EXPERT_DIMS)
        meshes: dict[str, Any] = {"dense": dense, "expert": expert}
        for kind, (side, gdims) in KINDS.items():
            root = dense if side == "dense" else expert
            sub = root[gdims if len(gdims) > 1 else gdims[0]]
            # Flattened views are made here only (DeviceMesh._flatten is the torch 2.x way to
            # get one group over several dims); callers keep our handle, not a root slice.
            meshes[kind] = sub._flatten(kind) if len(gdims) > 1 else sub
            got = meshes[kind].mesh.flatten().tolist()
            if got != self.group_of(kind):  # local check, no communication
                raise RuntimeError(
                    f"mesh {kind!r} on rank {self.rank}: {got} != {self.group_of(kind)}"
                )
        self._meshes = meshes

    def _need(self, name: str) -> Any:
        if not self._meshes:
            raise RuntimeError("call ParallelDims.build_meshes(device_type) first")
        if name not in self._meshes:
            raise KeyError(f"unknown mesh {name!r} (valid: {', '.join(self._meshes)})")
        return self._meshes[name]

    @property
    def dense_mesh(self) -> Any:
        """DeviceMesh with dims ("pp", "dp", "cp", "tp")."""
        return self._need("dense")

    @property
    def expert_mesh(self) -> Any:
        """DeviceMesh with dims ("pp", "edp", "ep", "etp")."""
        return self._need("expert")

    def mesh(self, name: str) -> Any:
        """1-D DeviceMesh of a group kind (tp, cp, dp, pp, dp_cp, tp_cp, ep, etp, edp, ep_etp)."""
        return self._need(name)

    def group(self, name: str) -> Any:
        """ProcessGroup of a group kind, for this rank."""
        return self._need(name).get_group()

    def all_reduce_sum(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x`` summed over this rank's group of kind ``name`` (a new tensor; ``x`` itself
        when the group has one rank). The one place the trainer-facing code all-reduces."""
        if self.size(name) == 1:
            return x
        return all_reduce_sum(x, self.group(name))

    # ---------------------------------------------------------------- human view
    def describe(self, max_rows: int = 16) -> str:
        """Multi-line table of the layout for start-up logs."""
        W = self.world_size
        lines = [
            f"parallel layout, world size {W} (rank order {ORDER!r}: tp varies fastest, "
            "as Megatron-Core)",
            f"  dense  mesh (pp, dp, cp, tp)    = ({self.pp}, {self.dp}, {self.cp}, {self.tp})"
            "   attention, norms, embeddings, dense MLPs",
            f"  expert mesh (pp, edp, ep, etp) = ({self.pp}, {self.edp}, {self.ep}, {self.etp})"
            "   routed experts only",
            f"  each pipeline stage holds {W // self.pp} ranks, read as dp·cp·tp = "
            f"{self.dp}·{self.cp}·{self.tp} by the dense side and as edp·ep·etp = "
            f"{self.edp}·{self.ep}·{self.etp} by the experts",
        ]
        tp_cp, ep_etp = self.groups("tp_cp"), self.groups("ep_etp")
        if self.ep > 1 and tp_cp == ep_etp:
            lines.append("  folding: every attention tp×cp group is exactly an expert ep×etp group")
        lines.append(f"  {'group':<7}{'size':>5}{'count':>7}  {'first groups':<34} purpose")
        purpose = {
            "tp": "tensor parallel (dense)",
            "cp": "context parallel",
            "dp": "data parallel",
            "pp": "pipeline stages (shared)",
            "dp_cp": "dense grads reduced / FSDP",
            "tp_cp": "attention model-parallel block",
            "ep": "expert all-to-all",
            "etp": "tensor parallel inside experts",
            "edp": "expert grads reduced / FSDP",
            "ep_etp": "expert model-parallel block",
        }
        for kind in KINDS:
            gs = self.groups(kind)
            shown = " ".join(str(g).replace(" ", "") for g in gs[:2]) + (
                " …" if len(gs) > 2 else ""
            )
            if len(shown) > 34:
                shown = shown[:33] + "…"
            lines.append(f"  {kind:<7}{len(gs[0]):>5}{len(gs):>7}  {shown:<34} {purpose[kind]}")
        lines.append(
            f"  {'rank':>6} | {'pp':>3} | {'dp':>3} {'cp':>3} {'tp':>3} | "
            f"{'edp':>3} {'ep':>3} {'etp':>3}"
        )
        for r in range(min(W, max_rows)):
            c = self.coords(r)
            lines.append(
                f"  {r:>6} | {c['pp']:>3} | {c['dp']:>3} {c['cp']:>3} {c['tp']:>3} | "
                f"{c['edp']:>3} {c['ep']:>3} {c['etp']:>3}"
            )
        if W > max_rows:
            lines.append(f"  {'…':>6}   ({W - max_rows} more ranks)")
        return "\n".join(lines)
