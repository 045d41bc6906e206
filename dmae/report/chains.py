"""Denoised smoothing in the report: every denoise-then-classify chain beside the fine-tuned DMAE encoder, certified
on the same test examples at each sigma, with what each costs per image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np

from dmae.report.certified import Run
from dmae.report.document import Block, Figure, Heading, Paragraph, Table
from dmae.util.figures import save_figure

ENCODER = "DMAE encoder (fine-tuned)"


@dataclass(frozen=True)
class Chain:
    name: str
    denoiser: str
    classifier: str  # a De^3 classifier, or per_sigma
    fine_tuned: bool  # the classifier was fine-tuned on this denoiser's reconstructions at each sigma
    runs: dict[float, Run]  # by sigma

    @property
    def label(self) -> str:
        what = "fine-tuned on reconstructions at σ" if self.fine_tuned else f"classifier {self.classifier}"
        return f"{self.name}: denoiser {self.denoiser} + {what}"


def every_kth(run: Run, k: int) -> Run:
    """The examples idx 0, k, 2k, ... of a run (rows in idx order), the ones the chains certify."""
    return Run(run.sigma, run.radius[::k], run.correct[::k], run.abstain[::k], run.samples[::k], run.votes[::k])


def _row(label: str, run: Run, radii, n0: int, models: int) -> list[str]:
    forwards = n0 + run.mean_samples
    return [label, *(f"{100 * a:.1f}" for a in run.certified_accuracy(radii)), f"{run.acr:.3f}",
            f"{100 * run.clean_accuracy:.1f}", f"{forwards:,.0f}", f"{models * forwards:,.0f}"]


def chain_blocks(encoder: Mapping[float, Run], chains: list[Chain], radii, *, every: int, n0: int,
                 figure: Figure) -> list[Block]:
    """One table per sigma (the encoder on the chains' examples, then each chain) and the figure's block."""
    header = ["base classifier", *(f"r = {r:g} (%)" for r in radii), "ACR", "clean (%)", "samples / image",
              "model forwards / image"]
    first = next(iter(next(iter(chains)).runs.values()))
    blocks: list[Block] = [
        Heading("Denoised smoothing: one denoiser, any classifier"),
        Paragraph(f"The base classifier of a chain denoises each noisy sample in one step with a frozen autoencoder "
                  f"(at the known σ) and labels the reconstruction; it is certified with the certify settings, "
                  f"on every k-th test example, k = {every} ({len(first.radius)} examples; the encoder's rows below "
                  f"are the same examples). Cost: a chain runs two models per sample (denoiser and classifier), the "
                  f"encoder one; samples include N0 = {n0}. Seconds per example are in results/timings/ (not "
                  f"part of the cached results, as they vary from run to run). Chains: "
                  + "; ".join(c.label for c in chains) + ".")]
    for sigma in sorted(encoder):
        rows = [_row(ENCODER, every_kth(encoder[sigma], every), radii, n0, 1)]
        rows += [_row(c.name, c.runs[sigma], radii, n0, 2) for c in chains]
        blocks += [Heading(f"σ = {sigma:g}", 3), Table(header, rows)]
    return blocks + [figure]


def chains_figure(encoder: Mapping[float, Run], chains: list[Chain], every: int, stem: Path) -> list[Path]:
    """Certified accuracy (%) against radius, one panel per sigma: the encoder (same examples) and each chain."""
    sigmas = sorted(encoder)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4.2 * len(sigmas), 3.6), squeeze=False, sharey=True)
    for ax, sigma in zip(axes[0], sigmas):
        curves = {ENCODER: every_kth(encoder[sigma], every), **{c.name: c.runs[sigma] for c in chains}}
        top = max(float(run.radius.max()) for run in curves.values())
        grid = np.linspace(0, max(top, 1e-3) * 1.05, 200)
        for i, (name, run) in enumerate(curves.items()):
            ax.plot(grid, [100 * a for a in run.certified_accuracy(grid)], color=f"C{i}", lw=1.6, label=name,
                    ls="--" if name == ENCODER else "-")
        ax.set(title=f"σ = {sigma:g}", xlabel="ℓ2 radius", ylim=(0, 100), xlim=(0, grid[-1]))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("certified accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=8)
    return save_figure(fig, stem)
