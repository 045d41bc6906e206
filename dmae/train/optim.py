"""Optimizer parameter groups (weight decay, layer-wise lr decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
import re

import torch.nn as nn

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")


def _decays(name: str, param) -> bool:
    """Weight decay applies to weight matrices only: not to biases, norms (1-D) or tokens and embeddings."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim > 1 and not name.endswith(".bias") and leaf not in NO_DECAY_NAMES


def layer_id(name: str, num_layers: int) -> int:
    """BEiT-style depth of a ViT parameter: 0 for embeddings, i + 1 for block i, num_layers + 1 for the rest."""
    name = name.removeprefix("vit.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 num_layers: int = 0) -> list[dict]:
    """Groups keyed by (decay?, layer); each carries `lr_scale` = layer_decay ** (num_layers + 1 - layer_id)."""
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = _decays(name, p)
        lid = layer_id(name, num_layers) if layer_decay < 1.0 else 0
        key = (decay, lid)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - lid) if layer_decay < 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: float, total_steps: int, warmup_steps: float, peak_lr: float, min_lr: float) -> float:
    """Linear warm-up to peak_lr, then half-cycle cosine down to min_lr (per iteration, as MAE)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
