"""Deterministic token permutation: the gathers every MoE dispatcher is built from.

A :class:`SlotMap` links M *sources* with S *slots* each to R *rows*: slot (m, s) feeds
row ``row_MS[m, s]`` (-1: none), a row is fed by at most one slot, and rows fed by none
are padding (zeros). For ``models.moe.LocalDispatcher`` the sources are the T tokens and
the slots their k assignments; for the expert-parallel dispatchers (parallel/dispatch.py)
they are also the units sent to or received from other ranks.

- :func:`gather_rows` (``x_R = x_M[source of each row]``) and :func:`reduce_rows` (``out_M =
  sum_s w_MS * y_R[row of slot (m, s)]`` in fp32) have hand-written backwards that sum a
  source's slots in fp32 in slot order (``embedding_bag`` with fixed-size bags; the
  weighted forward multiplies, then sums): no atomics, no index_add, so gradients are
  deterministic on every device.
- :func:`group_rows` builds the map that sorts slots into rows grouped by a group id (an
  expert): a stable argsort, so within a group rows keep (source, slot) order; with a
  capacity C the rows are the static ``[groups, C]`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from models.grouped_gemm import no_autocast

__all__ = ["SlotMap", "count_ids", "gather_rows", "group_rows", "reduce_rows"]


@dataclass
class SlotMap:
    """M sources with S slots each <-> R rows (see the module docstring)."""

    row_MS: torch.Tensor
    slot_R: torch.Tensor  # flat slot m*S + s feeding each row (0 for padding)
    valid_R: Optional[torch.Tensor]  # None = every row is fed
    # Every slot feeds a row (no -1 in row_MS): the gathers index without a padding row.
    all_slots_fed: bool = False
    src_R: Optional[torch.Tensor] = None  # slot_R // S, computed once

    def __post_init__(self) -> None:
        if self.src_R is None:
            self.src_R = self.slot_R // self.row_MS.shape[1]

    @classmethod
    def build(cls, row_MS: torch.Tensor, num_rows: int, dense: bool) -> SlotMap:
        """``dense``: every row is fed by some slot (no padding rows to zero)."""
        flat = row_MS.flatten()
        dev = flat.device
        tgt = torch.where(flat >= 0, flat, num_rows)  # unused slots write a trash row
        slot = torch.zeros(num_rows + 1, dtype=torch.long, device=dev)
        slot.index_put_((tgt,), torch.arange(flat.numel(), device=dev))
        valid = None
        if not dense:
            valid = torch.zeros(num_rows + 1, dtype=torch.bool, device=dev)
            valid = valid.index_put_((tgt,), torch.ones_like(tgt, dtype=torch.bool))[:num_rows]
        return cls(row_MS, slot[:num_rows], valid)

    @classmethod
    def sorted_by(cls, group_MS: torch.Tensor) -> SlotMap:
        """Every slot a row, rows sorted by ``group_MS`` (no -1): one stable argsort, its
        inverse by one scatter, nothing to mask (the dropless local dispatch)."""
        order = torch.argsort(group_MS.flatten(), stable=True)
        pos = torch.empty_like(order).scatter_(0, order, _arange_like(order))
        return cls(pos.view_as(group_MS), order, None, all_slots_fed=True)


def _arange_like(t: torch.Tensor) -> torch.Tensor:
    return torch.arange(t.numel(), device=t.device)


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``bincount(ids, minlength=n)`` for ids in [0, n) without a host sync (CUDA bincount
    reads the max id to size its output): a scatter-add of ones into n known slots."""
    ids = ids.flatten()
    counts = torch.zeros(n, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def group_rows(
    group_MS: torch.Tensor,
    num_groups: int,
    num_rows: int,
    capacity: Optional[int] = None,
    dense: bool = True,
) -> SlotMap:
    """Slots -> rows grouped by ``group_MS`` (group id of every slot, -1 = none): group g's
    rows are consecutive, in (source, slot) order (a stable argsort). With ``capacity``
    C, group g owns rows ``g*C .. g*C + C - 1`` (at most C slots per group). ``dense``:
    every one of the ``num_rows`` rows is fed."""
    valid = group_MS >= 0
    key = torch.where(valid, group_MS, num_groups).flatten()
    order = torch.argsort(key, stable=True)
    pos = torch.empty_like(order).scatter_(0, order, _arange_like(order))
    if capacity is None and dense:
        # The fed rows are the first num_rows of the sort: the sort order is the slot map.
        return SlotMap(torch.where(valid, pos.view_as(group_MS), -1), order[:num_rows], None)
    row = pos
    if capacity is not None:
        counts = count_ids(key, num_groups + 1)
        starts = torch.cumsum(counts, 0) - counts
        row = key * capacity + (pos - starts[key]).clamp(max=capacity - 1)
    row_MS = torch.where(valid, row.view_as(group_MS), -1)
    return SlotMap.build(row_MS, num_rows, dense=dense)


def _fan_out(x_M: torch.Tensor, m: SlotMap) -> torch.Tensor:
    x_R = x_M.index_select(0, m.src_R)  # index_select: a fraction of aten::index's cost
    if m.valid_R is not None:
        x_R = x_R.masked_fill(~m.valid_R.unsqueeze(1), 0)
    return x_R


def _slots(t_R: torch.Tensor, m: SlotMap) -> torch.Tensor:
    """[M, S, ...]: the row of every slot, zeros for unused slots."""
    M, S = m.row_MS.shape
    if m.all_slots_fed:
        return t_R.index_select(0, m.row_MS.flatten()).view(M, S, *t_R.shape[1:])
    R = t_R.shape[0]
    pad = torch.cat([t_R, t_R.new_zeros((1, *t_R.shape[1:]))])
    rows = torch.where(m.row_MS >= 0, m.row_MS, R).flatten()
    return pad.index_select(0, rows).view(M, S, *t_R.shape[1:])


def _sum_slots(t_R: torch.Tensor, m: SlotMap) -> torch.Tensor:
    """``out_M = sum_s t_R[row of slot (m, s)]`` in fp32, in slot order: one
    ``embedding_bag`` (fixed-size bags; deterministic on CPU and CUDA) in place of a
    gathered ``[M, S, D]`` copy, its fp32 cast and a sum, bit for bit the same. An unused
    slot reads row 0 at weight 0, which adds exactly nothing, so no padding row (a copy
    of every row) is needed."""
    if t_R.shape[0] == 0:  # no rows: every slot unused
        return t_R.new_zeros((m.row_MS.shape[0], t_R.shape[1]), dtype=torch.float32)
    rows, w = m.row_MS, None
    if not m.all_slots_fed:
        rows, w = rows.clamp(min=0), (rows >= 0).float()
    return F.embedding_bag(rows, t_R.float(), per_sample_weights=w, mode="sum")


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_M: torch.Tensor, m: SlotMap) -> torch.Tensor:
        ctx.m = m
        return _fan_out(x_M, m)

    @staticmethod
    def backward(ctx, g_R: torch.Tensor):
        with no_autocast(g_R.device.type):
            return _sum_slots(g_R, ctx.m).to(g_R.dtype), None


class _Reduce(torch.autograd.Function):
    """fp32 throughout, autocast off inside (einsum and bmm are on CUDA autocast's
    lower-precision list; whatever this computes with, the k-way sum must not round to
    bf16). The forward multiplies, then sums the slots in order, bit for bit as it always
    has: ``embedding_bag`` (fused multiply-add) computes it 7x faster at large shapes but
    rounds differently, and a capacity drop decided between two scores 1 ulp apart then
    falls the other way (docs/results.md, issue 19 eighth pass)."""

    @staticmethod
    def forward(ctx, y_R, w_MS, m: SlotMap, dtype: torch.dtype):
        ctx.m = m
        with no_autocast(y_R.device.type):
            y_MSD = _slots(y_R, m)
            # saved instead of y_R (same bytes): the weights' gradient needs it slot-major
            ctx.save_for_backward(y_MSD, w_MS)
            y = y_MSD.float()
            if w_MS is not None:  # multiply-sum, not einsum/bmm: [M] tiny matmuls are slow
                y = y * w_MS.float().unsqueeze(2)
            out = y.sum(1)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, g_M):
        y_MSD, w_MS = ctx.saved_tensors
        m = ctx.m
        g_y = g_w = None
        with no_autocast(g_M.device.type):
            g = g_M.float()
            if ctx.needs_input_grad[0]:
                if w_MS is None:
                    g_y = _fan_out(g, m)
                else:  # row r: its slot's weight times g[source], gathered and scaled at once
                    w_R = w_MS.float().flatten().index_select(0, m.slot_R)
                    if m.valid_R is not None:
                        w_R = w_R * m.valid_R  # padding rows: weight 0
                    g_y = F.embedding_bag(m.src_R, g, _arange_like(m.src_R), mode="sum",
                                          per_sample_weights=w_R)  # bags of one row
                g_y = g_y.to(y_MSD.dtype)
            if w_MS is not None and ctx.needs_input_grad[1]:
                g_w = (y_MSD.float() * g.unsqueeze(1)).sum(2)  # unused slots: y_MSD rows 0
                g_w = g_w.to(w_MS.dtype)
        return g_y, g_w, None, None


def gather_rows(x_M: torch.Tensor, m: SlotMap) -> torch.Tensor:
    """``x_R = x_M[source of each row]`` (padding rows zero). Backward: each source's
    gradient is the sum of its slots' rows, in fp32, in slot order."""
    return _Gather.apply(x_M, m)


def reduce_rows(
    y_R: torch.Tensor, w_MS: Optional[torch.Tensor], m: SlotMap, dtype: torch.dtype
) -> torch.Tensor:
    """``out_M = sum_s w_MS * y_R[row of slot (m, s)]`` accumulated in fp32 (``w_MS`` None:
    weight 1; unused slots add nothing), cast to ``dtype``. Backward in fp32 too."""
    return _Reduce.apply(y_R, w_MS, m, dtype)
