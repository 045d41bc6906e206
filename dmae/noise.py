"""Gaussian pixel noise of the pretext tasks: the per-image noise level and the corruption itself."""

from __future__ import annotations

import torch

from dmae.settings import NoiseSettings


def sample_sigma(spec: NoiseSettings, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One noise level per image, in [0,1] pixel units: [n] float32."""
    unit = 1.0 / 255.0 if spec.per255 else 1.0
    if spec.dist == "none":
        return torch.zeros(n, device=device)
    if spec.dist == "fixed":
        return torch.full((n,), spec.sigma * unit, device=device)
    if spec.dist == "uniform":
        u = torch.rand(n, device=device, generator=generator)
        return (spec.low + (spec.high - spec.low) * u) * unit
    if spec.dist == "gamma":
        # torch's gamma sampler takes no generator; draw it on the CPU from the global RNG for reproducibility
        g = torch._standard_gamma(torch.full((n,), float(spec.shape)))
        return (g * spec.scale * unit).to(device)
    raise ValueError(f"unknown noise distribution {spec.dist!r}")


def add_noise(x: torch.Tensor, sigma: torch.Tensor | float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """x + sigma * N(0, I) in [0,1] pixel space, NOT clamped. sigma: a float or one value per image."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x + sigma * eps
