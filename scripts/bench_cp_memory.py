"""Peak memory per rank for long sequences under context parallelism, CP1 vs CP2 vs CP4.

Two modes.

``--attn`` (issue 19): attention alone, fwd+bwd, *before* (the dense-mask attention this
repository had: one ``[T/cp, prefix]`` additive mask per CP chunk, a ``[T, T]`` boolean
mask for a single-process packed-document batch — kept below as the reference) vs *after*
(``models/attention.py``: blocked attention, no dense mask). CP ranks are gloo processes
(OMP_NUM_THREADS=1 each); every configuration runs before and after alternately
``--repeats`` times in the same processes and reports the medians and the after/before
ratios. Memory is the peak RSS increase of a rank over the fwd+bwd (``VmHWM`` reset
through ``/proc/self/clear_refs`` after the inputs exist; glibc's mmap threshold is pinned
so freed large blocks leave the RSS), i.e. everything attention allocates: masks, K/V
gather, saved activations, gradients. Time is the slowest rank's wall time. Outputs and
gradients of before and after are compared (max abs difference printed). Usage::

    python scripts/bench_cp_memory.py --attn [--seq-lens 16384 32768] [--cp 2 4]
        [--repeats 1] [--heads 2 --kv-heads 1 --head-dim 16] [--docs 8]

Without ``--attn``: runs the trainer CLI (gloo on CPU, or NCCL on GPUs) on the tiny MoE model at a long
sequence (default 8192 tokens, one sequence per rank per micro-batch) and prints the peak
memory each layout reports (CPU: the process's max RSS, which includes ~0.4 GiB of
interpreter and torch; CUDA: peak allocated), the step time and the final loss, which must
agree across layouts. Usage::

    python scripts/bench_cp_memory.py [--seq-len 8192] [--steps 3] [--cp 1 2 4]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# freed large blocks go back to the OS, so RSS follows live memory (set before any
# allocation; inherited by the spawned ranks)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.attention import causal_attention, mask_from_ids  # noqa: E402
from parallel.collectives import all_gather_autograd  # noqa: E402
from parallel.context_parallel import ContextParallelAttention, cp_index  # noqa: E402
from scripts.bench_layouts import train_cli  # noqa: E402


def run(cp: int, seq_len: int, steps: int, out: Path) -> dict:
    overrides = [
        f"trainer.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
        f"trainer.max_steps={steps}", "trainer.log_every=1", f"parallel.cp={cp}",
    ]
    last = train_cli(f"cp={cp}", cp, overrides, out)[-1]
    return {"loss": last["loss"], "mem": last["peak_mem_gib"],
            "tok_s": last.get("tokens_per_s", float("nan"))}


# -- attention alone, before vs after ---------------------------------------------------


def dense_cp_attention(q, k, v, group, doc_ids_BT=None):
    """*Before*: the former CP core — all-gather K/V, then per local chunk (head, tail) one
    SDPA against its causal prefix of the keys with a dense additive ``[chunk, prefix]``
    mask (a mask of ``(2cp+1)/(4cp) * T^2/cp`` elements per rank)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    t_local = q.shape[2]
    seq_len = t_local * cp
    q_idx = cp_index(seq_len, cp, rank)
    order = torch.argsort(torch.cat([cp_index(seq_len, cp, r) for r in range(cp)]))

    def gather(x):
        full = all_gather_autograd(x.movedim(2, 0).contiguous(), group).movedim(0, 2)
        return full.index_select(2, order)
    k_seq, v_seq = gather(k), gather(v)
    k_doc = None
    if doc_ids_BT is not None:
        k_doc = all_gather_autograd(doc_ids_BT.movedim(1, 0).contiguous(), group)
        k_doc = k_doc.movedim(0, 1).index_select(1, order)
    c = t_local // 2
    outs = []
    for lo, hi, n in [(0, c, (rank + 1) * c), (c, t_local, (2 * cp - rank) * c)]:
        allowed = mask_from_ids(q_idx[lo:hi], torch.arange(n),
                                None if doc_ids_BT is None else doc_ids_BT[:, lo:hi],
                                None if k_doc is None else k_doc[:, :n])
        bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
        outs.append(F.scaled_dot_product_attention(
            q[:, :, lo:hi], k_seq[:, :, :n], v_seq[:, :, :n], attn_mask=bias,
            enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outs, dim=2)


def dense_attention(q, k, v, doc_ids_BT):
    """*Before*, one process: the former ``causal_attention`` with ids — one SDPA over a
    dense ``[B, 1, T, T]`` boolean mask."""
    idx = torch.arange(q.shape[2])
    mask = mask_from_ids(idx, idx, doc_ids_BT, doc_ids_BT)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def doc_ids(seq_len: int, docs: int) -> torch.Tensor:
    """[1, T] ids of ``docs`` packed documents with seeded random lengths (0: none)."""
    if docs <= 1:
        return torch.zeros(1, seq_len, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(seq_len - 1, generator=g)[: docs - 1] + 1
    ids = torch.zeros(seq_len, dtype=torch.long)
    ids[cuts] = 1
    return ids.cumsum(0)[None]


def measure(fn, inputs, dy) -> tuple[float, float, list[torch.Tensor]]:
    """(seconds, peak RSS increase in GiB, [out, dq, dk, dv]) of one fwd+bwd."""
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn(q, k, v)
    out.backward(dy)
    secs = time.perf_counter() - t0
    peak = (_rss_kib("VmHWM") - base) / 2**20
    return secs, peak, [out.detach(), q.grad, k.grad, v.grad]


def _inputs(seq_len, heads, kv_heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq_len, head_dim, generator=g)
    k = torch.randn(1, kv_heads, seq_len, head_dim, generator=g)
    v = torch.randn(1, kv_heads, seq_len, head_dim, generator=g)
    dy = torch.randn(1, heads, seq_len, head_dim, generator=g)
    return q, k, v, dy


def _cp_rank(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    after = ContextParallelAttention(group)
    rows = []
    for seq_len in args.seq_lens:
        q, k, v, dy = _inputs(seq_len, args.heads, args.kv_heads, args.head_dim)
        idx = cp_index(seq_len, world, rank)
        local = [t.index_select(2, idx) for t in (q, k, v)]
        dy = dy.index_select(2, idx)
        doc = doc_ids(seq_len, args.cp_docs).index_select(1, idx) if args.cp_docs else None
        impls = {"before": lambda a, b, c, d=doc: dense_cp_attention(a, b, c, group, d),
                 "after": lambda a, b, c, d=doc: after(a, b, c, d)}
        res = {name: [] for name in impls}
        grads = {}
        for _ in range(args.repeats):
            for name, fn in impls.items():
                dist.barrier()
                secs, peak, grads[name] = measure(fn, local, dy)
                res[name].append((secs, peak))
        diff = max((a - b).abs().max().item() for a, b in zip(grads["before"], grads["after"]))
        rows.append((seq_len, res, diff))
        del q, k, v, dy, local, grads
    queue.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def run_cp(world: int, args) -> list:
    """Per sequence length: per impl, per repeat, (slowest rank's seconds, largest rank's
    peak GiB); and the largest |before - after| over outputs and gradients."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_cp_rank, args=(r, world, port, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    by_rank = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"CP{world} rank exited with {p.exitcode}")
    out = []
    for i, (seq_len, _, _) in enumerate(by_rank[0]):
        merged = {}
        for name in ("before", "after"):
            reps = zip(*(by_rank[r][i][1][name] for r in range(world)))
            merged[name] = [(max(s for s, _ in rep), max(m for _, m in rep)) for rep in reps]
        out.append((seq_len, merged, max(by_rank[r][i][2] for r in range(world))))
    return out


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_single(seq_len: int, args):
    """The single-process packed-document case (before / after alternately); None when
    the dense mask would not fit comfortably in the memory available."""
    need = seq_len * seq_len * 5 / 2**30  # bool mask + its float copy inside SDPA
    if 2 * need > _mem_available_gib():
        return None
    q, k, v, dy = _inputs(seq_len, args.heads, args.kv_heads, args.head_dim)
    doc = doc_ids(seq_len, args.docs)
    impls = {"before": lambda a, b, c: dense_attention(a, b, c, doc),
             "after": lambda a, b, c: causal_attention(a, b, c, doc)}
    res, grads = {name: [] for name in impls}, {}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            secs, peak, grads[name] = measure(fn, (q, k, v), dy)
            res[name].append((secs, peak))
    diff = max((a - b).abs().max().item() for a, b in zip(grads["before"], grads["after"]))
    return res, diff


def _row(label, seq_len, res, diff) -> str:
    med = {n: (statistics.median(s for s, _ in r), statistics.median(m for _, m in r))
           for n, r in res.items()}
    (tb, mb), (ta, ma) = med["before"], med["after"]
    return (f"| {label} | {seq_len:,} | {mb:.2f} | {ma:.2f} | {ma / mb:.3f} | {tb:.2f} | "
            f"{ta:.2f} | {ta / tb:.2f} | {diff:.1e} |")


def main_attn(args) -> None:
    print(f"attention fwd+bwd, heads {args.heads}/{args.kv_heads} (q/kv), head dim "
          f"{args.head_dim}, batch 1, fp32, OMP_NUM_THREADS=1 per rank, medians of "
          f"{args.repeats} alternating repeats; CP: causal"
          + (f" + {args.cp_docs} documents" if args.cp_docs else "")
          + f"; single process: {args.docs} packed documents")
    print("| case | tokens | peak GiB before | after | after/before | s before | after | "
          "after/before | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        r = run_single(seq_len, args)
        if r is None:
            print(f"| 1 process, documents | {seq_len:,} | skipped: the dense mask needs "
                  f"~{seq_len**2 * 5 / 2**30:.0f} GiB |")
        else:
            print(_row("1 process, documents", seq_len, *r), flush=True)
    for world in args.cp:
        for seq_len, res, diff in run_cp(world, args):
            print(_row(f"CP{world} (per rank)", seq_len, res, diff), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cp", type=int, nargs="+", default=None,
                    help="CP sizes (default: 1 2 4; --attn: 2 4)")
    ap.add_argument("--attn", action="store_true", help="attention alone, before vs after")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--docs", type=int, default=8, help="documents, single-process case")
    ap.add_argument("--cp-docs", type=int, default=0, help="documents in the CP cases")
    args = ap.parse_args()
    if args.attn:
        args.cp = args.cp or [2, 4]
        main_attn(args)
        return
    args.cp = args.cp or [1, 2, 4]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cp:
            rows.append((cp, run(cp, args.seq_len, args.steps, Path(tmp) / f"cp{cp}")))
    base = rows[0][1]["mem"]
    print(f"seq {args.seq_len}, moe_tiny, peak memory of rank 0 (CPU: max RSS)")
    print("| layout | peak memory GiB | vs CP1 | tokens/s | final loss |")
    print("|---|---|---|---|---|")
    for cp, r in rows:
        print(f"| CP{cp} | {r['mem']:.2f} | {r['mem'] / base:.2f} | {r['tok_s']:,.0f} | "
              f"{r['loss']:.4f} |")


if __name__ == "__main__":
    main()
