"""DDPM pieces for the Transfusion setting (Zhou et al., 2024; Ho et al., 2020): the cosine
noise schedule (Nichol & Dhariwal, 2021), forward noising, the ε-prediction loss, the
timestep embedding, and an ancestral sampler over a strided subset of the T steps.

Conventions: ``t`` runs 0..T-1; ``alphas_cumprod[t]`` is ᾱ after step ``t`` (so
``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``; t = 0 is the least noisy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Initializer


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008,
                          max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t (fp64, [T]) of the cosine schedule: ᾱ(u) = f(u)/f(0), f(u) = cos²((u/T + s) /
    (1 + s) · π/2), taken at u = t + 1, with each β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at
    ``max_beta`` (the schedule's end would otherwise reach β = 1)."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε; ``t`` broadcasts against x0's leading dims."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype)
    while a.dim() < x0.dim():
        a = a.unsqueeze(-1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [*t.shape, dim] (fp32) of integer timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class PatchIO(nn.Module):
    """Transfusion's image ends: ``embed(x_t, t)`` = linear patch projection + an MLP of
    the timestep embedding (added, as DiT/Transfusion do); ``predict(h)`` = linear map of
    the final hidden state back to a patch (the predicted ε)."""

    def __init__(self, patch_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.patch_in = nn.Linear(patch_dim, dim, bias=False)
        self.time_in = nn.Linear(dim, dim)
        self.time_out = nn.Linear(dim, dim)
        self.patch_out = nn.Linear(dim, patch_dim, bias=False)

    def embed(self, patches: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.dim).to(patches.dtype)
        return self.patch_in(patches) + self.time_out(F.silu(self.time_in(temb)))

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.patch_out(h)

    def init_params(self, init: Initializer, prefix: str) -> None:
        for name in ("patch_in", "time_in", "time_out", "patch_out"):
            lin = getattr(self, name)
            std = init.out_std if name in ("time_out", "patch_out") else init.std
            init.normal_(lin.weight, f"{prefix}.{name}.weight", std)
            if lin.bias is not None:
                init.constant_(lin.bias, 0.0)


@torch.no_grad()
def ddpm_sample(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: Optional[int] = None,
                generator: Optional[torch.Generator] = None, clip: float = 1.0) -> torch.Tensor:
    """Ancestral DDPM sampling from ``x_T`` over ``num_steps`` evenly strided timesteps
    (all T by default). ``eps_fn(x_t, t)`` predicts ε (``t`` a 0-d long tensor). Each step
    predicts x_0, clamps it to ±``clip``, and draws from the posterior q(x_prev | x_t, x_0)
    of the strided chain (Nichol & Dhariwal's respacing)."""
    T = alphas_cumprod.shape[0]
    steps = torch.linspace(T - 1, 0, num_steps or T).round().long().unique_consecutive()
    ac = alphas_cumprod.to(torch.float64)
    x = x_T
    for i, t in enumerate(steps.tolist()):
        a_t = ac[t]
        a_prev = ac[steps[i + 1]] if i + 1 < len(steps) else torch.ones((), dtype=ac.dtype)
        eps = eps_fn(x, torch.tensor(t, device=x.device)).to(torch.float64)
        xf = x.to(torch.float64)
        x0 = ((xf - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-clip, clip)
        beta = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * xf) / (1 - a_t)
        var = beta * (1 - a_prev) / (1 - a_t)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        x = (mean + var.sqrt() * noise).to(x_T.dtype)
    return x


@torch.no_grad()
def sample_images(model: nn.Module, prefix_BT: torch.Tensor, *, image_modality: int,
                  placeholder: int, num_patches: int, patch_dim: int,
                  alphas_cumprod: torch.Tensor, num_steps: int = 50,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Transfusion generation of one image per row of ``prefix_BT`` (e.g. caption + BOI):
    the prefix is followed by ``num_patches`` image positions (``placeholder`` tokens,
    attended bidirectionally as one block) whose patches start as noise and are denoised
    by the model's ε prediction. Returns x_0 patches [B, num_patches, patch_dim]."""
    B, L = prefix_BT.shape
    dev = prefix_BT.device
    fill = torch.full((B, num_patches), placeholder, dtype=torch.long, device=dev)
    tokens = torch.cat([prefix_BT, fill], 1)
    modality = torch.zeros_like(tokens)
    modality[:, L:] = image_modality
    blocks = torch.zeros_like(tokens)
    blocks[:, L:] = 1
    positions = torch.arange(tokens.shape[1], device=dev).expand(B, -1)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        patches = torch.zeros(B, tokens.shape[1], patch_dim, device=dev, dtype=x_t.dtype)
        patches[:, L:] = x_t
        steps = torch.full_like(tokens, -1)
        steps[:, L:] = t
        _, eps = model(tokens, positions, None, blocks, modality, patches, steps)
        return eps[:, L:]

    x_T = torch.randn(B, num_patches, patch_dim, generator=generator).to(dev)
    return ddpm_sample(eps_fn, x_T, alphas_cumprod, num_steps, generator)
