"""`dmae report`: certified accuracy tables, ACR, figures and the HTML/Markdown report from all sigmas."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.report.render import build_report
from dmae.settings import MAIN_DENOISER
from stages import paths, resolved
from stages.common import PARAMS_OPTION, setup, user_errors


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    certify_dir: Path = typer.Option(paths.CERTIFY_RESULTS, help="Certification TSVs, one per sigma."),
    pretrain_results: Path = typer.Option(paths.PRETRAIN_RESULTS, help="Pretraining loss and figure."),
    finetune_results: Path = typer.Option(Path("results/finetune"), help="Fine-tuning metrics, sigma-*/."),
    models: Path = typer.Option(paths.MODELS, help="Models folder (its settings.json files are reported)."),
    chain_dir: Path = typer.Option(paths.CHAIN_RESULTS, help="Certification TSVs of the chains, CHAIN/sigma-*.tsv."),
    attack_results: Path = typer.Option(
        None, help="The attack stage's folder: its section (attack.json) and figures are included."),
    out: Path = typer.Option(paths.REPORT, help="Where the report goes."),
) -> None:
    """Summarize the certification of every sigma in params `sigmas` at the radii of params report.radii,
    beside every chain of params denoised_smoothing, and with --attack-results the De^3 robustness evaluation.

    Writes OUT/metrics.json (DVC metrics), OUT/curves.tsv (certified accuracy against radius: a DVC plot),
    OUT/figures/, OUT/report.md and a self-contained OUT/report.html.
    """
    params, _, _ = setup(params_path)
    sigmas = sorted(params.sigmas)
    certifications = {s: paths.certification(s, certify_dir) for s in sigmas}  # every sigma of params, no glob
    settings_files = {
        "pretrain": paths.pretrained(MAIN_DENOISER, models) / "settings.json",
        **{f"finetune σ={s:g}": paths.finetuned(s, models) / "settings.json" for s in sigmas},
        **{f"certify σ={s:g}": certifications[s].with_suffix(".settings.json") for s in sigmas},
        **({"attack": attack_results / "settings.json"} if attack_results else {}),
    }
    chain_specs = resolved.report(params)["chains"]
    chains = {name: (spec, {s: paths.chain_certification(name, s, chain_dir) for s in sigmas})
              for name, spec in chain_specs.items()}
    build_report(dataset=params.data.dataset, radii=params.report.radii, certifications=certifications,
                 settings_files=settings_files, pretrain_results=pretrain_results,
                 finetune_results={s: paths.finetune_results(s, finetune_results) for s in sigmas},
                 attack_results=attack_results, out=out, chains=chains,
                 chain_every=params.denoised_smoothing.test_every)
