"""Numeric precision of the forward pass: a tracked param because it changes the numbers."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]


def autocast(device: torch.device | str, precision: Precision):
    """bf16 autocast on CUDA or CPU when asked for, otherwise a no-op context (fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")
