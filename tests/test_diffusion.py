"""DDPM pieces of the Transfusion setting: the cosine schedule against its closed form,
forward noising, and the sampler (exact with an oracle denoiser; runs with the model)."""

from __future__ import annotations

import math

import torch

from models import ModelConfig, build_model
from models.config import DiffusionConfig, MoTConfig
from models.diffusion import add_noise, cosine_alphas_cumprod, ddpm_sample, sample_images


def test_cosine_schedule_known_values():
    ac = cosine_alphas_cumprod(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Nichol & Dhariwal: alpha_bar(t) = f(t/T)/f(0), taken after step t (u = (t+1)/T)
    for t in (0, 10, 250, 499, 750):  # beta clipping only touches the very end
        assert math.isclose(ac[t].item(), f((t + 1) / 1000) / f(0), rel_tol=1e-9)
    assert math.isclose(ac[499].item(), 0.4936, abs_tol=5e-4)  # about half the signal
    assert ac[0].item() > 0.9999 and ac[-1].item() < 1e-4
    betas = 1 - ac[1:] / ac[:-1]
    assert (betas > 0).all() and betas.max().item() <= 0.999 + 1e-12


def test_add_noise_mixes_signal_and_noise():
    ac = cosine_alphas_cumprod(1000)
    x0, eps = torch.full((4, 3), 0.5), torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 100, 500, 999])
    xt = add_noise(x0, eps, t, ac)
    a = ac[t].float().unsqueeze(-1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert (xt[0] - x0[0]).abs().max() < 0.05 < (xt[3] - x0[3]).abs().max()  # t=0: ~clean


def test_sampler_recovers_x0_with_an_oracle_denoiser():
    """With the true ε the posterior chain must land exactly on x_0 (any error in the
    respaced posterior mean/variance would not)."""
    ac = cosine_alphas_cumprod(1000)
    x0 = torch.rand(3, 5, 4) * 1.6 - 0.8
    gen = torch.Generator().manual_seed(0)

    def oracle(x_t, t):
        a = ac[t].float()
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    for steps in (1000, 50, 7):
        out = ddpm_sample(oracle, torch.randn(3, 5, 4, generator=gen), ac, steps, gen)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_sample_images_runs_the_model_on_the_caption():
    cfg = ModelConfig(name="t", arch="mot", vocab_size=64, hidden_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=64,
                      mot=MoTConfig(modalities=["text", "image"]),
                      diffusion=DiffusionConfig(patch_dim=4))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ac = cosine_alphas_cumprod(1000)
    prefix = torch.randint(0, 40, (2, 6))
    out = sample_images(model, prefix, image_modality=1, placeholder=42, num_patches=16,
                        patch_dim=4, alphas_cumprod=ac, num_steps=10,
                        generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 16, 4) and out.abs().max() <= 1.0 + 1e-6
    other = sample_images(model, prefix.flip(1), image_modality=1, placeholder=42,
                          num_patches=16, patch_dim=4, alphas_cumprod=ac, num_steps=10,
                          generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out, other)  # the caption conditions the image
