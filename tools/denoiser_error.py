"""How well a pretrained autoencoder undoes Gaussian noise: the evidence for which denoiser a denoised-smoothing
chain uses (`dmae bench-denoisers` prints it for every pipeline denoiser and certification sigma)."""

from __future__ import annotations

import torch


@torch.no_grad()
def denoising_mse(model, images: torch.Tensor, sigma: float, norm_pix_loss: bool = True, groups: int = 1) -> float:
    """Mean squared error per pixel ([0,1] units) between clean `images` and their one-step reconstruction from
    images + N(0, sigma^2) (seeded noise, one draw per image); `model` None: the noisy input itself, clamped."""
    noisy = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    out = noisy.clamp(0, 1) if model is None else model.reconstruct(noisy, norm_pix_loss, sigma, groups)
    return float(((out - images) ** 2).mean())
