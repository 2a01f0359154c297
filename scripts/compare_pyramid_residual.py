"""Uniform vs pyramid vs residual MoE (DeepSpeed-MoE, arXiv 2201.05596) on the embedded data.

One process each, ``model=moe_tiny`` without its shared expert, the same data, seed,
global batch and steps; validation every ``--eval-every`` steps. Variants:

- ``top1``: 8 experts in every layer, top-1 (the baseline the paper's PR-MoE starts from);
- ``top2``: 8 experts, top-2 (twice the routed FLOPs of top-1);
- ``pyramid``: [4, 4, 12, 12] experts, top-1 — the same 32 experts (same total expert
  parameters) as ``top1``, moved to the later layers;
- ``residual``: 8 experts, top-1, plus a dense FFN of the expert's width mixed per token
  (the active FLOPs of ``top2``);
- ``pr_moe``: pyramid + residual (the paper's PR-MoE).

Writes ``<out>/pyramid_residual_{steps,flops}.png`` (validation loss against steps and
against cumulative training FLOPs from ``models.flops``) and a Markdown table with each
variant's parameters, FLOPs per token, final validation loss and median tokens/s, and
optionally copies the plots to ``--img`` (docs/img).

    python -m scripts.compare_pyramid_residual --steps 100 --img docs/img
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from models.flops import param_counts, training_flops_per_token
from scripts.bench_layouts import train_cli
from trainer.config import register_configs

BASE = ["model=moe_tiny", "model.moe.num_shared_experts=0", "model.moe.expert_bias=false"]
VARIANTS = {
    "top1": ["model.moe.num_experts=8", "model.moe.top_k=1"],
    "top2": ["model.moe.num_experts=8", "model.moe.top_k=2"],
    "pyramid": ["model.moe.num_experts=[4,4,12,12]", "model.moe.top_k=1"],
    "residual": ["model.moe.num_experts=8", "model.moe.top_k=1", "model.moe.residual=true"],
    "pr_moe": ["model.moe.num_experts=[4,4,12,12]", "model.moe.top_k=1",
               "model.moe.residual=true"],
}
COLORS = {"top1": "tab:gray", "top2": "tab:orange", "pyramid": "tab:blue",
          "residual": "tab:green", "pr_moe": "tab:purple"}


def model_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    conf = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides).model)


def plot(results: dict, path_steps: Path, path_flops: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path, x_of, xlabel in ((path_steps, lambda r, s: s, "step"),
                               (path_flops, lambda r, s: s * r["flops_per_step"],
                                "training FLOPs (models.flops, cumulative)")):
        fig, ax = plt.subplots(figsize=(6.2, 3.8))
        for name, r in results.items():
            pts = [(x_of(r, s), v) for s, v in r["val"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name,
                    color=COLORS.get(name))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-iters", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/compare_pyramid_residual"))
    ap.add_argument("--img", type=Path, default=None, help="also copy the plots here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true",
                    help="take a variant's metrics from an earlier call with the same --out")
    args = ap.parse_args()
    common = [
        *BASE, f"trainer.seq_len={args.seq_len}", f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.micro_batch_size={args.global_batch}", f"trainer.seed={args.seed}",
        f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        f"trainer.eval_every={args.eval_every}", f"trainer.eval_iters={args.eval_iters}",
    ]
    tokens_per_step = args.seq_len * args.global_batch
    results = {}
    for name in args.variants:
        overrides = [*common, *VARIANTS[name]]
        run_dir = args.out / name
        if args.reuse and (run_dir / "metrics.jsonl").is_file():
            recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        else:
            print(f"training {name} ({args.steps} steps) ...", flush=True)
            recs = train_cli(name, 1, overrides, run_dir, args.threads)
        cfg = model_config(overrides)
        total, active = param_counts(cfg)
        flops_tok = training_flops_per_token(cfg, args.seq_len)
        results[name] = {
            "params": total, "active": active, "flops_per_token": flops_tok,
            "flops_per_step": flops_tok * tokens_per_step,
            "val": [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r],
            "train_loss_last10": statistics.mean(r["lm_loss"] for r in recs[-10:]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs[1:]),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    png_s = args.out / "pyramid_residual_steps.png"
    png_f = args.out / "pyramid_residual_flops.png"
    plot(results, png_s, png_f, f"moe_tiny variants, {args.steps} steps x {tokens_per_step} "
         f"tokens, seed {args.seed} (one run each)")
    ref = results.get("top1")
    lines = ["| variant | params | active params | MFLOP/token | final val loss | "
             "train lm_loss (last 10 steps) | tokens/s (median) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        tps = f"{r['tokens_per_s']:,.0f}"
        if ref is not None and name != "top1":
            tps += f" ({r['tokens_per_s'] / ref['tokens_per_s']:.2f}x top1)"
        lines.append(f"| {name} | {r['params'] / 1e6:.3f}M | {r['active'] / 1e6:.3f}M | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['val'][-1][1]:.4f} | "
                     f"{r['train_loss_last10']:.4f} | {tps} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    if args.img is not None:
        args.img.mkdir(parents=True, exist_ok=True)
        for p in (png_s, png_f):
            shutil.copy(p, args.img / p.name)
    print(f"plots: {png_s}, {png_f}")


if __name__ == "__main__":
    main()
