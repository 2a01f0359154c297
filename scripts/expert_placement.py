"""Expert placement from a routing trace: write a placement file, or print the cross-node
traffic table (contiguous vs optimised placements) for EP sizes over node counts.

A trace is what ``logger.routing_trace_every=N`` records into ``<run_dir>/routing/``.
The tokens are split in time order: the first ``--fit`` fraction chooses the placement,
the rest measures it (held-out tokens, so the table is not scored on what was fitted).

    python -m scripts.expert_placement table runs/x/routing --experts 64
    python -m scripts.expert_placement place runs/x/routing --experts 64 --ep 16 \
        --nodes 2 --out placement.json   # then parallel.expert_placement=placement.json
"""

from __future__ import annotations

import argparse
import time

import torch

from parallel.expert_placement import (
    Placement,
    cross_node_rows,
    load_trace,
    optimise_placement,
    rank_load_imbalance,
)

LAYOUTS = [(8, 2), (8, 4), (16, 2), (16, 4), (16, 8), (64, 2), (64, 4), (64, 8)]


def _split(trace: dict[str, torch.Tensor], fit: float):
    n = min(v.shape[0] for v in trace.values())
    cut = int(n * fit)
    return ({k: v[:cut] for k, v in trace.items()}, {k: v[cut:n] for k, v in trace.items()})


def table(trace, experts: int, fit: float, hidden: int, layouts) -> str:
    train, test = _split(trace, fit)
    k = next(iter(trace.values())).shape[1]
    row_kb = 2 * hidden * 2 / 1024  # dispatch + combine, bf16
    lines = [
        f"trace: {len(trace)} MoE layers, {experts} experts, top-{k}; placement fitted on "
        f"{next(iter(train.values())).shape[0]} tokens, measured on "
        f"{next(iter(test.values())).shape[0]} later tokens",
        "",
        "| EP | nodes | placement | rows to remote ranks / token / layer | remote nodes / "
        "token / layer | KB across nodes / token / layer (D=" + str(hidden) + ", bf16) | "
        "ExFlow-style (token stays with its top-1 expert): rows to remote ranks | busiest rank "
        "load / mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ep, nodes in layouts:
        if experts % ep:
            continue
        t0 = time.perf_counter()
        plans = {
            "contiguous": Placement(),
            "co-selection": optimise_placement(train, experts, ep, nodes),
            "co-selection + affinity": optimise_placement(train, experts, ep, nodes,
                                                          affinity_weight=1.0),
        }
        secs = time.perf_counter() - t0
        base = None
        for name, plan in plans.items():
            home = cross_node_rows(test, plan, experts, ep, nodes)
            follow = cross_node_rows(test, plan, experts, ep, nodes, follow=True)
            rel = "" if base is None else f" ({home['rank_rows'] / base - 1:+.0%})"
            base = base or home["rank_rows"]
            lines.append(
                f"| {ep} | {nodes} | {name} | {home['rank_rows']:.3f}{rel} | "
                f"{home['node_rows']:.3f} | {home['rank_rows'] * row_kb:.1f} | "
                f"{follow['rank_rows']:.3f} | "
                f"{rank_load_imbalance(test, plan, experts, ep):.2f} |")
        lines.append(f"<!-- ep={ep} nodes={nodes}: both placements optimised in {secs:.1f} s -->")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["table", "place"])
    ap.add_argument("trace", help="a run's routing/ directory (rank*.pt)")
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--fit", type=float, default=0.67, help="fraction of tokens to fit on")
    ap.add_argument("--hidden", type=int, default=7168, help="model dim for the KB column")
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--affinity", type=float, default=0.0)
    ap.add_argument("--out", default="placement.json")
    a = ap.parse_args(argv)
    trace, _ = load_trace(a.trace)
    if not trace:
        raise SystemExit(f"{a.trace} holds no routing trace (rank*.pt)")
    if a.command == "table":
        print(table(trace, a.experts, a.fit, a.hidden, LAYOUTS))
        return
    plan = optimise_placement(trace, a.experts, a.ep, a.nodes, affinity_weight=a.affinity)
    plan.info["source"] = a.trace
    plan.save(a.out)
    print(f"wrote {a.out}: {len(plan.layers)} layers, ep={a.ep} over {a.nodes} nodes")


if __name__ == "__main__":
    main()
