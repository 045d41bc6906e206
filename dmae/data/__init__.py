"""Data sets: a prepare step per data set (writes a prepared folder) and one loader for every prepared folder.

Prepared folder: meta.json plus train/val/test splits, either safetensors (`images` uint8 [N,C,H,W],
`labels` int64) or, for ImageNet, TSV indexes of image paths. `val` is held out of the training data for
model selection; `test` is the evaluation split.

May import dmae.util only.
"""

from __future__ import annotations

import inspect
import os

from dmae.data import cifar10, digits, imagenet
from dmae.data.common import SPLITS
from dmae.data.loading import load_split, read_meta
from dmae.util.errors import UserError

PREPARERS = {"digits": digits.prepare, "cifar10": cifar10.prepare, "imagenet": imagenet.prepare}

__all__ = ["PREPARERS", "SPLITS", "load_split", "prepare_dataset", "read_meta"]


def prepare_dataset(name: str, out_dir: str | os.PathLike, *, workers: int = 1, **options) -> dict:
    """Prepare data set `name` into `out_dir` (replaced atomically) and return its meta.json content; `workers`
    processes check the images of data sets stored as files (ImageNet)."""
    if name not in PREPARERS:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(PREPARERS)}")
    prepare = PREPARERS[name]
    allowed = [p for p in inspect.signature(prepare).parameters if p not in ("out_dir", "workers")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"option(s) {', '.join(unknown)} do not apply to {name}; its options are {', '.join(allowed)}")
    if "workers" in inspect.signature(prepare).parameters:
        options["workers"] = workers
    return prepare(out_dir, **options)
