"""Training losses of the smoothed classifier's base model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def consistency_loss(logits: torch.Tensor, targets: torch.Tensor, lam: float, eta: float) -> dict[str, torch.Tensor]:
    """Jeong & Shin (2020) on m noisy copies. logits [m, B, K], targets [B, K] (soft).

    loss = mean_i CE(p_i, t) + lam * mean_i KL(avg || p_i) + eta * H(avg), with avg = mean_i p_i;
    every term averaged over the batch.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    ce = -(targets.unsqueeze(0) * log_p).sum(-1).mean()
    avg = log_p.exp().mean(0)
    log_avg = avg.clamp_min(1e-20).log()
    kl = (avg.unsqueeze(0) * (log_avg.unsqueeze(0) - log_p)).sum(-1).mean()
    entropy = -(avg * log_avg).sum(-1).mean()
    return {"loss": ce + lam * kl + eta * entropy, "ce": ce, "kl": kl, "entropy": entropy}
