"""``MoEStats``: the step's MoE statistics, reduced over the right rank groups.

Every MoE layer accumulates its routing statistics on the device (models/moe.py:
``pop_stats``). Which ranks must add them up is a question of the layout, answered here
and nowhere else:

- the router already sums its statistics over its *token group* (the TP ranks that split
  a micro-batch's sequence, and the CP ranks), so every member holds the group's totals;
- the data-parallel replicas (``dp``) hold different micro-batches: their tables add up;
- pipeline ranks (``pp``) hold different layers: each fills its own rows of the
  ``[num MoE layers, E + stats]`` table, and the sum over ``pp`` assembles it.

So one all-reduce over ``dp`` and one over ``pp`` per step, whatever the layout. The same
object owns what the layout decides about the aux losses and the dispatchers: the scale
that makes ``d(objective)/d(aux)`` independent of the micro-batch split, the aux-loss-free
expert-bias update from the reduced counts, the global-batch load-balancing counts
(``model.moe.aux_loss_scope=global_batch``: each router keeps this step's reduced counts
for the next step's switch loss, identical whatever the layout), and the activation bytes
the dispatchers sent.

Null experts (``num_null_experts`` = n): the table carries E + n count columns (the
global-batch counts need the null ones); ``counts_LE`` and the load metrics keep the E
real experts, and ``real_experts_per_token`` (per layer and mean) is the real picks over
the tokens routed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.grouped_gemm import host_to
from models.moe import HOST_COLUMNS, STAT_COLUMNS, MoELayer, set_aux_loss_scale
from parallel.dims import ParallelDims

__all__ = ["MoEStats"]



class MoEStats:
    """``moe_pattern``: which layers of the whole model are MoE; ``model``: this rank's
    (stage) module, holding some of them (``model.layers`` keeps the global keys);
    ``num_experts``: ``model.moe.num_experts`` (an int, or one count per layer: pyramid
    MoE, whose table rows are padded to the largest count)."""

    def __init__(self, model: nn.Module, dims: ParallelDims, moe_pattern: list[bool],
                 num_experts: int | list[int], num_micro: int, device: torch.device,
                 num_null_experts: int = 0):
        self.dims, self.device = dims, device
        self.num_null = num_null_experts  # (config validation: only with a uniform count)
        self.layer_ids = [i for i, moe in enumerate(moe_pattern) if moe]
        # experts of each table row; the table is [rows, max E + stats], padded with zeros
        self.row_experts = [num_experts if isinstance(num_experts, int) else
                            int(num_experts[i]) for i in self.layer_ids]
        self.num_experts = max(self.row_experts, default=0)
        self.layers: list[MoELayer] = list(model.moe_layers())
        # the table row of each local MoE layer (model.moe_layers() is in layer order)
        self.rows = [self.layer_ids.index(int(k)) for k in model.layers if moe_pattern[int(k)]]
        if len(self.rows) != len(self.layers):
            raise RuntimeError(f"{len(self.layers)} MoE layers but MoE blocks {self.rows}")
        # every table row local, in order, and as wide as the layer's statistics row
        width = self.num_experts + self.num_null
        self._stacked = self.rows == list(range(len(self.layer_ids))) and all(
            layer.num_counts == width for layer in self.layers)
        self._row_index = torch.tensor(self.rows, dtype=torch.long, device=device)
        # The objective is a sum over micro-batches and dp ranks of per-micro-batch terms
        # normalised by the global batch: each micro-batch's aux losses weigh 1/(m * dp).
        set_aux_loss_scale(model, 1.0 / (num_micro * dims.dp_size))
        self._bytes_sent = 0  # host int: no device sync

    def count_dispatch(self) -> None:
        """Add the bytes the dispatchers sent since the last call (every layer counts
        each micro-batch it ran, also when micro-batches interleave)."""
        self._bytes_sent += sum(layer.take_dispatch_bytes() for layer in self.layers)

    def reset(self) -> None:
        """Forget the statistics since the last pop (validation routing, a discarded pass)."""
        for layer in self.layers:
            layer.pop_stats()
            layer.take_dispatch_bytes()
        self._bytes_sent = 0

    def _take_table(self, C: int) -> torch.Tensor:
        """This rank's ``[MoE layers, C + stats]`` table from the layers' statistics rows
        (rows of other pipeline stages zero), which are reset. One ``stack`` when every
        layer is local and has C count columns (the usual case: ~3 ops, not ~25 per layer)."""
        rows = [layer.stat_row for layer in self.layers]
        if self._stacked:
            table = torch.stack(rows)
        else:
            table = torch.zeros(len(self.layer_ids), C + len(STAT_COLUMNS), device=self.device)
            for i, layer, r in zip(self.rows, self.layers, rows):
                n = layer.num_counts  # E_row real (+ the null experts', uniform E)
                table[i, :n] = r[:n]
                table[i, C:] = r[n:]
        if rows:
            torch._foreach_zero_(rows)
            # the assignments and tokens columns, counted on the host (one copy)
            host = torch.tensor([layer.take_assignments() for layer in self.layers],
                                dtype=table.dtype)
            table[:, C:][:, HOST_COLUMNS].index_add_(0, self._row_index,
                                                     host_to(host, table.device))
        return table

    def pop(self, update_expert_bias: bool = True) -> dict[str, Any]:
        """The step's statistics (tensors, on every rank) and, by default, the expert-bias
        update from the globally reduced counts; then reset. ``counts_LE``: routed tokens per
        (MoE layer, expert); NaN past a layer's own expert count (pyramid MoE)."""
        sent, self._bytes_sent = self._bytes_sent, 0
        if not self.layer_ids:
            return {"aux_loss": 0.0, "dispatch_mb_sent": sent / 2**20}
        E, C = self.num_experts, self.num_experts + self.num_null
        table = self._take_table(C)
        table = self.dims.all_reduce_sum(self.dims.all_reduce_sum(table, "dp"), "pp")
        counts = table[:, :E]
        for row, layer in zip(self.rows, self.layers):
            E_row = self.row_experts[row]
            # the whole global batch's counts of this step (global_batch scope only)
            if layer.router.lb_counts is not None:
                layer.router.set_global_counts(table[row, :E_row + self.num_null])
            if update_expert_bias and layer.router.expert_bias is not None:
                layer.update_expert_bias(counts[row, :E_row])
        col = dict(zip(STAT_COLUMNS, table[:, C:].unbind(1)))
        total = dict(zip(STAT_COLUMNS, table[:, C:].sum(0).unbind(0)))  # over the layers
        real_per_token = counts.sum(1) / col["tokens"].clamp_min(1)
        extra = {}
        if self.num_null:
            extra = {f"real_experts_per_token_layer{i}": real_per_token[r]
                     for r, i in enumerate(self.layer_ids)}
        mean = counts.mean(dim=1)
        if min(self.row_experts) < E:  # ragged: the mean over each layer's own experts
            E_L = torch.tensor(self.row_experts, device=counts.device, dtype=counts.dtype)
            mean = counts.sum(dim=1) / E_L  # (the padding is zero)
            pad = torch.arange(E, device=counts.device)[None, :] >= E_L[:, None]
        per_layer_max_over_mean = counts.max(dim=1).values / mean.clamp_min(1e-9)
        if min(self.row_experts) < E:
            counts = counts.masked_fill(pad, float("nan"))
        return {
            "real_experts_per_token": real_per_token.mean(),
            **extra,
            "dispatch_mb_sent": sent / 2**20,
            "aux_loss": total["aux_loss"] + total["seq_aux_loss"] + total["z_loss"],
            "load_balance_loss": total["aux_loss"],
            "seq_aux_loss": total["seq_aux_loss"],
            "z_loss": total["z_loss"],
            "expert_load_max": per_layer_max_over_mean.max(),
            "expert_load_mean_max": per_layer_max_over_mean.mean(),
            "dropped_frac": total["dropped"] / total["assignments"].clamp_min(1),
            "counts_LE": counts,
        }
