"""Outputs of the attack evaluation: DVC metrics, the trade-off table and figure, examples, a report section.

Deterministic: the same rows give byte-identical files (no times, no absolute paths, fixed SVG salt).
"""

from __future__ import annotations

from pathlib import Path

import math

import matplotlib.pyplot as plt
import torch

from dmae.defense.robustness import AUTOATTACK, SWEEP, Row, column_examples, columns, sigma_label, sweep_columns
from dmae.report.document import Block, Figure, Heading, Paragraph, Table, to_json, to_markdown
from dmae.models.architectures import ARCHITECTURES
from dmae.settings import STANDARD_BUDGET, AttackSettings, AutoAttackBudget, NoiseSettings, Params
from dmae.util.figures import image_grid, save_figure
from dmae.util.io import atomic_write_text, write_json, write_tsv

PLOTTED = ["clean", "white_pgd_eot", "gray_pgd", "square", "autoattack_standard"]  # trade-off panels, if run


def labels(cfg: AttackSettings) -> dict[str, str]:
    return {"clean": "clean", "white_fgsm": "FGSM", "white_fgsm_eot": f"FGSM EOT-{cfg.eot}", "white_pgd": "PGD",
            "white_pgd_eot": f"PGD EOT-{cfg.eot}", "white_pgd_bpda": f"BPDA EOT-{cfg.eot}",
            "gray_fgsm": "gray-box FGSM", "gray_pgd": "gray-box PGD", "square": "Square",
            "autoattack_standard": "AutoAttack", "autoattack_rand": "AutoAttack rand",
            **{c: f"PGD ε={_eps(eps)}" for c, eps in sweep_columns(cfg).items()}}


def _eps(eps: float) -> str:
    return "0" if eps == 0 else sigma_label(eps)


Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(accuracy: float, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy over n examples. Valid (conservative) for a mean over noise
    draws too: a per-example share h in [0, 1] with mean p has variance at most p (1 - p), the binomial's."""
    if n == 0:
        return 0.0, 1.0
    centre = (accuracy + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(accuracy * (1 - accuracy) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def attack_metrics(rows: list[Row]) -> dict:
    """{classifier: {sigma-S: {"mean": {column: accuracy}, "worst_draw": {...}, "worst_attack": a,
    "autoattack": {version: accuracy}, "denoising_mse": m}}}; columns that do not apply or were not run left out.
    worst_attack: the lowest mean accuracy over the attacks at the configured eps run on every example (not
    clean, not the eps sweep, not AutoAttack, which sees only some)."""
    out: dict[str, dict] = {}
    for r in rows:
        mean = {k: v for k, v in r.accuracy.items() if v is not None}
        out.setdefault(r.classifier, {})[f"sigma-{r.sigma:g}"] = {
            "mean": mean,
            "worst_attack": min(v for k, v in mean.items()
                                if k != "clean" and not k.startswith((SWEEP, AUTOATTACK))),
            "worst_draw": {k: v for k, v in r.worst.items() if v is not None},
            **({"autoattack": aa} if (aa := {k.removeprefix(AUTOATTACK): v for k, v in mean.items()
                                             if k.startswith(AUTOATTACK)}) else {}),
            **({"denoising_mse": r.mse} if r.mse is not None else {})}
    return out


LARGE_EPS = 0.25  # an eps sweep entry at least this large must bring every chain near 0
NEAR_ZERO = 0.1


def sanity_checks(rows: list[Row], cfg: AttackSettings, n: int) -> list[list[str]]:
    """[check, classifier, test sigma, the numbers (%), pass | FLAG] for every row. A difference counts only
    beyond the error bar: a is above b when a's 95 % interval lies wholly above b's."""
    def above(a: float, b: float) -> bool:
        return wilson_interval(a, n)[0] > wilson_interval(b, n)[1]

    def pct(a: float) -> str:
        return f"{100 * a:.1f}"

    out = []
    sweep = sorted([(cfg.eps, "white_pgd"), *((eps, c) for c, eps in sweep_columns(cfg).items())])
    for r in rows:
        where, acc = [r.classifier, sigma_label(r.sigma)], r.accuracy
        falls = [acc[c] for _, c in sweep]
        out.append(["PGD accuracy does not rise with ε (" + ", ".join(_eps(e) for e, _ in sweep) + ")",
                    *where, " ≥ ".join(map(pct, falls)),
                    "FLAG" if any(above(b, a) for a, b in zip(falls, falls[1:])) else "pass"])
        large = [(e, c) for e, c in sweep if e >= LARGE_EPS]
        if large:
            e, c = large[-1]
            out.append([f"PGD at ε = {_eps(e)} brings accuracy near 0 (≤ {pct(NEAR_ZERO)})", *where,
                        pct(acc[c]), "pass" if acc[c] <= NEAR_ZERO else "FLAG"])
        white = min(acc["white_pgd_eot"], acc["white_pgd_bpda"])
        for other, name in (("gray_pgd", "gray-box PGD"), ("square", "Square (black-box)")):
            if r.sigma > 0 or other == "square":
                out.append([f"white-box (best of PGD-EOT, BPDA) not weaker than {name}", *where,
                            f"{pct(white)} vs {pct(acc[other])}", "FLAG" if above(white, acc[other]) else "pass"])
        if r.sigma > 0:
            out.append([f"EOT-{cfg.eot} not weaker than one draw per gradient", *where,
                        f"{pct(acc['white_pgd_eot'])} vs {pct(acc['white_pgd'])}",
                        "FLAG" if above(acc["white_pgd_eot"], acc["white_pgd"]) else "pass"])
        for warning in r.warnings:
            column, message = warning.split(": ", 1)
            out.append([f"{labels(cfg).get(column, column)} reports: {message}", *where,
                        pct(acc[column]) if acc.get(column) is not None else "—", "WARN"])
    return out


def _cell(accuracy: float | None, n: int) -> str:
    if accuracy is None:
        return "—"
    low, high = wilson_interval(accuracy, n)
    return f"{100 * accuracy:.1f} ({100 * low:.0f}–{100 * high:.0f})"


def tradeoff_table(rows: list[Row], cfg: AttackSettings) -> tuple[list[dict], list[str]]:
    """One row per (classifier, test sigma); accuracy columns as `columns(cfg)`, nan where one does not apply."""
    cols = columns(cfg)
    table = [{"classifier": r.classifier, "sigma": r.sigma,
              **{c: float("nan") if r.accuracy[c] is None else r.accuracy[c] for c in cols}} for r in rows]
    return table, ["classifier", "sigma", *cols]


def tradeoff_figure(rows: list[Row], cfg: AttackSettings, stem: Path) -> list[Path]:
    """Accuracy (%) against test sigma, one panel per threat model; undefended classifiers as dashed lines."""
    panels = [c for c in PLOTTED if c in columns(cfg)
              and all(any(r.accuracy[c] is not None for r in rows if r.classifier == name) for name in
                      {r.classifier for r in rows})]  # a panel only when every classifier has a point in it
    names = labels(cfg)
    defended = sorted({r.classifier for r in rows if r.defended})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], panels):
        for i, name in enumerate(defended):
            points = sorted((r.sigma * 255, 100 * r.accuracy[column]) for r in rows
                            if r.classifier == name and r.accuracy[column] is not None)  # AutoAttack: its sigmas
            ax.plot(*zip(*points), color=f"C{i}", marker="o", ms=3, lw=1.5, label=name)
        for r in rows:
            if not r.defended and r.accuracy[column] is not None:
                ax.axhline(100 * r.accuracy[column], color="grey", ls="--", lw=1.2, label=r.classifier)
        ax.set(title=names[column], xlabel="test σ (×1/255)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels
    fig.suptitle(f"De³: accuracy against test-time noise, ℓ∞ ε = {sigma_label(cfg.eps)}", fontsize=10, y=1.02)
    return save_figure(fig, stem)


# The NIM paper's evaluation protocol (You et al. 2023; its result tables are not part of this project)
NIM_PAPER = {
    "data": "ImageNet validation, 224×224",
    "model": "ViT-B/16 (768 wide, 12 blocks), decoder 512×8",
    "NIM denoiser": "800 epochs, σ ~ Gamma(25, 3)/255 per image, no masking, per-patch normalized targets",
    "classifier": "100 epochs on denoised images, σ ~ U(0, 30/255)",
    "ℓ∞ budget ε": "4/255",
    "attacks": "FGSM; PGD 10 steps of 2/255, random start (one noise draw per step); gray-box; "
               "AutoAttack standard (with Square, 5,000 queries) and rand (EOT-20)",
    "test σ": "0 to 300/255 by 5 (none, 70/255, 140/255 typical)",
    "examples": "50,000 (AutoAttack: 5,000)",
    "evaluation": "one noise draw per example",
}


def _noise(noise: NoiseSettings) -> str:
    unit = "/255" if noise.per255 else ""
    return {"none": "no noise", "fixed": f"σ = {noise.sigma:g}{unit}",
            "uniform": f"σ ~ U({noise.low:g}, {noise.high:g}){unit} per image",
            "gamma": f"σ ~ Gamma({noise.shape:g}, {noise.scale:g}){unit} per image"}[noise.dist]


def budget_note(budget: AutoAttackBudget) -> str:
    """'' at the standard budget; else which keys were reduced, with their standard values."""
    if not (reduced := budget.reduced()):
        return ""
    shown = ", ".join(f"{key.replace('_', ' ')} {getattr(budget, key)} (standard {STANDARD_BUDGET[key]})"
                      for key in reduced)
    return f", with a REDUCED budget: {shown}, so its accuracies overstate robustness"


def this_run(params: Params, examples: int) -> dict[str, str]:
    """This run's values of the NIM_PAPER rows."""
    cfg, arch = params.attack, ARCHITECTURES[params.model.preset]
    nim = params.denoiser_settings("nim") if "nim" in params.defense.denoisers else None
    aa = cfg.autoattack
    return {
        "data": f"{params.data.dataset} test split, {params.data.image_size}×{params.data.image_size}",
        "model": f"ViT {params.model.preset}/{params.model.patch_size} ({arch.embed_dim} wide, {arch.depth} blocks), "
                 f"decoder {arch.decoder_embed_dim}×{arch.decoder_depth}",
        "NIM denoiser": (f"{nim.epochs} epochs, {_noise(nim.noise)}, mask ratio {nim.mask_ratio:g}, "
                         f"{'per-patch normalized' if nim.norm_pix_loss else 'pixel'} targets") if nim else "—",
        "classifier": f"{params.defense_finetune().epochs} epochs on denoised images, "
                      f"σ ~ U(0, {sigma_label(params.defense.train_sigma_max)})",
        "ℓ∞ budget ε": sigma_label(cfg.eps),
        "attacks": f"FGSM; PGD {cfg.pgd.steps} steps of {sigma_label(cfg.pgd.step_size)}"
                   f"{', random start' if cfg.pgd.random_start else ''}, also with EOT-{cfg.eot} and BPDA; gray-box; "
                   f"Square ({cfg.square.queries} queries); "
                   + (f"AutoAttack {' and '.join(aa.versions)} ({', '.join(aa.classifiers)}){budget_note(aa.budget)}"
                      if aa.versions and aa.test_sigmas and aa.classifiers else "no AutoAttack"),
        "test σ": ", ".join(map(sigma_label, cfg.test_sigmas)),
        "examples": f"{examples}" + (f" (AutoAttack: {column_examples(cfg, AUTOATTACK, examples)})"
                                     if aa.versions and aa.test_sigmas and aa.classifiers else ""),
        "evaluation": f"mean and worst of {cfg.draws} noise draws per example",
    }


def paper_comparison(params: Params, examples: int) -> list[Block]:
    """This run's protocol beside the NIM paper's, and what the run can and cannot show."""
    ours = this_run(params, examples)
    low, high = wilson_interval(0.5, examples)
    if params.data.dataset == "imagenet":
        verdict = ("Same data as the paper: where a row differs, so may the numbers. The paper's result tables are "
                   "not included in this project, so the report shows no published numbers to compare with.")
    else:
        verdict = (f"The NIM paper evaluates ImageNet only: this run's numbers are not comparable to its tables. "
                   f"What it can show: that every attack runs through the whole chain and behaves as the sanity "
                   f"checks below require, how clean and robust accuracy move with the test σ for these models, and "
                   f"differences between chains larger than their intervals (at {examples} examples a 50 % accuracy "
                   f"has a 95 % interval of {100 * low:.0f}–{100 * high:.0f} %). What it cannot show: the paper's "
                   f"accuracies, or that its ranking of the denoisers holds at its scale (a small ViT on small "
                   f"images, trained for minutes, at a larger ε than the paper's).")
    return [Heading("Against the NIM paper's protocol", 3),
            Table(["", "this run", "NIM paper"], [[k, ours[k], v] for k, v in NIM_PAPER.items()], numeric=False),
            Paragraph(verdict)]


def section(rows: list[Row], params: Params, examples: int, figures: list[str]) -> list[Block]:
    """The section the report includes: protocol, the robust accuracy table, the figures (paths relative)."""
    cfg, dataset = params.attack, params.data.dataset
    names = labels(cfg)
    cols = columns(cfg)
    p, aa = cfg.pgd, cfg.autoattack
    count = column_examples(cfg, AUTOATTACK, examples)
    autoattack = (f"AutoAttack {' and '.join(aa.versions)} (pyautoattack) on {count} of them (a seeded subset), "
                  f"for {', '.join(aa.classifiers)} at test σ {', '.join(map(sigma_label, aa.test_sigmas))} "
                  f"(— elsewhere){budget_note(aa.budget)}"
                  if aa.versions and aa.test_sigmas and aa.classifiers else "AutoAttack not run")
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
            f"defense's outputs. Every entry is the accuracy (%) averaged over {cfg.draws} noise draws of the "
            f"defense per example, with its 95 % Wilson interval over the examples in brackets; the "
            f"second table gives the accuracy of the worst of the {cfg.draws} draws. Without noise (σ = none) a "
            f"model is deterministic (one draw): EOT and gray-box equal the white-box attacks, and AutoAttack "
            f"rand does not apply (—)."),
        *([Paragraph(
            "AutoAttack keeps a perturbation only for points that one forward pass shows misclassified and returns "
            "the clean image for the others: against a randomized defense its accuracy is an upper bound, and the "
            "EOT columns are the ones to trust.")] if aa.versions and aa.test_sigmas and aa.classifiers else []),
        Table(["classifier", "test σ", *(names[c] for c in cols)],
              [[r.classifier, sigma_label(r.sigma),
                *(_cell(r.accuracy[c], column_examples(cfg, c, examples)) for c in cols)] for r in rows]),
        Paragraph(f"Accuracy (%) of the worst of {cfg.draws} noise draws, and the denoiser's mean squared error "
                  f"on the clean images (noised at the test σ, then denoised; per pixel, ×1000): a denoiser that "
                  f"does not restore the images explains a chain's low clean accuracy whatever its classifier."),
        Table(["classifier", "test σ", *(names[c] for c in cols), "denoising MSE ×1000"],
              [[r.classifier, sigma_label(r.sigma),
                *("—" if r.worst[c] is None else f"{100 * r.worst[c]:.1f}" for c in cols),
                "—" if r.mse is None else f"{1000 * r.mse:.1f}"] for r in rows]),
        *paper_comparison(params, examples),
        Heading("Attack sanity checks", 3),
        Paragraph("Signs that an attack works as intended on these defenses, and not against masked gradients: "
                  "accuracy falls with ε and vanishes for a large one, the white-box attacks are at least as strong "
                  "as the gray-box and black-box ones, and more EOT draws do not help the defense. FLAG means the "
                  "difference lies beyond the 95 % intervals; WARN is one of AutoAttack's own reliability checks "
                  "(Croce & Hein 2020), as the package printed it."),
        Table(["check", "classifier", "test σ", "accuracy (%)", "result"], sanity_checks(rows, cfg, examples),
              numeric=False),
        Figure(figures[0], "Accuracy against test-time noise σ, per threat model (dashed: undefended)."),
        Figure(figures[1], "White-box PGD-EOT adversarial examples, with the noisy input and what the "
                           "denoiser makes of it, per test σ."),
    ]


def write_attack_outputs(rows: list[Row], shown: dict[str, torch.Tensor], params: Params, examples: int,
                         out: Path) -> None:
    """OUT/metrics.json (DVC metrics), tradeoff.tsv (a DVC plot), tradeoff.png|svg, adversarial.png|svg, and the
    report's section as attack.md and attack.json (document blocks, read by `dmae report`)."""
    cfg = params.attack
    write_json(out / "metrics.json", attack_metrics(rows))
    table, cols = tradeoff_table(rows, cfg)
    write_tsv(out / "tradeoff.tsv", table, cols)
    tradeoff_figure(rows, cfg, out / "tradeoff")
    image_grid(shown, out / "adversarial",
               title=f"{cfg.figure}: white-box PGD-EOT examples (ε = {sigma_label(cfg.eps)}), noised, denoised")
    blocks = section(rows, params, examples, ["tradeoff.png", "adversarial.png"])
    atomic_write_text(out / "attack.md", to_markdown(blocks))
    write_json(out / "attack.json", to_json(blocks))
