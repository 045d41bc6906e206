"""`dmae pretrain`: pretrain the denoising masked autoencoder (DMAE, NIM or MAE by pretrain.task)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from dmae.checkpoint import load_weights, load_into, save_weights
from dmae.datasets import load_split, read_meta
from dmae.figures import image_grid
from dmae.io import write_tsv
from dmae.model import DenoisingMAE, config_for
from dmae.pretrain import pretrain, reconstruction_examples
from stages.common import PARAMS_OPTION, resolved, setup, state_path, user_errors, write_settings

SECTIONS = ["data", "model", "pretrain"]


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set (output of `dmae prepare`)."),
    out: Path = typer.Option(Path("models/pretrain"), help="Where the pretrained weights and config go."),
    results: Path = typer.Option(Path("results/pretrain"), help="Where the loss curve and figure go."),
) -> None:
    """Pretrain on the prepared training split; resumes after an interruption.

    Writes OUT/model.safetensors + config.json + settings.json, RESULTS/metrics.tsv (loss per epoch, a DVC
    plot) and RESULTS/reconstructions.png|svg (held-out images: clean / corrupted / reconstructed).
    """
    params, runtime, device = setup(params_path)
    cfg = params.pretrain
    meta = read_meta(data)
    model_cfg = config_for(params.model, meta)
    train = load_split(data, "train", augment=cfg.augment)
    settings = resolved(params, SECTIONS)
    resume = state_path("pretrain", settings)

    torch.manual_seed(cfg.seed)  # weight init
    model = DenoisingMAE(model_cfg)
    if cfg.init_from:
        load_into(model, load_weights(cfg.init_from), source=cfg.init_from)

    def write_metrics(_row: dict) -> None:
        write_tsv(results / "metrics.tsv", history_so_far(), ["epoch", "loss", "lr"])

    rows: list[dict] = []

    def history_so_far() -> list[dict]:
        return rows

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_metrics(row)

    history = pretrain(model, train, cfg, device=device, state_path=resume, workers=runtime.workers,
                       progress=runtime.progress, on_epoch=on_epoch)
    write_tsv(results / "metrics.tsv", history, ["epoch", "loss", "lr"])
    save_weights(out, model.state_dict(), {"kind": "autoencoder", **model_cfg.to_dict()})
    write_settings(out / "settings.json", settings)

    test = load_split(data, "test")
    clean = torch.stack([test[i][0] for i in range(min(8, len(test)))]).to(device)
    rows_ = reconstruction_examples(model, clean, cfg, cfg.seed)
    image_grid(rows_, results / "reconstructions", title=f"{cfg.task.upper()} on held-out test images")
    shutil.rmtree(resume.parent, ignore_errors=True)
