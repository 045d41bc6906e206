"""`dmae finetune`: fine-tune the pretrained encoder as the base classifier of a smoothed model at one sigma."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from dmae import distributed as dist
from dmae.checkpoint import load_config, load_weights, save_weights
from dmae.classifier import Classifier
from dmae.datasets import load_split, read_meta
from dmae.defense import TrainingInputs
from dmae.errors import UserError
from dmae.finetune import finetune
from dmae.io import write_tsv
from dmae.model import ModelConfig, config_for, encoder_state_dict_from
from dmae.settings import FinetuneSettings, Params, Runtime
from stages.common import PARAMS_OPTION, resolved, setup, state_path, user_errors, write_settings

SECTIONS = ["data", "model", "finetune"]
COLUMNS = ["epoch", "train_loss", "val_clean_acc", "val_noisy_acc", "lr"]


def check_sigma(sigma: float, sigmas: list[float]) -> None:
    if sigma not in sigmas:
        raise UserError(f"--sigma {sigma} is not one of params sigmas {sigmas}")


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level of this fine-tuning run (one of params `sigmas`)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set."),
    pretrained: Path = typer.Option(Path("models/pretrain"), help="Pretrained autoencoder (unused if init: scratch)."),
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
    out = out or Path(f"models/finetune/sigma-{sigma}")
    results = results or Path(f"results/finetune/sigma-{sigma}")
    train_classifier(params, params.finetune, sigma, resolved(params, SECTIONS, sigma=sigma), runtime=runtime,
                     device=device, data=data, pretrained=pretrained, out=out, results=results)


def train_classifier(params: Params, cfg: FinetuneSettings, sigma: float, settings: dict, *, runtime: Runtime,
                     device: torch.device, data: Path, pretrained: Path, out: Path, results: Path,
                     inputs: TrainingInputs | None = None) -> None:
    """Build the classifier (from the `pretrained` encoder unless init: scratch), fine-tune it at sigma (or on
    De^3 `inputs`), write OUT and RESULTS/metrics.tsv; `settings` are written beside it and key the resume file."""
    meta = read_meta(data)
    model_cfg = config_for(params.model, meta)

    torch.manual_seed(cfg.seed)
    model = Classifier(model_cfg, meta["num_classes"], cfg.mode, drop_path=cfg.drop_path)
    if cfg.init == "pretrained":
        pre_cfg = ModelConfig.from_dict(load_config(pretrained))
        if pre_cfg != model_cfg:
            raise UserError(f"{pretrained}: pretrained for {pre_cfg}, params ask for {model_cfg}; rerun pretrain")
        model.load_encoder(encoder_state_dict_from(load_weights(pretrained)), source=str(pretrained))

    train, val = load_split(data, "train", augment=cfg.augment), load_split(data, "val")
    resume = state_path("finetune", settings)
    history: list[dict] = []

    def on_epoch(row: dict) -> None:
        history.append(row)
        write_tsv(results / "metrics.tsv", history, COLUMNS)

    full_history = finetune(model, train, val, sigma, cfg, device=device, state_path=resume,
                            workers=runtime.workers, progress=runtime.progress, on_epoch=on_epoch, inputs=inputs)
    if not dist.is_main():
        return
    write_tsv(results / "metrics.tsv", full_history, COLUMNS)  # every epoch, also those before a resume
    save_weights(out, model.state_dict(), model.config())
    write_settings(out / "settings.json", settings)
    shutil.rmtree(resume.parent, ignore_errors=True)
