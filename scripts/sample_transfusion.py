"""Generate digits from captions with a Transfusion-trained MoT checkpoint (evaluation).

For each digit 0..9 the caption "a handwritten digit <word>" followed by BOI conditions
``--per-digit`` images, denoised by the model's ε prediction over ``--steps`` strided
DDPM steps (models/diffusion.py ``sample_images``). Writes a PNG grid (rows = captions)
and prints a caption-agreement score: how often the nearest class mean of the real
training digits (pixel space) is the captioned digit (10% = chance).

    python -m scripts.sample_transfusion runs/<run>/checkpoints/step_0000300 --out grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from models import build_model
from models.config import ModelConfig
from models.diffusion import cosine_alphas_cumprod, sample_images
from trainer.checkpoint import SafeLoadPlanner, quiet_dcp, read_meta
from trainer.data.multimodal import NUMBER_WORDS, PATCH, DigitDocuments


def load_model(ckpt: Path) -> tuple[torch.nn.Module, ModelConfig]:
    """The model of a checkpoint: its tensors read by DCP straight into the model's own
    state dict (no torch.load of a converted file, nothing unpickled but DCP's .metadata)."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(ckpt)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))
    model = build_model(cfg)
    state = {"model": model.state_dict()}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True, planner=SafeLoadPlanner())
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def patches_to_images(x: torch.Tensor) -> np.ndarray:
    """[N, 16, 4] patches in [-1, 1] -> [N, 8, 8] in [0, 16]."""
    n, g = x.shape[0], 8 // PATCH
    img = x.reshape(n, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, 8, 8)
    return ((img.clamp(-1, 1) + 1) * 8).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--per-digit", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("transfusion_samples.png"))
    args = ap.parse_args()
    model, cfg = load_model(args.checkpoint)
    docs = DigitDocuments("transfusion", list(cfg.mot.modalities), 0,
                          cfg.diffusion.num_timesteps, 1.0)
    v = docs.vocab
    prompts = []
    for d in range(10):
        words = f"a handwritten digit {NUMBER_WORDS[d]}".split()
        prompts += [[v.ids[w] for w in words] + [v.ids["<boi>"]]] * args.per_digit
    gen = torch.Generator().manual_seed(args.seed)
    x0 = sample_images(model, torch.tensor(prompts), image_modality=1, placeholder=v.image_start,
                       num_patches=(8 // PATCH) ** 2, patch_dim=PATCH * PATCH,
                       alphas_cumprod=cosine_alphas_cumprod(cfg.diffusion.num_timesteps),
                       num_steps=args.steps, generator=gen)
    images = patches_to_images(x0)
    means = np.stack([docs.images[docs.labels == d].mean(0) for d in range(10)])
    dist = ((images[:, None] - means[None]) ** 2).sum((2, 3))
    target = np.repeat(np.arange(10), args.per_digit)
    agree = float((dist.argmin(1) == target).mean())
    print(f"caption agreement (nearest real class mean): {agree:.1%} (chance 10%)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(10, args.per_digit, figsize=(args.per_digit * 0.6, 6.4))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=16)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % args.per_digit == 0:
            ax.set_ylabel(NUMBER_WORDS[i // args.per_digit], fontsize=7)
    fig.suptitle(f"caption -> image, agreement {agree:.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"samples: {args.out}")


if __name__ == "__main__":
    main()
