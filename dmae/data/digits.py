"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from dmae.data.common import building_dir, check_split_options, holdout, save_tensor_split, write_meta

TEST_SIZE = 360  # fixed stratified test split, drawn with random_state 0
NATIVE_SIZE = 8


def prepare(out_dir: str | os.PathLike, *, image_size: int = 32, val_fraction: float = 0.1, seed: int = 0,
            test_every: int = 1) -> dict:
    """Write train/val/test safetensors (1 channel, `image_size` square, uint8) and meta.json into `out_dir`."""
    check_split_options(val_fraction, test_every, image_size)
    from sklearn.datasets import load_digits  # here: scikit-learn takes seconds to import

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if image_size != NATIVE_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=True)
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)

    rest, test = holdout(np.arange(len(labels)), labels, TEST_SIZE, 0, "test")
    train, val = holdout(rest, labels[rest], val_fraction, seed, "validation")
    parts = {"train": train, "val": val, "test": test[::test_every]}

    train_pixels = pixels[train].astype(np.float64) / 255
    mean = [round(float(v), 4) for v in train_pixels.mean(axis=(0, 2, 3))]
    std = [round(float(v), 4) for v in train_pixels.std(axis=(0, 2, 3))]
    with building_dir(out_dir) as folder:
        for split, idx in parts.items():
            save_tensor_split(folder, split, pixels[idx], labels[idx])
        return write_meta(folder, dataset="digits", storage="safetensors", class_names=[str(c) for c in range(10)],
                          channels=1, image_size=image_size, mean=mean, std=std,
                          splits={split: len(idx) for split, idx in parts.items()})
