"""Multi-process training and certification under torchrun (DDP), and the single-process default.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything runs in one process. Rank 0 writes all
outputs. The process count is a machine knob, never a param: every random draw of training is keyed by the
global position of a sample in its optimizer step (see `position_keys`), so 1, 2 or 8 processes compute the
same thing.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` when distributed (the model itself stays the one to save), else the model."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps that do not end an optimizer step."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size()


def gather_objects(obj):
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
