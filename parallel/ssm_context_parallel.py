"""Context parallelism for Mamba layers: exact, by passing the scan state between chunks.

Under CP a rank holds chunks ``r`` and ``2cp-1-r`` of every sequence (the attention
layers' load-balanced split, parallel/context_parallel.py). A Mamba layer needs, for each
local chunk ``c``:

- the conv halo: the last ``d_conv - 1`` (pre-conv) activations and document ids of chunk
  ``c - 1`` — one all-gather of every chunk's tail;
- the state entering the chunk. Each rank scans its chunks from a zero state, giving the
  chunk's outputs ``y0``, its final state ``h_c`` and its decay ``P_c = prod exp(ΔA)``
  (0 across a document start). One all-gather of every chunk's ``(P_c, h_c)`` lets each
  rank fold the states in sequence order, ``h_in(c) = P_{c-1} h_in(c-1) + h_{c-1}``, and
  correct its outputs: ``y_t += C_t · (P_{≤t} ⊙ h_in(c))``.

Both all-gathers have reduce-scatter backwards, so the gradient of a chunk's state and
halo returns to the rank that produced them: the result equals one process's scan, in
values and gradients (tests/test_mot_parity_distributed.py). The per-position decay
``P_{≤t}`` costs one ``[B, T/cp, d_inner, d_state]`` tensor per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from models.mamba import SequenceScan, causal_conv1d, fp32_region, selective_scan
from parallel.collectives import all_gather, all_gather_autograd

__all__ = ["ContextParallelScan"]


class ContextParallelScan(SequenceScan):
    def __init__(self, group):
        self.group = group
        self.cp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.local_chunks = (self.rank, 2 * self.cp - 1 - self.rank)

    def _by_chunk(self, gathered: torch.Tensor) -> list[torch.Tensor]:
        """[cp, 2, ...] (rank, its local slot) -> list over the 2cp chunks in order."""
        cp = self.cp
        return [gathered[c, 0] if c < cp else gathered[2 * cp - 1 - c, 1] for c in range(2 * cp)]

    def _gather(self, parts: list[torch.Tensor], grad: bool) -> list[torch.Tensor]:
        x = torch.stack(parts).unsqueeze(0).contiguous()
        g = all_gather_autograd(x, self.group) if grad else all_gather(x.detach(), self.group)
        return self._by_chunk(g)

    def _prev_docs(self, doc_ids: Optional[torch.Tensor], k: int):
        """Per local chunk: the last ``k`` document ids of the chunk before it (-1 before
        the sequence start), or None without documents."""
        if doc_ids is None:
            return [None, None]
        tails = self._gather([d[:, -k:] for d in doc_ids.chunk(2, 1)], grad=False)
        return [tails[c - 1] if c else torch.full_like(tails[0], -1) for c in self.local_chunks]

    def conv(self, x, weight, bias, doc_ids):
        k = weight.shape[1] - 1
        xs = x.chunk(2, 1)
        tails = self._gather([c[:, -k:] for c in xs], grad=True)
        prev_docs = self._prev_docs(doc_ids, k)
        docs = doc_ids.chunk(2, 1) if doc_ids is not None else [None, None]
        out = []
        for j, c in enumerate(self.local_chunks):
            halo = tails[c - 1] if c else torch.zeros_like(tails[0])
            d = None if docs[j] is None else torch.cat([prev_docs[j], docs[j]], 1)
            out.append(causal_conv1d(torch.cat([halo, xs[j]], 1), weight, bias, d)[:, k:])
        return torch.cat(out, 1)

    def scan(self, x, delta, A, B, C, D, doc_ids, chunk):
        prev_docs = self._prev_docs(doc_ids, 1)
        parts = [t.chunk(2, 1) for t in (x, delta, B, C)]
        docs = doc_ids.chunk(2, 1) if doc_ids is not None else [None, None]
        local = []
        for j in range(2):
            xj, dj, Bj, Cj = (p[j] for p in parts)
            reset = None
            if docs[j] is not None:
                reset = docs[j] != torch.cat([prev_docs[j], docs[j][:, :-1]], 1)
            y0, h = selective_scan(xj, dj, A, Bj, Cj, D, reset, chunk=chunk, return_state=True)
            # decay from the chunk start to each position (exponent <= 0: stable)
            P = torch.exp(torch.cumsum(dj.float().unsqueeze(-1) * A.float(), 1))
            if reset is not None:
                P = P * (torch.cumsum(reset.long(), 1) == 0).float()[..., None, None]
            local.append((y0, h, P))
        summary = self._gather([torch.stack([P[:, -1], h]) for _, h, P in local], grad=True)
        h_in = [torch.zeros_like(summary[0][1])]
        for c in range(1, 2 * self.cp):
            P_prev, h_prev = summary[c - 1]
            h_in.append(P_prev * h_in[-1] + h_prev)
        out = []
        for j, c in enumerate(self.local_chunks):
            y0, _, P = local[j]
            with fp32_region(y0):  # autocast would run this fp32 einsum in bf16
                corr = torch.einsum("btdn,btn->btd", P * h_in[c].unsqueeze(1),
                                    parts[3][j].float())
            out.append(y0 + corr.to(y0.dtype))
        return torch.cat(out, 1)
