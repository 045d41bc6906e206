"""The report: figures, then report.md and a self-contained report.html saying the same thing.

Deterministic: no dates, no absolute paths (paths appear as the caller gives them); the same inputs give
byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy.stats import norm

from dmae.report.certified import Summary, best_over_sigma, certification_metrics, curve_rows, load_runs, radius_key
from dmae.report.chains import Chain, chain_blocks, chains_figure
from dmae.report.document import Block, Figure, Heading, Paragraph, Table, from_json, to_html, to_markdown
from dmae.report.figures import (FINETUNE_COLUMNS, PRETRAIN_COLUMNS, certified_accuracy_figure, finetune_figure,
                                 pretrain_figure, read_metrics_tsv)
from dmae.report.published import PUBLISHED, PublishedTable
from dmae.smoothing.bounds import FINAL_SHARE, FIRST_LOOK, FUTILITY, MIXTURE_FINAL_SHARE
from dmae.util.errors import UserError
from dmae.util.io import atomic_write_bytes, atomic_write_text, write_json, write_tsv

TITLE = "Certified robustness report"
LIBRARIES = ["torch", "timm", "dvc", "dmae"]
FIGURES = "figures"  # folder of the figures, inside the report's folder
FIGURE_STEMS = ["certified_accuracy", "finetune", "pretrain_loss", "reconstructions"]
ATTACK_PREFIX = "attack_"  # the attack section's figures, copied into the figures folder under this prefix
DEFINITIONS = (
    "Certified accuracy at radius r: the share of test examples that the smoothed classifier classifies "
    "correctly with a certified ℓ2 radius of at least r (an abstention counts as wrong). Radii are in pixel "
    "units of [0,1] images. ACR (average certified radius): the mean over all examples of the certified radius "
    "of correct predictions, 0 for wrong ones and abstentions. Clean accuracy: the share classified correctly, "
    "whatever the radius. Like the paper's tables, the headline takes at each radius the best σ.")
ADAPTIVE = {
    "mixture": "Each image keeps a confidence sequence for pA (one-sided beta-binomial mixtures whose prior is the "
               "posterior of pA given the N0 selection samples), valid at every sample count at once by Ville's "
               "inequality, looks wherever a decision first becomes possible, and spends "
               f"{MIXTURE_FINAL_SHARE:.0%} of α on Clopper-Pearson at the last sample. It gives up on the next "
               f"radius when the posterior chance that sampling on to N certifies it is below {FUTILITY:g} (a "
               "stopping rule: it costs no α, only, rarely, a radius more samples would have certified).",
    "union": f"Each image is sampled in looks of {FIRST_LOOK}, {2 * FIRST_LOOK}, {4 * FIRST_LOOK}, ... samples, "
             "with α split over the looks, until more samples cannot change which radii of the table it is "
             "certified at.",
}
# The share of α behind the highest lower bound on pA an adaptive method can reach at N (every sample agreeing):
# union's last look; the mixture's sequence (its M_n(p) is at most p^-n) or its Clopper-Pearson, the larger share.
CAP_SHARE = {"mixture": max(MIXTURE_FINAL_SHARE, 1 - MIXTURE_FINAL_SHARE), "union": FINAL_SHARE}
FIXED_N = (
    "Samples: estimation samples per image (N0 selection samples come on top). Fixed-N need: for each image, the "
    "fewest samples with which CERTIFY at a fixed N, knowing the image's pA (estimated as its votes for the "
    "selected class over its samples) and seeing the expected count of votes, certifies the bracket this run "
    "certified it at (the highest radius of the table not above its radius; Clopper-Pearson at the expected "
    "count: with every sample agreeing, n ≥ ln(1/α) / ln(1/t) at the bracket's threshold t = Φ(r/σ)); 0 on "
    "abstain. Mean / need says how many times more samples the run drew than a fixed-N test needs once pA is "
    "known: what not knowing pA cost. 1x would be the least any fixed-N test can do; an adaptive method may "
    "come close by stopping each image where its bracket is decided, and can beat it only on images whose "
    "samples happen to run favourably.")


@dataclass(frozen=True)
class ReportInputs:
    summary: Summary
    dataset: str  # params data.dataset
    settings: dict[str, dict] = field(default_factory=dict)  # "pretrain", "finetune σ=0.25", ... -> settings.json
    missing_settings: list[str] = field(default_factory=list)  # settings files not found, as given
    pretrain_metrics: dict[str, list[float]] | None = None
    finetune_metrics: dict[float, dict[str, list[float]]] = field(default_factory=dict)
    reconstructions: Path | None = None  # the pretraining figure (PNG), copied into the report
    attack: list[Block] | None = None  # the attack stage's section (attack.json); its figures relative to:
    attack_root: Path | None = None
    chains: list[Chain] = field(default_factory=list)  # denoised smoothing, certified on every chain_every-th example
    chain_every: int = 1


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _r(radius: float) -> str:
    return f"r = {radius:g}"


def _sigma(sigma: float) -> str:
    return f"σ = {sigma:g}"


def _certify_settings(inputs: ReportInputs) -> dict | None:
    """The certify section of the first certification's settings (any differences show in the settings table)."""
    found = [s["certify"] for label, s in inputs.settings.items() if label.startswith("certify") and "certify" in s]
    return found[0] if found else None


def radius_cap_text(top: float, n: str) -> str:
    """What the highest reachable lower bound on pA, `top` (every sample agreeing), allows."""
    if top < 0.5:
        return (f"with these, NO radius can be certified: even if every sample agrees, the lower bound on pA is "
                f"{top:.3f} < 1/2, so every image abstains ({n} is too small for α)")
    return f"with these, no certified radius can exceed {norm.ppf(top):.2f} σ"


def overview(inputs: ReportInputs) -> list[Block]:
    s = inputs.summary
    text = (f"Data set: {inputs.dataset}; {s.examples} test examples certified at each "
            f"σ ∈ {{{', '.join(f'{sigma:g}' for sigma in s.runs)}}}.")
    c = _certify_settings(inputs)
    if c and c.get("method", "cohen") == "cohen":
        text += (f" Certification (CERTIFY of Cohen et al.): N0 = {c['n0']}, N = {c['n']}, α = {c['alpha']:g}; "
                 f"{radius_cap_text(c['alpha'] ** (1 / c['n']), 'N')}.")
    elif c:
        text += (f" Certification: adaptive, N0 = {c['n0']}, at most N = {c['n_max']} estimation samples per "
                 f"image, α = {c['alpha']:g}. {ADAPTIVE[c['method']]} Each certificate holds with probability at "
                 f"least 1 − α whatever the stopping time; "
                 f"{radius_cap_text((c['alpha'] * CAP_SHARE[c['method']]) ** (1 / c['n_max']), 'N')}.")
    return [Heading(TITLE, 1), Paragraph(text), Paragraph(DEFINITIONS)]


def headline(s: Summary) -> list[Block]:
    best, acr = s.best(), s.best_acr()
    table = Table(["ℓ2 radius r", *(f"{r:g}" for r in s.radii)],
                  [["certified accuracy (%)", *(pct(b.accuracy) for b in best)],
                   ["best σ", *(f"{b.sigma:g}" for b in best)]])
    return [Heading("Certified accuracy, best σ per radius"), table,
            Paragraph(f"Best average certified radius (ACR): {acr.accuracy:.3f} at {_sigma(acr.sigma)}.")]


def per_sigma(s: Summary, c: dict | None) -> list[Block]:
    """Certified accuracy and ACR per sigma, and the estimation samples each image took beside what a fixed-N test
    that knows pA would need (given the certify settings `c`: alpha, and N or n_max)."""
    n = (c.get("n") or c.get("n_max")) if c else None
    header = ["σ", *(f"{_r(r)} (%)" for r in s.radii), "ACR", "abstain (%)", "clean accuracy (%)",
              *(["N"] if n else []), "samples / image (mean)", "(median)",
              *(["N / mean", "fixed-N need (mean)", "mean / need"] if n else [])]
    rows = []
    for sigma, run in s.runs.items():
        row = [f"{sigma:g}", *map(pct, run.certified_accuracy(s.radii)), f"{run.acr:.3f}", pct(run.abstain_rate),
               pct(run.clean_accuracy), *([f"{n:,}"] if n else []), f"{run.mean_samples:,.0f}",
               f"{run.median_samples:,.0f}"]
        if n:
            need = float(np.mean(run.fixed_n_samples(s.radii, c["alpha"])))
            row += [f"{n / run.mean_samples:.2f}x", f"{need:,.0f}",
                    f"{run.mean_samples / need:.2f}x" if need else "—"]
        rows.append(row)
    return [Heading("Per σ"), Table(header, rows), *([Paragraph(FIXED_N)] if n else [])]


def published(s: Summary, table: PublishedTable, n: int | None) -> list[Block]:
    ours = [100 * b.accuracy for b in s.best(table.radii)]
    rows = [[p.method, p.params, *(f"{v:.1f}" for v in p.accuracy)] for p in table.rows]
    rows.append(["ours (this run, best σ)", "", *(f"{v:.1f}" for v in ours)])
    rows += [[f"ours − {p.method}", "", *(f"{a - b:+.1f}" for a, b in zip(ours, p.accuracy))]
             for p in table.rows if p.compare]
    note = (f"Published: certified accuracy (%), best σ per radius, from the DMAE paper; protocol "
            f"{table.protocol}. Ours: {s.examples} examples"
            + (f", N = {n}." if n else ".") + " A smaller N caps the reachable radius and lowers accuracy there.")
    return [Heading(f"Published results on {table.dataset}"),
            Table(["method", "params", *(_r(r) for r in table.radii)], rows), Paragraph(note)]


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def settings_table(settings: dict[str, dict]) -> Table:
    """One row per setting: its value where all stages agree, else the value of each stage."""
    values: dict[str, dict[str, str]] = {}
    for label, content in settings.items():
        for key, value in _flatten({k: v for k, v in content.items() if k != "sigma"}).items():
            values.setdefault(key, {})[label] = value
    rows = []
    for key in sorted(values):
        by_label = values[key]
        stages = sorted({label.split()[0] for label in by_label})
        distinct = set(by_label.values())
        value = distinct.pop() if len(distinct) == 1 else "; ".join(f"{k}: {v}" for k, v in by_label.items())
        rows.append([key, value, ", ".join(stages)])
    return Table(["setting", "value", "used by"], rows, numeric=False)


def settings_blocks(inputs: ReportInputs) -> list[Block]:
    blocks: list[Block] = [Heading("Settings")]
    if inputs.settings:
        blocks += [Paragraph("From the settings.json each stage writes beside its outputs "
                             f"({', '.join(inputs.settings)}); σ-specific values are listed per stage."),
                   settings_table(inputs.settings)]
    if inputs.missing_settings:
        blocks.append(Paragraph("Not found: " + ", ".join(inputs.missing_settings) + "."))
    versions = library_versions()
    blocks += [Heading("Software"), Table(["library", "version"], [[k, v] for k, v in versions.items()], numeric=False)]
    return blocks


def _clear_figures(folder: Path) -> None:
    """Remove the figures an earlier run of the report wrote (and nothing else)."""
    for stem in FIGURE_STEMS:
        for ext in ("png", "svg"):
            (folder / f"{stem}.{ext}").unlink(missing_ok=True)
    for path in folder.glob(f"{ATTACK_PREFIX}*.png"):
        path.unlink()


def attack_blocks(inputs: ReportInputs, out: Path) -> list[Block]:
    """The attack section with its figures copied into out/figures (the HTML inlines them from there)."""
    if inputs.attack is None:
        return []
    blocks: list[Block] = []
    for b in inputs.attack:
        if isinstance(b, Figure):
            name = f"{ATTACK_PREFIX}{Path(b.path).name}"
            atomic_write_bytes(out / FIGURES / name, (inputs.attack_root / b.path).read_bytes())
            b = Figure(f"{FIGURES}/{name}", b.caption)
        blocks.append(b)
    return blocks


def make_figures(inputs: ReportInputs, out: Path) -> list[Figure]:
    """Write the figures into out/figures (removing ours left from an earlier run); return them for the document."""
    folder, rel = out / FIGURES, FIGURES
    _clear_figures(folder)
    certified_accuracy_figure(inputs.summary, folder / "certified_accuracy")
    figures = [Figure(f"{rel}/certified_accuracy.png", "Certified accuracy against radius, per σ; dashed: the "
                      "best σ at each radius (the headline table samples this curve).")]
    if inputs.finetune_metrics:
        finetune_figure(inputs.finetune_metrics, folder / "finetune")
        figures.append(Figure(f"{rel}/finetune.png", "Fine-tuning of the base classifier per σ: training loss; "
                              "held-out accuracy on noisy (solid) and clean (dotted) inputs."))
    if inputs.pretrain_metrics:
        pretrain_figure(inputs.pretrain_metrics, folder / "pretrain_loss")
        figures.append(Figure(f"{rel}/pretrain_loss.png", "Pretraining reconstruction loss per epoch."))
    if inputs.reconstructions:
        atomic_write_bytes(folder / "reconstructions.png", inputs.reconstructions.read_bytes())
        figures.append(Figure(f"{rel}/reconstructions.png", "Pretrained autoencoder on held-out test images."))
    if inputs.chains:
        chains_figure(inputs.summary.runs, inputs.chains, inputs.chain_every, folder / "chains")
    return figures


def denoised_smoothing(inputs: ReportInputs) -> list[Block]:
    if not inputs.chains:
        return []
    c = _certify_settings(inputs)
    figure = Figure(f"{FIGURES}/chains.png", "Denoised smoothing: certified accuracy against radius per σ, each chain "
                    "and (dashed) the fine-tuned DMAE encoder on the same examples.")
    return chain_blocks(inputs.summary.runs, inputs.chains, inputs.summary.radii, every=inputs.chain_every,
                        n0=c["n0"] if c else 0, figure=figure)


def build(inputs: ReportInputs, figures: list[Figure], attack: list[Block]) -> list[Block]:
    s = inputs.summary
    c = _certify_settings(inputs)
    blocks = overview(inputs) + headline(s) + per_sigma(s, c)
    table = PUBLISHED.get(inputs.dataset)
    if table:
        c = _certify_settings(inputs)
        blocks += published(s, table, (c.get("n") or c.get("n_max")) if c else None)
    blocks += denoised_smoothing(inputs)
    blocks += [Heading("Figures"), *figures, *attack]
    return blocks + settings_blocks(inputs)


def write_report(inputs: ReportInputs, out: Path) -> None:
    """Write out/figures/*.png|svg, out/report.md and out/report.html."""
    figures = make_figures(inputs, out)
    blocks = build(inputs, figures, attack_blocks(inputs, out))
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, TITLE, out))


# -- reading what the stages wrote ------------------------------------------------------------------------------

def read_settings(paths: dict[str, Path]) -> tuple[dict[str, dict], list[str]]:
    """The settings.json files that exist (by label), and the paths of those that do not."""
    found, missing = {}, []
    for label, path in paths.items():
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            found[label] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
    return found, missing


def read_attack_section(folder: Path) -> list[Block]:
    """The section `dmae attack` wrote (attack.json), with every figure it names checked to exist."""
    path = folder / "attack.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (run `dmae attack --out {folder}` first, or leave out --attack-results)")
    try:
        blocks = from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a report section written by `dmae attack`: {exc}") from None
    for figure in (b for b in blocks if isinstance(b, Figure)):
        if not (folder / figure.path).is_file():
            raise UserError(f"{folder / figure.path}: figure of {path} not found")
    return blocks


def build_report(*, dataset: str, radii: list[float], certifications: dict[float, Path],
                 settings_files: dict[str, Path], pretrain_results: Path, finetune_results: dict[float, Path],
                 attack_results: Path | None, out: Path,
                 chains: dict[str, tuple[dict, dict[float, Path]]] | None = None, chain_every: int = 1) -> None:
    """The report stage: read every sigma's certification (the chains' `{name: (spec, {sigma: TSV})}`, and the
    attack section), check them all before anything is written, then write OUT/metrics.json, OUT/headline.json
    (DVC metrics), OUT/curves.tsv (a DVC plot), OUT/figures/,
    OUT/report.md and OUT/report.html."""
    summary = Summary.of(load_runs(certifications), radii)
    chain_runs = [Chain(name, spec["denoiser"], spec["classifier"], spec["fine_tuned"], load_runs(tsvs))
                  for name, (spec, tsvs) in (chains or {}).items()]
    attack = read_attack_section(attack_results) if attack_results else None
    settings, missing = read_settings(settings_files)
    pretrain_tsv = pretrain_results / "metrics.tsv"
    finetune_tsvs = {s: folder / "metrics.tsv" for s, folder in finetune_results.items()}
    reconstructions = pretrain_results / "reconstructions.png"
    inputs = ReportInputs(
        summary=summary,
        dataset=dataset,
        settings=settings,
        missing_settings=missing,
        pretrain_metrics=read_metrics_tsv(pretrain_tsv, PRETRAIN_COLUMNS) if pretrain_tsv.is_file() else None,
        finetune_metrics={s: read_metrics_tsv(p, FINETUNE_COLUMNS) for s, p in finetune_tsvs.items() if p.is_file()},
        reconstructions=reconstructions if reconstructions.is_file() else None,
        attack=attack,
        attack_root=attack_results,
        chains=chain_runs,
        chain_every=chain_every,
    )
    details = certification_metrics(summary)
    headline = headline_metrics(details, attack_results)
    if chain_runs:
        headline["denoised_smoothing"] = {c.name: {radius_key(r): round(b.accuracy, 6) for r, b in
                                                   zip(summary.radii, best_over_sigma(c.runs, summary.radii))}
                                          for c in chain_runs}  # reads the attack metrics: before anything is written
    write_json(out / "metrics.json", details)
    write_json(out / "headline.json", headline)
    rows, columns = curve_rows(summary)
    write_tsv(out / "curves.tsv", rows, columns)
    write_report(inputs, out)


def headline_metrics(certification: dict, attack_results: Path | None) -> dict:
    """The few numbers `dvc exp show` compares (DVC metrics): certified accuracy at each report radius at the best
    sigma, the best ACR and, from the attack stage, each classifier's worst-case robust accuracy (the lowest over
    its attacks, mean over noise draws) at its best test sigma and its AutoAttack accuracy wherever it ran
    ({classifier: {sigma-S: {version: accuracy}}})."""
    out = {"certified_accuracy": certification["certified_accuracy"], "acr": certification["acr"]}
    if attack_results:
        path = attack_results / "metrics.json"
        if not path.is_file():
            raise UserError(f"{path}: not found (run `dmae attack --out {attack_results}` first)")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        out["robust_accuracy"] = {name: max(columns["worst_attack"] for columns in by_sigma.values())
                                  for name, by_sigma in rows.items()}
        autoattack = {name: {sigma: columns["autoattack"] for sigma, columns in by_sigma.items()
                             if columns.get("autoattack")}
                      for name, by_sigma in rows.items()}
        if any(autoattack.values()):
            out["autoattack"] = {name: by_sigma for name, by_sigma in autoattack.items() if by_sigma}
    return out
