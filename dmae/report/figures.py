"""The report's figures: certified accuracy against radius, pretraining loss, fine-tuning curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt

from dmae.report.certified import Summary
from dmae.util.errors import UserError
from dmae.util.figures import save_figure

# The columns the figures plot, of the training metric files (docs/ARCHITECTURE.md).
PRETRAIN_COLUMNS = ["epoch", "loss"]
FINETUNE_COLUMNS = ["epoch", "train_loss", "val_clean_acc", "val_noisy_acc"]


def read_metrics_tsv(path: str | os.PathLike, columns: list[str]) -> dict[str, list[float]]:
    """A training metrics TSV (header, then numbers) as one list per column; `columns` must all be present."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}:1: expected columns {columns}, missing {missing}")
    values: dict[str, list[float]] = {c: [] for c in columns}
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            row = dict(zip(header, map(float, fields), strict=True))
        except ValueError:
            raise UserError(f"{path}:{lineno}: malformed row {line!r}") from None
        for c in columns:
            values[c].append(row[c])
    return values


def _colors(sigmas) -> dict[float, str]:
    return {s: f"C{i}" for i, s in enumerate(sorted(sigmas))}


def certified_accuracy_figure(summary: Summary, stem: Path) -> list[Path]:
    """Certified accuracy (%) against l2 radius per sigma, with the best-over-sigma envelope dashed."""
    grid, per_sigma, best = summary.curves()
    colors = _colors(per_sigma)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for sigma, values in per_sigma.items():
        ax.plot(grid, [100 * v for v in values], color=colors[sigma], lw=1.6, label=f"σ = {sigma:g}")
    ax.plot(grid, [100 * v for v in best], color="black", lw=1.4, ls="--", label="best σ per radius")
    ax.set(xlabel="ℓ2 radius (pixel units, [0,1] images)", ylabel="certified accuracy (%)", ylim=(0, 100),
           xlim=(0, grid[-1]), title=f"Certified accuracy ({summary.examples} test examples)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return save_figure(fig, stem)


def pretrain_figure(metrics: Mapping[str, list[float]], stem: Path) -> list[Path]:
    """Pretraining reconstruction loss per epoch."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(metrics["epoch"], metrics["loss"], color="C0", lw=1.6, marker="o", ms=2.5)
    ax.set(xlabel="epoch", ylabel="reconstruction loss (MSE)", title="Pretraining loss")
    ax.grid(alpha=0.3)
    return save_figure(fig, stem)


def finetune_figure(metrics: Mapping[float, Mapping[str, list[float]]], stem: Path) -> list[Path]:
    """Per sigma: training loss, and held-out accuracy on clean (dotted) and noisy (solid) inputs."""
    colors = _colors(metrics)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for sigma, m in sorted(metrics.items()):
        c = colors[sigma]
        loss_ax.plot(m["epoch"], m["train_loss"], color=c, lw=1.6, label=f"σ = {sigma:g}")
        acc_ax.plot(m["epoch"], [100 * v for v in m["val_noisy_acc"]], color=c, lw=1.6,
                    label=f"σ = {sigma:g}, noisy")
        acc_ax.plot(m["epoch"], [100 * v for v in m["val_clean_acc"]], color=c, lw=1.2, ls=":",
                    label=f"σ = {sigma:g}, clean")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Fine-tuning loss")
    acc_ax.set(xlabel="epoch", ylabel="held-out accuracy (%)", ylim=(0, 100),
               title="Held-out accuracy of the base classifier")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(frameon=False)
    acc_ax.legend(frameon=False, fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, stem)
