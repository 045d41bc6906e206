"""`dmae finetune`: fine-tune the pretrained encoder as the base classifier of a smoothed model at one sigma."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.train.finetune import finetune_classifier, noisy_inputs
from dmae.util import distributed as dist
from stages import paths, resolved
from stages.common import PARAMS_OPTION, check_prepared, check_sigma, setup, user_errors, work_state, write_settings


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level of this fine-tuning run (one of params `sigmas`)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set."),
    pretrained: Path = typer.Option(paths.PRETRAINED, help="Pretrained autoencoder (unused if init: scratch)."),
    out: Path = typer.Option(None, help="Classifier output folder [default: models/finetune/sigma-SIGMA]."),
    results: Path = typer.Option(None, help="Metrics folder [default: results/finetune/sigma-SIGMA]."),
) -> None:
    """Fine-tune at --sigma with noise augmentation (and consistency regularization, when enabled).

    Writes OUT/model.safetensors + config.json + settings.json and RESULTS/metrics.tsv (per epoch: train loss,
    held-out clean and noisy accuracy; a DVC plot). The last epoch is kept: the test set is never looked at.
    """
    params, runtime, device = setup(params_path)
    device = dist.init_from_env(device)
    check_sigma(sigma, params.sigmas)
    out, results = out or paths.finetuned(sigma), results or paths.finetune_results(sigma)
    check_prepared(data, params)
    settings = resolved.finetune(params, sigma)
    inputs = [data] + ([pretrained] if params.finetune.init == "pretrained" else [])
    with work_state("finetune", out, settings, inputs) as state:
        finetune_classifier(params.finetune, params.model, noisy_inputs(params.finetune, sigma), data,
                            pretrained=pretrained, out=out, results=results, device=device,
                            state_path=state.path("state.pt"), workers=runtime.workers, progress=runtime.progress)
        if dist.is_main():
            write_settings(out / "settings.json", settings)
        state.finish()
