"""Gaussian pixel noise of the pretext tasks: the per-image noise level and the corruption itself."""

from __future__ import annotations

import numpy as np
import torch

from dmae.settings import NoiseSettings


def sample_sigma(spec: NoiseSettings, n: int, rng: np.random.Generator) -> torch.Tensor:
    """One noise level per image, in [0,1] pixel units: [n] float32 on the CPU."""
    unit = 1.0 / 255.0 if spec.per255 else 1.0
    if spec.dist == "none":
        sigma = np.zeros(n)
    elif spec.dist == "fixed":
        sigma = np.full(n, spec.sigma * unit)
    elif spec.dist == "uniform":
        sigma = rng.uniform(spec.low, spec.high, size=n) * unit
    elif spec.dist == "gamma":
        sigma = rng.gamma(spec.shape, spec.scale, size=n) * unit
    else:
        raise ValueError(f"unknown noise distribution {spec.dist!r}")
    return torch.from_numpy(sigma).float()


def keyed_normal(keys: list[int], shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Standard normal noise [len(keys), *shape], sample i drawn from a generator seeded with keys[i].

    Keying each sample's noise by its own seed makes it independent of batch composition and process count.
    """
    out = torch.empty((len(keys), *shape), device=device)
    gen = torch.Generator(device=device)
    for i, key in enumerate(keys):
        gen.manual_seed(key)
        out[i].normal_(generator=gen)
    return out


def add_noise(x: torch.Tensor, sigma: torch.Tensor | float, generator: torch.Generator | None = None,
              eps: torch.Tensor | None = None) -> torch.Tensor:
    """x + sigma * eps in [0,1] pixel space, NOT clamped; eps ~ N(0, I) drawn here unless given.

    sigma: a float or one value per image (leading dimension).
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x.ndim - 1)))
    if eps is None:
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x + sigma * eps


def keyed_uniform(keys: list[int]) -> torch.Tensor:
    """One U[0,1) draw per key, from a generator seeded with it: [len(keys)] on the CPU."""
    return torch.tensor([np.random.default_rng(k).random() for k in keys], dtype=torch.float32)
