"""Mixup / CutMix on soft targets, applied identically to every noisy copy of an image.

Consistency regularization compares the m noisy copies of one image, so the copies must be mixed with the same
partner, weight and box. Inputs are [m, B, C, H, W]; targets [B, K].
"""

from __future__ import annotations

import numpy as np
import torch


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y.unsqueeze(1),
                                                                               1.0 - smoothing + off)


def mix(x: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float,
        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch in reverse order (as timm), by mixup or cutmix (chosen 50/50 when both)."""
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    partner = x.flip(1)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * partner
    return x, lam * targets + (1.0 - lam) * targets.flip(0)
