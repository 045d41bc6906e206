"""Outputs of the attack evaluation: DVC metrics, the trade-off table and figure, examples, a report section.

Deterministic: the same rows give byte-identical files (no times, no absolute paths, fixed SVG salt).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch

from dmae.defense.robustness import Row, columns, sigma_label
from dmae.report.document import Block, Figure, Heading, Paragraph, Table, to_json, to_markdown
from dmae.settings import AttackSettings
from dmae.util.figures import image_grid, save_figure
from dmae.util.io import atomic_write_text, write_json, write_tsv

PLOTTED = ["clean", "white_pgd_eot", "gray_pgd", "square", "autoattack_standard"]  # trade-off panels, if run


def labels(cfg: AttackSettings) -> dict[str, str]:
    return {"clean": "clean", "white_fgsm": "FGSM", "white_fgsm_eot": f"FGSM EOT-{cfg.eot}", "white_pgd": "PGD",
            "white_pgd_eot": f"PGD EOT-{cfg.eot}", "gray_fgsm": "gray-box FGSM", "gray_pgd": "gray-box PGD",
            "square": "Square", "autoattack_standard": "AutoAttack", "autoattack_rand": "AutoAttack rand"}


def attack_metrics(rows: list[Row]) -> dict:
    """{classifier: {sigma-S: {column: accuracy}}} for `dvc metrics`; columns that do not apply left out."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r.classifier, {})[f"sigma-{r.sigma:g}"] = {
            k: v for k, v in r.accuracy.items() if v is not None}
    return out


def tradeoff_table(rows: list[Row], cfg: AttackSettings) -> tuple[list[dict], list[str]]:
    """One row per (classifier, test sigma); accuracy columns as `columns(cfg)`, nan where one does not apply."""
    cols = columns(cfg)
    table = [{"classifier": r.classifier, "sigma": r.sigma,
              **{c: float("nan") if r.accuracy[c] is None else r.accuracy[c] for c in cols}} for r in rows]
    return table, ["classifier", "sigma", *cols]


def tradeoff_figure(rows: list[Row], cfg: AttackSettings, stem: Path) -> list[Path]:
    """Accuracy (%) against test sigma, one panel per threat model; undefended classifiers as dashed lines."""
    panels = [c for c in PLOTTED if c in columns(cfg)]
    names = labels(cfg)
    defended = sorted({r.classifier for r in rows if r.defended})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], panels):
        for i, name in enumerate(defended):
            points = sorted((r.sigma * 255, 100 * r.accuracy[column]) for r in rows if r.classifier == name)
            ax.plot(*zip(*points), color=f"C{i}", marker="o", ms=3, lw=1.5, label=name)
        for r in rows:
            if not r.defended:
                ax.axhline(100 * r.accuracy[column], color="grey", ls="--", lw=1.2, label=r.classifier)
        ax.set(title=names[column], xlabel="test σ (×1/255)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels
    fig.suptitle(f"De³: accuracy against test-time noise, ℓ∞ ε = {sigma_label(cfg.eps)}", fontsize=10, y=1.02)
    return save_figure(fig, stem)


def section(rows: list[Row], cfg: AttackSettings, dataset: str, examples: int, figures: list[str]) -> list[Block]:
    """The section the report includes: protocol, the robust accuracy table, the figures (paths relative)."""
    names = labels(cfg)
    cols = columns(cfg)
    p = cfg.pgd
    autoattack = f"AutoAttack {' and '.join(cfg.autoattack)}" if cfg.autoattack else "AutoAttack not run"
    return [
        Heading("Adversarial robustness: NIM / De³ (denoise, then classify)"),
        Paragraph(
            f"ℓ∞ attacks with ε = {sigma_label(cfg.eps)} on {examples} test images of {dataset}. Each defense "
            f"adds Gaussian noise at the test σ, denoises with a frozen pretrained autoencoder (MAE-, DMAE- or "
            f"NIM-pretrained) and classifies with a classifier fine-tuned on denoised images; σ = none is the "
            f"classifier alone. FGSM; PGD with {p.steps} steps of {sigma_label(p.step_size)}"
            f"{', random start' if p.random_start else ''}; EOT-{cfg.eot}: gradients averaged over {cfg.eot} noise "
            f"draws; Square with {cfg.square.queries} queries; {autoattack}."),
        Paragraph(
            "White-box attacks differentiate through noise, denoiser and classifier; gray-box attacks are "
            "crafted on the classifier alone and evaluated through the defense; Square only queries the "
            "defense's outputs. Every entry is the accuracy (%) of one noise draw of the defense. Without "
            "noise (σ = none) a model is deterministic: EOT and gray-box equal the white-box attacks, and "
            "AutoAttack rand does not apply (—)."),
        *([Paragraph(
            "AutoAttack keeps a perturbation only for points that one forward pass shows misclassified and returns "
            "the clean image for the others: against a randomized defense its accuracy is an upper bound, and the "
            "EOT columns are the ones to trust.")] if cfg.autoattack else []),
        Table(["classifier", "test σ", *(names[c] for c in cols)],
              [[r.classifier, sigma_label(r.sigma),
                *("—" if r.accuracy[c] is None else f"{100 * r.accuracy[c]:.1f}" for c in cols)] for r in rows]),
        Figure(figures[0], "Accuracy against test-time noise σ, per threat model (dashed: undefended)."),
        Figure(figures[1], "White-box PGD-EOT adversarial examples, with the noisy input and what the "
                           "denoiser makes of it, per test σ."),
    ]


def write_attack_outputs(rows: list[Row], shown: dict[str, torch.Tensor], cfg: AttackSettings, dataset: str,
                         examples: int, out: Path) -> None:
    """OUT/metrics.json (DVC metrics), tradeoff.tsv (a DVC plot), tradeoff.png|svg, adversarial.png|svg, and the
    report's section as attack.md and attack.json (document blocks, read by `dmae report`)."""
    write_json(out / "metrics.json", attack_metrics(rows))
    table, cols = tradeoff_table(rows, cfg)
    write_tsv(out / "tradeoff.tsv", table, cols)
    tradeoff_figure(rows, cfg, out / "tradeoff")
    image_grid(shown, out / "adversarial",
               title=f"{cfg.figure}: white-box PGD-EOT examples (ε = {sigma_label(cfg.eps)}), noised, denoised")
    blocks = section(rows, cfg, dataset, examples, ["tradeoff.png", "adversarial.png"])
    atomic_write_text(out / "attack.md", to_markdown(blocks))
    write_json(out / "attack.json", to_json(blocks))
