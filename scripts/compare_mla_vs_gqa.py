"""Multi-head latent attention vs GQA on the embedded pydoc data (one process each).

Trains ``model=moe_tiny`` (GQA: 4 query / 2 KV heads of 16) and ``model=mla_tiny`` (the same
MoE model with MLA, models/mla.py) with the same data, seed and global batch, validating
every ``--eval-every`` steps, and writes the loss curves (PNG) and a table with each
model's parameters, training FLOPs per token (models/flops.py), final training and
validation losses and median tokens/s. The two runs alternate ``--repeats`` times (the
machine is shared: the speed ratio is the median over the pairs; losses are from the
first pair, the runs being deterministic on CPU).

    python -m scripts.compare_mla_vs_gqa --steps 300 --out runs/mla_vs_gqa \\
        --plot docs/img/mla_vs_gqa.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from models.config import ModelConfig
from models.flops import param_counts, training_flops_per_token
from scripts.bench_layouts import REPO, train_cli

MODELS = {"GQA (moe_tiny)": "moe_tiny", "MLA (mla_tiny)": "mla_tiny"}


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (name, recs), color in zip(runs.items(), ("tab:blue", "tab:red")):
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        axes[0].plot(*zip(*train), label=name, color=color, lw=0.8)
        axes[1].plot(*zip(*val), label=name, color=color, marker="o", ms=3)
    for ax, label in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/mla_vs_gqa"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="Hydra overrides for both runs")
    args = p.parse_args()
    common = [f"trainer.max_steps={args.steps}", f"trainer.seq_len={args.seq_len}",
              *args.extra]
    runs: dict[str, list[dict]] = {}
    speed: dict[str, list[float]] = {name: [] for name in MODELS}
    for rep in range(args.repeats):
        for name, model in MODELS.items():
            recs = train_cli(name, 1, [f"model={model}", *common,
                                       f"trainer.eval_every={args.eval_every}"],
                             args.out / f"{model}_{rep}")
            runs.setdefault(name, recs)
            tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 5]
            speed[name].append(statistics.median(tps))
    rows = []
    for name, model in MODELS.items():
        mc = OmegaConf.to_object(OmegaConf.merge(
            OmegaConf.structured(ModelConfig),
            OmegaConf.load(REPO / "configs" / "model" / f"{model}.yaml")))
        total, active = param_counts(mc)
        recs = runs[name]
        val = [r["val_loss"] for r in recs if "val_loss" in r]
        train = [r["loss"] for r in recs if "loss" in r]
        rows.append({"model": name, "params": total, "active": active,
                     "flops_per_token": training_flops_per_token(mc, args.seq_len),
                     "final_train_loss_mean_last10": statistics.mean(train[-10:]),
                     "final_val_loss": val[-1] if val else None,
                     "tokens_per_s_median": statistics.median(speed[name])})
    base = rows[0]["tokens_per_s_median"]
    print("| model | params | active | train FLOPs/token | train loss (last 10 steps) | "
          "val loss | tokens/s (ratio to GQA) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['active']:,} | "
              f"{r['flops_per_token'] / 1e6:.2f}M | {r['final_train_loss_mean_last10']:.4f} | "
              f"{r['final_val_loss']:.4f} | {r['tokens_per_s_median']:.0f} "
              f"({r['tokens_per_s_median'] / base:.2f}x) |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(runs, args.plot, f"moe_tiny (GQA) vs mla_tiny (MLA), pydoc data, "
                              f"{args.steps} steps, seq_len {args.seq_len}, 1 CPU process")


if __name__ == "__main__":
    main()
