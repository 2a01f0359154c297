"""Dense vs Mixture-of-Transformers on the embedded multimodal data, same FLOPs per step.

Trains ``model=dense_mm_tiny`` (every weight shared) and ``model=mot_tiny`` (attention
projections, FFN and norms per modality; the same FLOPs per token) with the same data,
seed and global batch, validating every ``--eval-every`` steps. Writes per-modality
validation-loss curves (PNG) and a table: for each modality, the fraction of the dense
run's steps at which MoT first reaches the dense run's final validation loss — the MoT
paper's "% of FLOPs" (ANCHORS.md: Chameleon 7B text 55.8%, image 34.8%).

    python -m scripts.compare_dense_vs_mot --setting chameleon --steps 300
    python -m scripts.compare_dense_vs_mot --setting speech       # text, image, speech
    python -m scripts.compare_dense_vs_mot --setting transfusion  # image = diffusion loss
    python -m scripts.compare_dense_vs_mot --family mamba         # dense Mamba vs MoM

Extra Hydra overrides for both runs go after ``--``. The paper's ablation: ``--untie ffn``
(or ``ffn_qkv``) unties only those parts in the MoT run; ``--reuse-dense`` takes the
dense run from an earlier call with the same ``--out`` instead of training it again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.bench_layouts import train_cli

SETTINGS = {
    "chameleon": (["data=digits_chameleon"], 160, {"text": "val_loss_text",
                                                     "image": "val_loss_image"}),
    "speech": (["data=digits_speech", "model.mot.modalities=[text,image,speech]"], 128,
               {"text": "val_loss_text", "image": "val_loss_image",
                "speech": "val_loss_speech"}),
    "transfusion": (["data=digits_transfusion", "model.diffusion.patch_dim=4"], 128,
                    {"text": "val_loss_text", "image": "val_diffusion_loss"}),
}


def _mamba_untie(value: str) -> str:
    projections = "in_proj,x_proj,dt_proj,out_proj" if value == "all" else value
    return f"model.mamba.untie=[{projections}]"


# family -> (dense model, sparse model, the sparse run's untie override)
FAMILIES = {
    "mot": ("dense_mm_tiny", "mot_tiny", lambda v: f"model.mot.untie={v}"),
    "mamba": ("mamba_tiny", "mom_tiny", _mamba_untie),
}


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, value in curve:
        if value <= target:
            return step
    return None


def step_fractions(dense: list[dict], mot: list[dict], keys: dict[str, str],
                   total_steps: int) -> dict[str, tuple[float, float, float | None]]:
    """modality -> (dense final, MoT final, fraction of dense steps for MoT to reach it)."""
    out = {}
    for name, key in keys.items():
        d = [(r["step"], r[key]) for r in dense if key in r]
        m = [(r["step"], r[key]) for r in mot if key in r]
        target = d[-1][1]
        step = first_step_reaching(m, target)
        out[name] = (target, m[-1][1], None if step is None else step / total_steps)
    return out


def plot(dense: list[dict], mot: list[dict], keys: dict[str, str], title: str,
         path: Path, label: str = "MoT") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (name, key) in zip(axes[0], keys.items()):
        for recs, name_, color in ((dense, "dense", "tab:gray"), (mot, label, "tab:blue")):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name_, color=color)
        final = [r[key] for r in dense if key in r][-1]
        ax.axhline(final, color="tab:gray", ls=":", lw=1)
        ax.set_title(f"{name} ({key})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="chameleon")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-iters", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path("runs/compare_dense_vs_mot"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="mot",
                    help="mot: dense_mm_tiny vs mot_tiny; mamba: mamba_tiny vs mom_tiny")
    ap.add_argument("--untie", default="all",
                    help="what the sparse run unties (the ablation): mot: ffn | ffn_qkv | all; "
                         "mamba: all or a comma list of in_proj,x_proj,dt_proj,out_proj")
    ap.add_argument("--reuse-dense", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = ap.parse_args()
    data, seq_len, keys = SETTINGS[args.setting]
    common = [
        *data, f"trainer.seq_len={seq_len}", f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.micro_batch_size={args.global_batch}", f"trainer.seed={args.seed}",
        f"optim.warmup_steps={max(1, args.steps // 10)}", *args.overrides,
        f"trainer.eval_every={args.eval_every}", f"trainer.eval_iters={args.eval_iters}",
    ]
    out = args.out / args.setting
    dense_name, sparse_name, untie = FAMILIES[args.family]
    dense_dir, mot_dir = out / dense_name, out / f"{sparse_name}_{args.untie.replace(',', '+')}"
    if args.reuse_dense and (dense_dir / "metrics.jsonl").is_file():
        dense = [json.loads(x) for x in (dense_dir / "metrics.jsonl").read_text().splitlines()]
    else:
        print(f"training {dense_name} ({args.setting}, {args.steps} steps) ...", flush=True)
        dense = train_cli("dense", 1, [f"model={dense_name}", *common], dense_dir, args.threads)
    print(f"training {sparse_name}, untie={args.untie} ({args.setting}, {args.steps} steps) ...",
          flush=True)
    mot = train_cli("sparse", 1, [f"model={sparse_name}", untie(args.untie), *common],
                    mot_dir, args.threads)
    fr = step_fractions(dense, mot, keys, args.steps)
    label = "MoT" if args.family == "mot" else "MoM"
    png = out / f"dense_vs_{sparse_name}_{args.setting}_{args.untie.replace(',', '+')}.png"
    plot(dense, mot, keys, f"dense vs {label} (untie {args.untie}), {args.setting} setting, "
         "same FLOPs/step", png, label)
    tok_d = sum(r["tokens_per_s"] for r in dense) / len(dense)
    tok_m = sum(r["tokens_per_s"] for r in mot) / len(mot)
    lines = [
        f"| modality | dense final val loss | {label} final val loss | {label} steps to dense final / dense steps |",
        "|---|---|---|---|",
    ]
    for name, (d, m, f) in fr.items():
        frac = "not reached" if f is None else f"{f:.1%}"
        lines.append(f"| {name} | {d:.4f} | {m:.4f} | {frac} |")
    lines.append("")
    lines.append(f"tokens/s (CPU, mean over steps): dense {tok_d:,.0f}, {label} {tok_m:,.0f} "
                 f"(ratio {tok_m / tok_d:.2f})")
    table = "\n".join(lines)
    (out / f"table_{sparse_name}_{args.untie.replace(',', '+')}.md").write_text(table + "\n")
    print(table)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
