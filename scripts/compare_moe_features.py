"""Baseline vs AdaMoE null experts vs global-batch load balancing on the embedded data.

Trains ``model=moe_tiny`` (8 experts, top-2, one shared expert) one process at a time,
same data order and global batch, for each variant and seed:

- ``baseline``: top-2 over 8 experts, switch loss over each micro-batch;
- ``null``: 8 null experts added and top-4 over the 16 (AdaMoE's recipe: more null than
  real slots, k raised so that a balanced router still uses 2 real experts per token on
  average; a token may use 0..4);
- ``global_lb``: ``aux_loss_scope=global_batch`` (f from the previous step's global batch).

Writes ``<out>/moe_features.png`` (LM loss vs step and vs training FLOPs, real experts
per token, expert-load max/mean) and ``<out>/table.md``. FLOPs per step use each step's
measured ``real_experts_per_token`` (models/flops.py: null experts cost nothing).

    python -m scripts.compare_moe_features --steps 200 --seeds 1 2 --out docs/img
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from models.config import ModelConfig, MoEConfig
from models.flops import training_flops_per_token
from scripts.bench_layouts import train_cli

VARIANTS = {
    "baseline": [],
    "null": ["model.moe.num_null_experts=8", "model.moe.top_k=4"],
    "global_lb": ["model.moe.aux_loss_scope=global_batch"],
}
COLORS = {"baseline": "tab:gray", "null": "tab:blue", "global_lb": "tab:orange"}


def moe_tiny(extra: list[str]) -> ModelConfig:
    """moe_tiny's shape with the variant's MoE overrides (for the FLOPs count)."""
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=64, num_shared_experts=1,
                    shared_expert_ffn_hidden_size=64)
    for o in extra:
        key, value = o.removeprefix("model.moe.").split("=")
        setattr(moe, key, int(value) if value.isdigit() else value)
    return ModelConfig(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4,
                       num_kv_heads=2, ffn_hidden_size=128, moe=moe)


def with_flops(recs: list[dict], cfg: ModelConfig, seq_len: int) -> list[dict]:
    total = 0.0
    for r in recs:
        total += r["tokens"] * training_flops_per_token(cfg, seq_len, r["real_experts_per_token"])
        r["flops"] = total
    return recs


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def plot(runs: dict[str, list[list[dict]]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, seeds in runs.items():
        for i, recs in enumerate(seeds):
            kw = dict(color=COLORS[name], alpha=0.9 if i == 0 else 0.5,
                      label=name if i == 0 else None, lw=1.2)
            steps = [r["step"] for r in recs]
            loss = smooth([r["lm_loss"] for r in recs], window)
            axes[0].plot(steps, loss, **kw)
            axes[1].plot([r["flops"] / 1e12 for r in recs], loss, **kw)
            axes[2].plot(steps, smooth([r["real_experts_per_token"] for r in recs], window), **kw)
            axes[3].plot(steps, smooth([r["expert_load_mean_max"] for r in recs], window), **kw)
    titles = [f"LM loss (mean of {window} steps)", "LM loss vs training TFLOPs",
              "real experts per token (mean over layers)", "expert load max/mean (mean over layers)"]
    xlabels = ["step", "TFLOPs (real experts only)", "step", "step"]
    for ax, t, x in zip(axes, titles, xlabels):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].legend()
    for ax in axes[:2]:
        lo = min(min(smooth([r["lm_loss"] for r in s], window)) for v in runs.values() for s in v)
        ax.set_ylim(lo - 0.1, lo + 1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(runs: dict[str, list[list[dict]]], last: int) -> str:
    rows = ["| variant | seeds | LM loss, mean of last "
            f"{last} steps (per seed) | real experts / token | expert load max/mean | "
            "TFLOPs | aux (balance) loss |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, seeds in runs.items():
        tail = [statistics.fmean(r["lm_loss"] for r in s[-last:]) for s in seeds]
        per = ", ".join(f"{v:.3f}" for v in tail)
        real = statistics.fmean(statistics.fmean(r["real_experts_per_token"] for r in s[-last:])
                                for s in seeds)
        load = statistics.fmean(statistics.fmean(r["expert_load_mean_max"] for r in s[-last:])
                                for s in seeds)
        flops = statistics.fmean(s[-1]["flops"] for s in seeds) / 1e12
        lb = statistics.fmean(statistics.fmean(r["load_balance_loss"] for r in s[-last:])
                              for s in seeds)
        rows.append(f"| {name} | {len(seeds)} | {statistics.fmean(tail):.3f} ({per}) | "
                    f"{real:.2f} | {load:.2f} | {flops:.3f} | {lb:.4f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_moe_features"))
    ap.add_argument("--reuse", action="store_true", help="read runs already in --work")
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args()
    runs: dict[str, list[list[dict]]] = {}
    for name in args.variants:
        runs[name] = []
        for seed in args.seeds:
            run_dir = args.work / f"{name}_seed{seed}"
            overrides = ["model=moe_tiny", f"trainer.max_steps={args.steps}",
                         f"trainer.seed={seed}", f"trainer.seq_len={args.seq_len}",
                         f"trainer.global_batch_size={args.global_batch}",
                         f"trainer.micro_batch_size={args.micro_batch}",
                         "optim.lr=3e-3", "optim.warmup_steps=20", *VARIANTS[name]]
            if args.reuse and (run_dir / "metrics.jsonl").exists():
                recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            else:
                print(f"training {name} seed {seed}", flush=True)
                recs = train_cli(name, 1, overrides, run_dir)
            runs[name].append(with_flops(recs, moe_tiny(VARIANTS[name]), args.seq_len))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "moe_features.png", args.window)
    text = table(runs, args.window)
    (args.out / "moe_features_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
