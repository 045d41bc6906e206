"""`dmae report`: certified accuracy tables, ACR, figures and the HTML/Markdown report from all sigmas."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dmae.document import Block, Figure, from_json
from dmae.errors import UserError
from dmae.io import write_json, write_tsv
from dmae.report import Summary, certify_paths, curve_rows, load_runs, metrics
from dmae.report_figures import FINETUNE_COLUMNS, PRETRAIN_COLUMNS, read_metrics_tsv
from dmae.report_render import ReportInputs, write_report
from stages.common import PARAMS_OPTION, setup, user_errors


def _read_settings(paths: dict[str, Path]) -> tuple[dict[str, dict], list[str]]:
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


def _read_attack_section(folder: Path) -> list[Block]:
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


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    certify_dir: Path = typer.Option(Path("results/certify"), help="Certification TSVs, one per sigma."),
    pretrain_results: Path = typer.Option(Path("results/pretrain"), help="Pretraining loss and figure."),
    finetune_results: Path = typer.Option(Path("results/finetune"), help="Fine-tuning metrics, sigma-*/."),
    models: Path = typer.Option(Path("models"), help="Models folder (its settings.json files are reported)."),
    attack_results: Path = typer.Option(
        None, help="The attack stage's folder: its section (attack.json) and figures are included."),
    out: Path = typer.Option(Path("results/report"), help="Where the report goes."),
) -> None:
    """Summarize the certification of every sigma in params `sigmas` at the radii of params report.radii,
    and with --attack-results the De^3 robustness evaluation.

    Writes OUT/metrics.json (DVC metrics), OUT/curves.tsv (certified accuracy against radius: a DVC plot),
    OUT/figures/, OUT/report.md and a self-contained OUT/report.html.
    """
    params, _, _ = setup(params_path)
    sigmas = sorted(params.sigmas)
    runs = load_runs(certify_paths(certify_dir, sigmas))  # every sigma of params, never a glob
    summary = Summary.of(runs, params.report.radii)
    attack = _read_attack_section(attack_results) if attack_results else None

    settings, missing = _read_settings({
        "pretrain": models / "pretrain" / "settings.json",
        **{f"finetune σ={s:g}": models / "finetune" / f"sigma-{s}" / "settings.json" for s in sigmas},
        **{f"certify σ={s:g}": certify_dir / f"sigma-{s}.settings.json" for s in sigmas},
        **({"attack": attack_results / "settings.json"} if attack_results else {}),
    })
    pretrain_tsv = pretrain_results / "metrics.tsv"
    finetune_tsvs = {s: finetune_results / f"sigma-{s}" / "metrics.tsv" for s in sigmas}
    reconstructions = pretrain_results / "reconstructions.png"
    inputs = ReportInputs(
        summary=summary,
        dataset=params.data.dataset,
        settings=settings,
        missing_settings=missing,
        pretrain_metrics=read_metrics_tsv(pretrain_tsv, PRETRAIN_COLUMNS) if pretrain_tsv.is_file() else None,
        finetune_metrics={s: read_metrics_tsv(p, FINETUNE_COLUMNS) for s, p in finetune_tsvs.items() if p.is_file()},
        reconstructions=reconstructions if reconstructions.is_file() else None,
        attack=attack,
        attack_root=attack_results,
    )

    write_json(out / "metrics.json", metrics(summary))
    rows, columns = curve_rows(summary)
    write_tsv(out / "curves.tsv", rows, columns)
    write_report(inputs, out)
