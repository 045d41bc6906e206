"""`dmae finetune-chain`: fine-tune the per_sigma classifier of denoised smoothing at one sigma."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.data import read_meta
from dmae.defense.chain import DefenseInputs
from dmae.models.autoencoder import load_autoencoder
from dmae.train.finetune import finetune_classifier
from dmae.util import distributed as dist
from stages import paths, resolved
from stages.common import (PARAMS_OPTION, check_prepared, check_sigma, setup, user_errors, work_state,
                           write_settings)


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level (one of params `sigmas`)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: pretrain/ and denoisers/NAME/ are read."),
    out: Path = typer.Option(None, help="Classifier output folder [default: models/chains/sigma-SIGMA]."),
    results: Path = typer.Option(None, help="Metrics folder [default: results/chain_finetune/sigma-SIGMA]."),
) -> None:
    """Fine-tune from denoised_smoothing.finetune.encoder on reconstructions, by the frozen
    denoised_smoothing.finetune.denoiser, of training images noised at exactly SIGMA: the classifier of the
    fine-tuned case of denoised smoothing. Settings: `finetune` with defense.finetune's overrides. Writes
    OUT/model.safetensors + config.json + settings.json and RESULTS/metrics.tsv.
    """
    params, runtime, device = setup(params_path)
    check_sigma(sigma, params.sigmas)
    device = dist.init_from_env(device)
    spec = params.denoised_smoothing.finetune
    check_prepared(data, params)
    encoder, denoiser_dir = paths.pretrained(spec.encoder, models), paths.pretrained(spec.denoiser, models)
    denoiser = load_autoencoder(denoiser_dir, params.model.config(read_meta(data))).to(device)
    how = params.denoiser_settings(spec.denoiser)
    inputs = DefenseInputs("denoised", sigma, denoiser, how.norm_pix_loss, fixed=True, groups=how.reconstruct_groups)
    settings = resolved.finetune_chain(params, sigma)
    out = out or paths.chain_classifier(sigma, models)
    with work_state("finetune", out, settings, [data, encoder, denoiser_dir]) as state:
        finetune_classifier(params.defense_finetune(), params.model, inputs, data, pretrained=encoder, out=out,
                            results=results or paths.chain_finetune_results(sigma), device=device,
                            state_path=state.path("state.pt"), workers=runtime.workers, progress=runtime.progress)
        if dist.is_main():
            write_settings(out / "settings.json", settings)
        state.finish()
