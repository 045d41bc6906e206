"""Figures written by the stages (matplotlib, headless): PNG and SVG, deterministic (no dates in metadata)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dmae.util.io import atomic_path  # noqa: E402

PNG_META = {"Software": None}
SVG_META = {"Date": None, "Creator": None}


def save_figure(fig, path_stem: Path) -> list[Path]:
    """Save `fig` as <stem>.png and <stem>.svg atomically; returns the paths."""
    paths = []
    for ext, meta in (("png", PNG_META), ("svg", SVG_META)):
        path = path_stem.with_suffix(f".{ext}")
        # a fixed salt: SVG element ids are otherwise random, and DVC would see a new output every run
        with atomic_path(path) as tmp, matplotlib.rc_context({"svg.hashsalt": path_stem.name}):
            fig.savefig(tmp, format=ext, dpi=120, metadata=meta, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _show(ax, img: torch.Tensor) -> None:
    img = img.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy()
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(rows: dict[str, torch.Tensor], path_stem: Path, title: str = "") -> list[Path]:
    """One row per named batch of [N, C, H, W] images in [0,1] (values outside are clipped for display)."""
    n = min(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            _show(axes[r][c], imgs[c])
        axes[r][0].set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path_stem)
