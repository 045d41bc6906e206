"""Model checkpoints: weights as safetensors (tensors only, nothing to unpickle) plus a small JSON config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmae.util.errors import UserError
from dmae.util.io import atomic_path, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_weights(out_dir: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write `model.safetensors` and `config.json` into out_dir, each atomically."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / CONFIG, config)


def load_config(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{path}: checkpoint config not found (run the stage that writes {ckpt_dir} first)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: checkpoint weights not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
              allow_missing: tuple[str, ...] = ()) -> None:
    """Load strictly, with a plain-words error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}")
        raise UserError(f"{source}: weights do not fit the model:\n  " + "\n  ".join(parts))
    model.load_state_dict(state_dict, strict=False)
