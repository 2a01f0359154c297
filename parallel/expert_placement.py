"""Expert placement: which EP rank holds which routed experts (``parallel.expert_placement``).

By default EP rank ``r`` holds the contiguous experts ``r*E_l .. (r+1)*E_l - 1``. A
placement is, per MoE layer, a permutation ``slots`` of the expert ids: physical slot ``p``
(rank ``p // E_l``) holds logical expert ``slots[p]``; each rank keeps its experts in
ascending id order. Everything outside the EP sharding keeps logical ids — the router, its
bias, the expert-load statistics, the seeded init (``GroupedExperts.expert_ids``) and the
checkpoints, which store every expert tensor in logical order (:func:`placed_view` tells
DCP which rows of the global tensor a rank holds), so a checkpoint written under one
placement loads under any other, or under none.

Where experts sit changes only which rank computes them: the dispatcher maps logical to
physical ids (:class:`PlacedDispatcher`) and sends each token row where its experts live.
The loss is that of the contiguous placement (tests/test_expert_placement.py).

Choosing a placement (MoETuner, ExFlow): tokens whose k experts sit on several nodes cross
the slow inter-node links once per remote rank (the all-to-all sends one row per
destination rank). :func:`optimise_placement` reads a routing trace (which experts each
token chose, layer after layer; :class:`RoutingTrace` records it during training), packs
experts that are often chosen together into one node, then into one rank inside it (a
balanced graph partition of the co-selection counts minus those independent choices
would give — the minus term keeps hot experts apart, so the ranks' loads stay balanced;
greedy seeding, then best-swap local search: the ILP of MoETuner replaced by a heuristic
that needs no solver), and optionally pulls experts towards the node of the previous
layer's experts their tokens came from (ExFlow's inter-layer affinity; it pays only when
tokens stay on their expert's node between layers, see :func:`cross_node_rows`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from models.layers import in_backward
from models.moe import Dispatcher, MoELayer
from models.router import Routing

__all__ = [
    "rank_load_imbalance",
    "Placement",
    "PlacementError",
    "PlacedDispatcher",
    "RoutingTrace",
    "check_placement_spec",
    "cross_node_rows",
    "load_trace",
    "moe_layer_names",
    "optimise_placement",
    "placed_view",
]


class PlacementError(ValueError):
    """A placement that does not fit the model or layout (a user error: one line)."""


# --------------------------------------------------------------------------------------
# The placement itself
# --------------------------------------------------------------------------------------

def moe_layer_names(model: nn.Module) -> dict[str, MoELayer]:
    """``{name: layer}`` for every MoE layer, named by its path in the full model
    (``layers.3.ffn``) — the same under any pipeline split or wrapper."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            out[name.replace("_checkpoint_wrapped_module.", "")] = m
    return out


@dataclass
class Placement:
    """Per MoE layer name, ``slots`` (physical slot -> logical expert id). Layers not
    listed keep the contiguous placement."""

    layers: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # how it was made (free-form)

    def slots(self, name: str, num_experts: int) -> list[int]:
        s = self.layers.get(name)
        return list(range(num_experts)) if s is None else list(s)

    def rank_experts(self, name: str, num_experts: int, ep: int, ep_rank: int) -> list[int]:
        """Logical ids EP rank ``ep_rank`` holds, ascending."""
        n = num_experts // ep
        return sorted(self.slots(name, num_experts)[ep_rank * n:(ep_rank + 1) * n])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"layers": self.layers, "info": self.info}, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        """Raises ``ValueError`` (one line naming the file) for anything but a placement."""
        try:
            d = json.loads(Path(path).read_text())
            layers = {str(k): [int(e) for e in v] for k, v in d["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlacementError(f"parallel.expert_placement={path} is not a placement file "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
        for name, s in layers.items():
            if sorted(s) != list(range(len(s))):
                raise PlacementError(f"parallel.expert_placement={path}: layer {name} is not a "
                                 f"permutation of 0..{len(s) - 1}")
        return cls(layers, d.get("info", {}))

    def check(self, names_to_experts: dict[str, int], source: str) -> None:
        """Every listed layer exists and has the right expert count."""
        for name, s in self.layers.items():
            if name not in names_to_experts:
                raise PlacementError(f"parallel.expert_placement={source} names layer {name!r}, "
                                 f"which is not an MoE layer of this model")
            if len(s) != names_to_experts[name]:
                raise PlacementError(f"parallel.expert_placement={source}: layer {name} places "
                                 f"{len(s)} experts, the model has {names_to_experts[name]}")


def check_placement_spec(spec: str) -> None:
    """``parallel.expert_placement``: '' / contiguous / auto / an existing JSON file."""
    if spec in ("", "contiguous", "auto"):
        return
    if not Path(spec).is_file():
        raise PlacementError(f"parallel.expert_placement={spec} is neither contiguous, auto nor "
                         f"an existing placement file")
    Placement.load(spec)


class PlacedDispatcher(Dispatcher):
    """Wraps the EP dispatcher: logical expert ids -> physical slots before dispatch (the
    inner dispatcher's contiguous layout then puts each row on the rank holding its
    expert). Ids outside ``[0, E)`` (none assigned) pass unchanged."""

    def __init__(self, inner: Dispatcher, physical_of: torch.Tensor):
        self.inner = inner
        self.physical_of = physical_of  # [E] long: logical id -> physical slot

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    @property
    def meta_bytes_sent(self) -> int:
        return self.inner.meta_bytes_sent

    def map_routing(self, routing: Routing) -> Routing:
        idx = routing.expert_idx_TK
        table = self.physical_of.to(idx.device)
        E = table.numel()
        valid = (idx >= 0) & (idx < E)
        return replace(routing, expert_idx_TK=torch.where(valid, table[idx.clamp(0, E - 1)], idx))

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        return self.inner.dispatch(x_TD, self.map_routing(routing))

    def dispatch_steps(self, x_TD: torch.Tensor, routing: Routing, **kw):
        return self.inner.dispatch_steps(x_TD, self.map_routing(routing), **kw)

    def combine(self, y_ND: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.inner.combine(y_ND, ctx)

    def combine_steps(self, y_ND: torch.Tensor, ctx: Any):
        return self.inner.combine_steps(y_ND, ctx)


# --------------------------------------------------------------------------------------
# Checkpoints: a rank's experts as chunks of the logical global tensor
# --------------------------------------------------------------------------------------

def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    for j, g in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == g:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, g, 1))
    return out


class _PlacedLocal(torch.Tensor):
    """A rank's block of an expert tensor (a view of the live tensor) that tells DCP it
    holds one chunk of the global tensor per run of consecutive expert ids. DTensor hands
    its checkpoint hooks to the local tensor when the local tensor has them."""

    _runs: list[tuple[int, int, int]]
    _offsets: tuple[int, ...]  # global offsets of dims 1.. (and of dim 0 if contiguous)
    _global: torch.Size

    def _plain(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def _chunks(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        rest = tuple(self.shape[1:])
        for j, g, n in self._runs:
            yield j, n, ChunkStorageMetadata(offsets=torch.Size((g, *self._offsets[1:])),
                                             sizes=torch.Size((n, *rest)))

    def __create_chunk_list__(self):
        return [c for _, _, c in self._chunks()]

    def __create_write_items__(self, fqn: str, obj: Any):
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import (
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )
        props = TensorProperties.create_from_tensor(self._plain())
        return [WriteItem(index=MetadataIndex(fqn, c.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=c, properties=props,
                                                      size=self._global))
                for _, _, c in self._chunks()]

    def __get_tensor_shard__(self, index):
        for j, n, c in self._chunks():
            if c.offsets == index.offset:
                return self._plain()[j:j + n]
        raise ValueError(f"no expert chunk at {index.offset} for {index.fqn}")


def placed_view(dt, expert_ids: list[int]):
    """``dt`` (the DTensor view of a rank's expert block, dim 0 = experts, as if the
    block were contiguous) re-described as holding the rows ``expert_ids`` of the global
    tensor. Shares storage with ``dt``'s local tensor (in-place loads reach the live
    tensors)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local = dt._local_tensor
    _, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    tagged = local.as_subclass(_PlacedLocal)
    tagged._runs = _runs(expert_ids)
    tagged._offsets = tuple(offsets)
    tagged._global = dt.shape
    dt._local_tensor = tagged
    return dt


# --------------------------------------------------------------------------------------
# Routing traces
# --------------------------------------------------------------------------------------

class RoutingTrace:
    """Records which experts each token chose in every local MoE layer, on the steps
    ``step % every == 0`` (all micro-batches of that step, this rank's tokens), into
    ``{dir}/rank{r}.pt`` (written atomically by :meth:`flush`): ``{layer name: int16
    [tokens, k]}``, layers in model order — consecutive layers see the same tokens in the
    same order, so inter-layer affinity can be read off. Recording is a forward hook on
    the routers (one device->host copy per layer on recording steps only)."""

    def __init__(self, model: nn.Module, directory: str | Path, every: int, rank: int = 0,
                 max_tokens: int = 1 << 20):
        self.dir, self.every, self.rank = Path(directory), every, rank
        self.max_tokens = max_tokens
        self.active = False
        self.data: dict[str, list[torch.Tensor]] = {}
        self.tokens: dict[str, int] = {}
        self.experts: dict[str, int] = {}  # each layer's (global) routed expert count
        self.handles = []
        for name, layer in moe_layer_names(model).items():
            self.data[name], self.tokens[name] = [], 0
            self.experts[name] = layer.experts.num_global_experts
            self.handles.append(layer.router.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out) -> None:
            if not self.active or not torch.is_grad_enabled() or in_backward():
                return  # not a recording step, an eval pass, or a checkpoint recompute
            if self.tokens[name] >= self.max_tokens:
                return
            idx = out.routing.expert_idx_TK.detach()
            self.data[name].append(idx.to("cpu", torch.int16))
            self.tokens[name] += idx.shape[0]
        return hook

    def before_step(self, step: int) -> None:
        """Record step ``step`` (1-based) when it is a recording step."""
        self.active = self.every > 0 and step % self.every == 0

    def flush(self) -> Optional[Path]:
        if not any(self.data.values()):
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"routing": {n: torch.cat(v) for n, v in self.data.items() if v},
                    "num_experts": self.experts}, tmp)
        tmp.replace(path)
        return path

    def close(self) -> None:
        self.flush()
        for h in self.handles:
            h.remove()
        self.handles = []


def load_trace(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every rank's trace in ``directory`` merged per layer (rank order), and each layer's
    expert count."""
    merged: dict[str, list[torch.Tensor]] = {}
    experts: dict[str, int] = {}
    for f in sorted(Path(directory).glob("rank*.pt")):
        d = torch.load(f, weights_only=True)
        for name, t in d["routing"].items():
            merged.setdefault(name, []).append(t.long())
        experts.update(d["num_experts"])
    return {n: torch.cat(v) for n, v in merged.items()}, experts


# --------------------------------------------------------------------------------------
# Optimising a placement, and the traffic it causes
# --------------------------------------------------------------------------------------

def _node_layout(ep: int, nodes: int) -> tuple[int, int]:
    if nodes < 1 or ep % nodes:
        raise ValueError(f"{nodes} nodes do not divide ep={ep}")
    return nodes, ep // nodes


def _co_selection(idx_TK: np.ndarray, E: int) -> np.ndarray:
    """[E, E] number of tokens that chose both i and j (diagonal zero)."""
    T = idx_TK.shape[0]
    onehot = np.zeros((T, E + 1), dtype=np.float64)  # column E: null picks (id -1)
    np.put_along_axis(onehot, np.where(idx_TK >= 0, idx_TK, E), 1.0, axis=1)
    co = onehot[:, :E].T @ onehot[:, :E]
    np.fill_diagonal(co, 0.0)
    return co


def _load(idx_TK: np.ndarray, E: int) -> np.ndarray:
    """Assignments per expert (null picks, id -1, excluded)."""
    return np.bincount(idx_TK[idx_TK >= 0].reshape(-1), minlength=E).astype(np.float64)


def _affinity(prev_TK: np.ndarray, idx_TK: np.ndarray, E_prev: int, E: int) -> np.ndarray:
    """[E_prev, E]: tokens whose top-1 expert in the previous layer was i and that chose j."""
    a = np.zeros((E_prev, E))
    rows, cols = np.repeat(prev_TK[:, 0], idx_TK.shape[1]), idx_TK.reshape(-1)
    ok = (rows >= 0) & (cols >= 0)
    np.add.at(a, (rows[ok], cols[ok]), 1.0)
    return a


def _partition(W: np.ndarray, lin: np.ndarray, nodes: int, load: np.ndarray,
               max_swaps: int) -> np.ndarray:
    """Balanced partition of E experts into ``nodes`` groups of E/nodes maximising
    ``sum_{same node} W[i, j] / 2 + sum_i lin[i, node(i)]``: greedy seeding by load, then
    the best improving swap until none improves. Returns node of each expert."""
    E = W.shape[0]
    cap = E // nodes
    node = -np.ones(E, dtype=np.int64)
    filled = np.zeros(nodes, dtype=np.int64)
    S = np.zeros((E, nodes))  # S[i, n] = sum of W[i, j] over experts j on node n
    for i in np.argsort(-load, kind="stable"):
        gain = S[i] + lin[i]
        gain[filled >= cap] = -np.inf
        n = int(np.argmax(gain))
        node[i] = n
        filled[n] += 1
        S[:, n] += W[:, i]
    for _ in range(max_swaps):
        own = S[np.arange(E), node] + lin[np.arange(E), node]  # [E]
        # moving i to j's node and j to i's node
        to_j = S[:, node] + lin[:, node]  # [E(i), E(j)]: i's gain on j's node
        g = to_j - own[:, None] + to_j.T - own[None, :] - 2 * W
        g[node[:, None] == node[None, :]] = -np.inf
        i, j = np.unravel_index(int(np.argmax(g)), g.shape)
        if g[i, j] <= 1e-9:
            break
        ni, nj = node[i], node[j]
        node[i], node[j] = nj, ni
        S[:, ni] += W[:, j] - W[:, i]
        S[:, nj] += W[:, i] - W[:, j]
    return node


def _ranks_in_nodes(node: np.ndarray, W: np.ndarray, load: np.ndarray, nodes: int,
                    per_node: int, max_swaps: int) -> list[int]:
    """Slots: inside each node the same partition again, over its ranks (co-selected
    experts on one rank: the all-to-all sends a token one row per rank); each rank's
    experts ascending."""
    slots: list[int] = []
    for n in range(nodes):
        members = np.flatnonzero(node == n)
        sub = W[np.ix_(members, members)]
        rank = _partition(sub, np.zeros((members.size, per_node)), per_node, load[members],
                          max_swaps) if per_node > 1 else np.zeros(members.size, np.int64)
        for r in range(per_node):
            slots.extend(sorted(int(e) for e in members[rank == r]))
    return slots


def optimise_placement(trace: dict[str, torch.Tensor], num_experts: int | dict[str, int],
                       ep: int, nodes: int, affinity_weight: float = 0.0,
                       max_swaps: int = 2000) -> Placement:
    """A placement for ``ep`` ranks on ``nodes`` nodes from a routing trace (layers in
    model order): co-selected experts on one node, ranks balanced inside each node;
    ``affinity_weight`` > 0 adds ExFlow's pull towards the node of the tokens' previous
    top-1 expert."""
    nodes, per_node = _node_layout(ep, nodes)
    layers, prev, prev_node = {}, None, None
    for name, idx in trace.items():
        a = idx.numpy()
        E = num_experts if isinstance(num_experts, int) else num_experts[name]
        if E % ep:
            raise PlacementError(f"ep={ep} does not divide the {E} experts of layer {name}")
        load = _load(a, E)
        # co-selections beyond what independent choices would give (a modularity
        # weight): a pair of heavily loaded experts repels, so groups stay balanced
        W = _co_selection(a, E) - np.outer(load, load) / max(a.shape[0], 1)
        np.fill_diagonal(W, 0.0)
        lin = np.zeros((E, nodes))
        if affinity_weight > 0 and prev is not None and prev.shape[0] == a.shape[0]:
            A = _affinity(prev, a, prev_node.size, E)  # [E_prev, E]
            for n in range(nodes):
                lin[:, n] = affinity_weight * A[prev_node == n].sum(0)
        if nodes == 1:
            node = np.zeros(E, dtype=np.int64)
        else:
            node = _partition(W, lin, nodes, load, max_swaps)
        slots = _ranks_in_nodes(node, W, load, nodes, per_node, max_swaps)
        layers[name] = slots
        prev, prev_node = a, node
    return Placement(layers, {"ep": ep, "nodes": nodes, "affinity_weight": affinity_weight,
                              "tokens": int(next(iter(trace.values())).shape[0]) if trace else 0})


def cross_node_rows(trace: dict[str, torch.Tensor], placement: Placement, num_experts: int,
                    ep: int, nodes: int, follow: bool = False) -> dict[str, float]:
    """Token rows that cross a node boundary per token and MoE layer (dispatch only; the
    combine sends the same rows back), for tokens spread round-robin over the ``ep``
    ranks. ``rank_rows``: one row per remote destination rank (our all-to-all with
    dedup); ``node_rows``: one per remote node (a node-level dedup, DeepEP-style).
    ``follow``: a token stays on the rank of its previous layer's top-1 expert instead of
    returning to its source (ExFlow's setting, where inter-layer affinity pays)."""
    nodes, per_node = _node_layout(ep, nodes)
    E_l = num_experts // ep
    rank_rows = node_rows = 0.0
    n_layers = 0
    src = None
    for name, idx in trace.items():
        a = idx.numpy()
        T = a.shape[0]
        slots = placement.slots(name, num_experts)
        rank_of = np.empty(num_experts, dtype=np.int64)
        rank_of[np.asarray(slots)] = np.arange(num_experts) // E_l
        if src is None or not follow or src.shape[0] != T:
            src = np.arange(T) % ep
        # [T, k]; a null pick (id -1, null experts) goes nowhere: counted as local
        dest = np.where(a >= 0, rank_of[np.clip(a, 0, None)], src[:, None])
        dest_node, src_node = dest // per_node, src // per_node
        # distinct remote ranks / nodes per token
        d_sorted = np.sort(dest, axis=1)
        first = np.ones_like(d_sorted, dtype=bool)
        first[:, 1:] = d_sorted[:, 1:] != d_sorted[:, :-1]
        remote = (d_sorted // per_node) != src_node[:, None]
        rank_rows += float((first & remote).sum()) / T
        n_sorted = np.sort(dest_node, axis=1)
        nfirst = np.ones_like(n_sorted, dtype=bool)
        nfirst[:, 1:] = n_sorted[:, 1:] != n_sorted[:, :-1]
        node_rows += float((nfirst & (n_sorted != src_node[:, None])).sum()) / T
        n_layers += 1
        src = dest[:, 0]
    n = max(n_layers, 1)
    return {"rank_rows": rank_rows / n, "node_rows": node_rows / n}


def resolve_placement(spec: str, run_dir: str | Path, dims: Any,
                      gpus_per_node: int) -> Optional[Placement]:
    """The placement ``parallel.expert_placement`` asks for on this layout (None =
    contiguous): a file, or ``auto`` — optimised from the routing traces a previous run
    in ``run_dir`` recorded (``logger.routing_trace_every``) for the nodes this EP group
    spans (``cluster.gpus_per_node``); contiguous while there is no trace. Every rank
    computes the same placement from the same files (no collective)."""
    if spec in ("", "contiguous") or dims.ep == 1:
        return None
    if spec != "auto":
        placement = Placement.load(spec)
        placement.info["source"] = spec
        return placement
    trace_dir = Path(run_dir) / "routing"
    if not any(trace_dir.glob("rank*.pt")):
        return None
    import torch.distributed as dist
    ranks = dist.get_process_group_ranks(dims.group("ep"))
    nodes = len({r // max(gpus_per_node, 1) for r in ranks})
    if dims.ep % nodes:
        nodes = 1  # an EP group spread unevenly over nodes: balance ranks only
    trace, experts = load_trace(trace_dir)
    placement = optimise_placement(trace, experts, dims.ep, nodes)
    placement.info["source"] = str(trace_dir)
    if dist.get_rank() == 0:  # what this run used, for the record
        placement.save(trace_dir / "placement.json")
    return placement


def rank_load_imbalance(trace: dict[str, torch.Tensor], placement: Placement,
                        num_experts: int, ep: int) -> float:
    """Max over layers of (busiest rank's assignments / mean): what a placement costs in
    load balance (the all-to-all waits for the busiest rank)."""
    worst = 1.0
    E_l = num_experts // ep
    for name, idx in trace.items():
        load = _load(idx.numpy(), num_experts)
        slots = np.asarray(placement.slots(name, num_experts))
        per_rank = load[slots].reshape(ep, E_l).sum(1)
        worst = max(worst, float(per_rank.max() / max(per_rank.mean(), 1e-9)))
    return worst
