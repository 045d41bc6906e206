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
from stages import paths
from stages.common import PARAMS_OPTION, discard_state, resolved, setup, state_path, user_errors, write_settings


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
    cfg, sigma_max = params.defense_finetune(), params.defense.train_sigma_max
    denoiser, norm_pix_loss = None, True
    if spec.input == "denoised":
        model_cfg = params.model.config(read_meta(data))
        denoiser = load_autoencoder(paths.pretrained(spec.denoiser, models), model_cfg).to(device)
        norm_pix_loss = params.denoiser_settings(spec.denoiser).norm_pix_loss
    pretrained = {name: params.denoiser_settings(name).model_dump(mode="json")
                  for name in {spec.encoder, spec.denoiser} - {None}}
    settings = {**resolved(params, ["data", "model"]), "finetune": cfg.model_dump(mode="json"),
                "classifier": {"name": classifier, **spec.model_dump(mode="json")}, "train_sigma_max": sigma_max,
                "pretrained": pretrained}
    out = out or paths.defense_classifier(classifier)
    state = state_path("finetune", settings)
    finetune_classifier(cfg, params.model, DefenseInputs(spec.input, sigma_max, denoiser, norm_pix_loss), data,
                        pretrained=paths.pretrained(spec.encoder, models), out=out,
                        results=results or paths.defense_results(classifier), device=device, state_path=state,
                        workers=runtime.workers, progress=runtime.progress)
    if dist.is_main():
        write_settings(out / "settings.json", settings)
        discard_state(state)
