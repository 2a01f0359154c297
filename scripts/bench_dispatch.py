"""Bytes an expert-parallel all-to-all moves per token per MoE layer: dedup vs plain.

Part 1 (analytic, from the routing alone): 64 experts, top-8, EP 8, for routings drawn from
random logits (uniform), with a per-expert popularity skew, and node-limited (DeepSeek-V3
style: a token's experts lie in at most 4 of the 8 EP ranks). A row is one token vector
(hidden size D); "plain" sends one row per assignment whose expert lives on another rank,
"dedup" one row per (token, other rank) pair. Both directions (dispatch + combine) count.

Part 2 (measured): the same count for a small case on real gloo processes must equal
``AllToAllDispatcher.bytes_sent`` / ``bytes_received`` on every rank.

    python scripts/bench_dispatch.py [--tokens 8192] [--hidden 4096] [--world 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def route(T: int, E: int, k: int, case: str, gen: torch.Generator, ep: int) -> torch.Tensor:
    """Top-k expert ids [T, k] of softmax(logits) (= top-k of the logits)."""
    logits = torch.randn(T, E, generator=gen)
    if case == "skewed":  # fixed per-expert popularity: hot and cold experts
        logits = logits + 1.5 * torch.randn(E, generator=torch.Generator().manual_seed(0))
    if case == "node-limited":  # best 4 ranks by the sum of their 2 best logits
        per_rank = logits.view(T, ep, E // ep).topk(k // 4, -1).values.sum(-1)
        ranks = per_rank.topk(4, -1).indices
        allowed = torch.zeros(T, ep, dtype=torch.bool).scatter_(1, ranks, True)
        logits = logits.masked_fill(~allowed.repeat_interleave(E // ep, 1), float("-inf"))
    return logits.topk(k, -1).indices


def unit_matrix(idx_TK: torch.Tensor, src_T: torch.Tensor, ep: int, n_local: int, dedup: bool):
    """[P, P]: rows source rank s sends to rank d (dropless)."""
    dest = idx_TK // n_local
    per = torch.zeros(idx_TK.shape[0], ep, dtype=torch.long)
    per.scatter_add_(1, dest, torch.ones_like(dest))
    if dedup:
        per = (per > 0).long()
    return torch.zeros(ep, ep, dtype=torch.long).index_add_(0, src_T, per)


def off_rank_rows(m: torch.Tensor) -> torch.Tensor:
    """Per rank: rows it sends in dispatch plus rows it sends back in combine (off-rank)."""
    off = m - torch.diag(torch.diag(m))
    return off.sum(1) + off.sum(0)


def analytic(T: int, D: int, E: int = 64, k: int = 8, ep: int = 8) -> None:
    n_local, row = E // ep, D * 2  # bf16 rows
    S = min(k, n_local)
    print(f"analytic: E={E} top-{k} EP={ep}, {T} tokens per rank, D={D} bf16 ({row} B/row)")
    print(
        f"{'routing':<14}{'plain rows/tok':>15}{'dedup rows/tok':>15}{'plain KiB/tok':>14}"
        f"{'dedup KiB/tok':>14}{'ratio':>7}{'ratio+meta':>11}"
    )
    gen = torch.Generator().manual_seed(1)
    for case in ("uniform", "skewed", "node-limited"):
        idx = route(T * ep, E, k, case, gen, ep)
        src = torch.arange(T * ep) % ep
        res = {}
        for dedup in (False, True):
            rows = off_rank_rows(unit_matrix(idx, src, ep, n_local, dedup)).sum().item()
            res[dedup] = rows / (T * ep)  # per token, both directions
        # metadata per unit (one direction): plain 1 fp32 id, dedup S ids + S fp32 weights
        meta = {False: 4 * res[False] / 2, True: 8 * S * res[True] / 2}
        plain_b, dedup_b = res[False] * row, res[True] * row
        ratio_meta = (dedup_b + meta[True]) / (plain_b + meta[False])
        print(
            f"{case:<14}{res[False]:>15.3f}{res[True]:>15.3f}{plain_b / 1024:>14.2f}"
            f"{dedup_b / 1024:>14.2f}{dedup_b / plain_b:>7.3f}{ratio_meta:>11.3f}"
        )


def _measure(rank: int, world: int, T: int, E: int, k: int, D: int, case: str):
    from models.router import Routing
    from parallel.dispatch import AllToAllDispatcher

    gen = torch.Generator().manual_seed(1000 + rank)
    idx = route(T, E, k, case, gen, world)
    w = torch.rand(T, k, generator=gen)
    x = torch.randn(T, D, generator=gen)
    out = {"idx": idx}
    for dedup in (False, True):
        disp = AllToAllDispatcher(None, E, dedup=dedup)  # None: the world group
        x_ND, tpe, ctx = disp.dispatch(x, Routing(idx, w, E))
        disp.combine(x_ND, ctx)
        out[dedup] = (disp.bytes_sent, disp.bytes_received, disp.meta_bytes_sent)
    return out


def measured(world: int) -> bool:
    from tests.distributed_utils import spawn

    T, E, k, D = 64, 4 * world, 4, 32
    ok = True
    print(f"\nmeasured on {world} gloo ranks: E={E} top-{k}, {T} tokens per rank, D={D} fp32")
    print(f"{'routing':<10}{'mode':<7}{'rank':>5}{'bytes_sent':>12}{'analytic':>10}{'meta':>7}")
    for case in ("uniform", "skewed"):
        results = spawn(_measure, world, T, E, k, D, case, timeout_s=60)
        idx = torch.cat([r["idx"] for r in results])
        src = torch.arange(world).repeat_interleave(T)
        for dedup in (False, True):
            want = off_rank_rows(unit_matrix(idx, src, world, E // world, dedup)) * D * 4
            for rank, r in enumerate(results):
                sent, received, meta = r[dedup]
                good = sent == received == int(want[rank])
                ok &= good
                mode = "dedup" if dedup else "plain"
                flag = "" if good else "  MISMATCH"
                print(f"{case:<10}{mode:<7}{rank:>5}{sent:>12}{int(want[rank]):>10}{meta:>7}{flag}")
    print("measured bytes == analytic count:", "OK" if ok else "FAILED")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--world", type=int, default=4, help="gloo ranks for the measurement")
    args = ap.parse_args()
    analytic(args.tokens, args.hidden)
    if not measured(args.world):
        sys.exit(1)


if __name__ == "__main__":
    main()
