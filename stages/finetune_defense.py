"""`dmae finetune-defense`: fine-tune one classifier of the De^3 comparison (params defense.classifiers)."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae import distributed as dist
from dmae.datasets import read_meta
from dmae.defense import TrainingInputs, load_denoiser
from dmae.errors import UserError
from dmae.model import config_for
from dmae.settings import MAIN_DENOISER, DefendedClassifier, Params
from stages.common import PARAMS_OPTION, resolved, setup, user_errors
from stages.finetune import train_classifier


def pretrained_dir(models: Path, name: str) -> Path:
    """Folder of a pretrained model by name: 'dmae' is the `pretrain` output, others are defense.denoisers."""
    return models / "pretrain" if name == MAIN_DENOISER else models / "denoisers" / name


def classifier_spec(params: Params, name: str) -> DefendedClassifier:
    if name not in params.defense.classifiers:
        raise UserError(f"--classifier {name!r} is not a key of params defense.classifiers "
                        f"({', '.join(params.defense.classifiers)})")
    return params.defense.classifiers[name]


@user_errors
def main(
    classifier: str = typer.Option(..., help="Which classifier (a key of params defense.classifiers)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set."),
    models: Path = typer.Option(Path("models"), help="Models folder: pretrain/ and denoisers/NAME/ are read."),
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
    spec = classifier_spec(params, classifier)
    cfg, sigma_max = params.defense_finetune(), params.defense.train_sigma_max
    denoiser, norm_pix_loss = None, True
    if spec.input == "denoised":
        model_cfg = config_for(params.model, read_meta(data))
        denoiser = load_denoiser(pretrained_dir(models, spec.denoiser), model_cfg).to(device)
        norm_pix_loss = params.denoiser_settings(spec.denoiser).norm_pix_loss
    pretrained = {name: params.denoiser_settings(name).model_dump(mode="json")
                  for name in {spec.encoder, spec.denoiser} - {None}}
    settings = {**resolved(params, ["data", "model"]), "finetune": cfg.model_dump(mode="json"),
                "classifier": {"name": classifier, **spec.model_dump(mode="json")}, "train_sigma_max": sigma_max,
                "pretrained": pretrained}
    train_classifier(params, cfg, sigma_max, settings, runtime=runtime, device=device, data=data,
                     pretrained=pretrained_dir(models, spec.encoder),
                     out=out or Path(f"models/defense/{classifier}"),
                     results=results or Path(f"results/defense/{classifier}"),
                     inputs=TrainingInputs(spec.input, sigma_max, denoiser, norm_pix_loss))
