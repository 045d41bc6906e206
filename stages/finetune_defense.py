"""`dmae finetune-defense`: fine-tune one classifier of the De^3 comparison (params defense.classifiers)."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.data import read_meta
from dmae.defense.chain import DefenseInputs
from dmae.models.autoencoder import load_autoencoder
from dmae.train.finetune import finetune_classifier
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from stages import paths, resolved
from stages.common import PARAMS_OPTION, check_prepared, setup, user_errors, work_state, write_settings


@user_errors
def main(
    classifier: str = typer.Option(..., help="Which classifier (a key of params defense.classifiers)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: pretrain/ and denoisers/NAME/ are read."),
    out: Path = typer.Option(None, help="Classifier output folder [default: models/defense/CLASSIFIER]."),
    results: Path = typer.Option(None, help="Metrics folder [default: results/defense/CLASSIFIER]."),
) -> None:
    """Fine-tune from the classifier's `encoder` on clean, noisy or denoised images (its `input`).

    Noisy and denoised inputs are noised at sigma ~ U(0, defense.train_sigma_max) per image, and denoised by
    the classifier's frozen `denoiser`. Settings: `finetune` with defense.finetune's overrides. Writes
    OUT/model.safetensors + config.json + settings.json and RESULTS/metrics.tsv (held-out accuracy on clean
    images and on inputs prepared as in training).
    """
    params, runtime, device = setup(params_path)
    device = dist.init_from_env(device)
    if classifier not in params.defense.classifiers:
        raise UserError(f"--classifier {classifier!r} is not a key of params defense.classifiers "
                        f"({', '.join(params.defense.classifiers)})")
    spec = params.defense.classifiers[classifier]
    check_prepared(data, params)
    cfg, sigma_max = params.defense_finetune(), params.defense.train_sigma_max
    encoder = paths.pretrained(spec.encoder, models)
    denoiser_dir = paths.pretrained(spec.denoiser, models) if spec.input == "denoised" else None
    denoiser, norm_pix_loss, groups = None, True, 1
    if denoiser_dir:
        denoiser = load_autoencoder(denoiser_dir, params.model.config(read_meta(data))).to(device)
        how = params.denoiser_settings(spec.denoiser)
        norm_pix_loss, groups = how.norm_pix_loss, how.reconstruct_groups
    settings = resolved.finetune_defense(params, classifier)
    out = out or paths.defense_classifier(classifier)
    read = [data, encoder] + ([denoiser_dir] if denoiser_dir else [])
    inputs = DefenseInputs(spec.input, sigma_max, denoiser, norm_pix_loss, groups=groups)
    with work_state("finetune", out, settings, read) as state:
        finetune_classifier(cfg, params.model, inputs, data, pretrained=encoder, out=out,
                            results=results or paths.defense_results(classifier), device=device,
                            state_path=state.path("state.pt"), workers=runtime.workers, progress=runtime.progress)
        if dist.is_main():
            write_settings(out / "settings.json", settings)
        state.finish()
