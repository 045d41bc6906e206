"""Shared pieces of the prepare step: option checks, stratified hold-outs, split files and atomic output folders."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from dmae.util.errors import UserError
from dmae.util.io import write_json

SPLITS = ("train", "val", "test")


def check_split_options(val_fraction: float, test_every: int, image_size: int | None = None) -> None:
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not (isinstance(test_every, int) and test_every >= 1):
        raise UserError(f"test_every must be an integer >= 1, got {test_every!r}")
    if image_size is not None and not (isinstance(image_size, int) and image_size >= 1):
        raise UserError(f"image_size must be an integer >= 1, got {image_size!r}")


def holdout(indices: np.ndarray, labels: np.ndarray, size: float | int, seed: int, what: str):
    """Split `indices` into (kept, held_out), stratified by `labels`; both come back sorted.

    `size` is a fraction or a count, as in sklearn's train_test_split; 0 holds out nothing.
    """
    if size == 0:
        return np.sort(indices), indices[:0]
    try:
        from sklearn.model_selection import train_test_split  # here: scikit-learn takes seconds to import

        kept, held = train_test_split(indices, test_size=size, stratify=labels, random_state=seed)
    except ValueError as err:
        raise UserError(f"cannot hold out the {what} split (size {size!r}): {err}") from None
    return np.sort(kept), np.sort(held)


def save_tensor_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write `<split>.safetensors` with `images` uint8 [N, C, H, W] and `labels` int64 [N]."""
    tensors = {
        "images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    }
    save_file(tensors, str(folder / f"{split}.safetensors"))


def write_meta(folder: Path, *, dataset: str, storage: str, class_names: Sequence[str], channels: int,
               image_size: int, mean: Sequence[float], std: Sequence[float], splits: dict[str, int],
               **extra) -> dict:
    """Write meta.json; `storage` says how load_split reads the splits ("safetensors" or "tsv")."""
    meta = {
        "dataset": dataset, "storage": storage, "num_classes": len(class_names), "class_names": list(class_names),
        "channels": channels, "image_size": image_size, "mean": list(mean), "std": list(std),
        "splits": splits, **extra,
    }
    write_json(folder / "meta.json", meta)
    return meta


@contextlib.contextmanager
def building_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `out_dir`; on success it replaces `out_dir` whole, on failure it is removed.

    Fixed sibling names (`.<name>.partial`, `.<name>.old`) mean leftovers of a crashed run are found and removed.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    old = out.with_name(f".{out.name}.old")
    for stale in (partial, old):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
