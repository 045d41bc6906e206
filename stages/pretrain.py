"""`dmae pretrain`: pretrain the denoising masked autoencoder (DMAE, NIM or MAE by pretrain.task)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from dmae import distributed as dist
from dmae.checkpoint import save_weights
from dmae.datasets import load_split, read_meta
from dmae.errors import UserError
from dmae.figures import image_grid
from dmae.import_checkpoint import init_from_checkpoint
from dmae.io import write_tsv
from dmae.model import DenoisingMAE, config_for
from dmae.pretrain import pretrain, reconstruction_examples
from stages.common import PARAMS_OPTION, resolved, setup, state_path, user_errors, write_settings

SECTIONS = ["data", "model", "pretrain"]


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set (output of `dmae prepare`)."),
    out: Path = typer.Option(None, help="Where the pretrained weights and config go [default: models/pretrain, "
                                        "or models/denoisers/VARIANT]."),
    results: Path = typer.Option(None, help="Where the loss curve and figure go [default: results/pretrain, or "
                                            "results/denoisers/VARIANT]."),
    variant: str = typer.Option(None, help="Pretrain the denoiser variant of this name (a key of params "
                                           "defense.denoisers): `pretrain` with the variant's overrides."),
) -> None:
    """Pretrain on the prepared training split; resumes after an interruption.

    Writes OUT/model.safetensors + config.json + settings.json, RESULTS/metrics.tsv (loss per epoch, a DVC
    plot) and RESULTS/reconstructions.png|svg (held-out images: clean / corrupted / reconstructed).
    With pretrain.epochs 0, OUT holds the pretrain.init_from weights as they are (a released model, say).
    """
    params, runtime, device = setup(params_path)
    device = dist.init_from_env(device)
    if variant is not None and variant not in params.defense.denoisers:
        raise UserError(f"--variant {variant!r} is not a key of params defense.denoisers "
                        f"({', '.join(params.defense.denoisers)})")
    cfg = params.denoiser_settings(variant) if variant else params.pretrain
    out = out or Path(f"models/denoisers/{variant}" if variant else "models/pretrain")
    results = results or Path(f"results/denoisers/{variant}" if variant else "results/pretrain")
    meta = read_meta(data)
    model_cfg = config_for(params.model, meta)
    train = load_split(data, "train", augment=cfg.augment)
    settings = resolved(params, SECTIONS)
    if variant:
        settings.update(pretrain=cfg.model_dump(mode="json"), variant=variant)
    resume = state_path("pretrain", settings)

    torch.manual_seed(cfg.seed)  # weight init
    model = DenoisingMAE(model_cfg)
    if cfg.init_from:
        init_from_checkpoint(model, cfg.init_from)

    rows: list[dict] = []

    def on_epoch(row: dict) -> None:  # the loss curve grows epoch by epoch, so a long run can be watched
        rows.append(row)
        write_tsv(results / "metrics.tsv", rows, ["epoch", "loss", "lr"])

    if cfg.epochs:
        history = pretrain(model, train, cfg, device=device, state_path=resume, workers=runtime.workers,
                           progress=runtime.progress, on_epoch=on_epoch)
    else:  # the init_from weights are the result, as they are
        history = []
        model.to(device)
    if not dist.is_main():
        return
    write_tsv(results / "metrics.tsv", history, ["epoch", "loss", "lr"])
    save_weights(out, model.state_dict(), {"kind": "autoencoder", **model_cfg.to_dict()})
    write_settings(out / "settings.json", settings)

    test = load_split(data, "test")
    clean = torch.stack([test[i][0] for i in range(min(8, len(test)))]).to(device)
    rows_ = reconstruction_examples(model, clean, cfg, cfg.seed)
    image_grid(rows_, results / "reconstructions", title=f"{cfg.task.upper()} on held-out test images")
    shutil.rmtree(resume.parent, ignore_errors=True)
