"""Pretraining of the three pretext tasks (DMAE, NIM, MAE): the step the training loop runs, and the stage.

Determinism: the data order and every corruption draw are keyed by (seed, epoch, step, position in the global
batch), so a resumed run continues exactly as the uninterrupted one, and 1 or N processes (torchrun) train on
the same corrupted batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmae.data import load_split, read_meta
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.checkpoint import save_weights
from dmae.models.imports import init_from_checkpoint
from dmae.settings import ModelSettings, PretrainSettings, augment_options
from dmae.train.batches import MicroBatch
from dmae.train.loop import Schedule, Step, train
from dmae.train.noise import add_noise, keyed_normal, sample_sigma
from dmae.train.optim import param_groups
from dmae.util import distributed as dist
from dmae.util.figures import image_grid
from dmae.util.io import write_tsv
from dmae.util.seeding import derive_seed

COLUMNS = ["epoch", "loss", "lr"]  # of the metrics file (a DVC plot)


def corruption(cfg: PretrainSettings, step_key: tuple, positions: range, shape: tuple[int, ...],
               num_patches: int, device: torch.device):
    """Noise levels, pixel noise and masking draws of the samples at `positions` of one optimizer step.

    All three depend only on (step_key, position): the same global batch is corrupted the same way whatever the
    accumulation steps and process count. Levels and masking draws are made for the whole global batch (cheap)
    and sliced; pixel noise is drawn per sample.
    """
    sl = slice(positions.start, positions.stop)
    sigma = sample_sigma(cfg.noise, cfg.batch_size, np.random.default_rng(derive_seed(*step_key, "sigma")))
    eps = keyed_normal([derive_seed(*step_key, "pixel", p) for p in positions], shape, device)
    mask_gen = torch.Generator().manual_seed(derive_seed(*step_key, "mask"))
    mask_noise = torch.rand(cfg.batch_size, num_patches, generator=mask_gen)[sl]
    return sigma[sl].to(device), eps, mask_noise.to(device)


class PretrainStep(Step):
    """Corrupt the clean batch as keyed (noise, masking), reconstruct, compare with the clean image."""

    name = "pretrain"

    def __init__(self, cfg: PretrainSettings, model: DenoisingMAE, image_shape: tuple[int, ...]):
        self.cfg, self.num_patches, self.image_shape = cfg, model.cfg.num_patches, image_shape
        self.seed, self.order_seed = (cfg.seed,), cfg.seed

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=0.0, betas=(0.9, 0.95),
                                 fused=True)  # one kernel per tensor: 4.5x the foreach step on this CPU

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        cfg, clean = self.cfg, batch.x
        sigma, eps, mask_noise = corruption(cfg, (cfg.seed, batch.epoch, batch.step), batch.positions,
                                            self.image_shape, self.num_patches, clean.device)
        noisy = add_noise(clean, sigma, eps=eps) if cfg.noise.dist != "none" else clean
        loss, _, _ = model(clean, noisy, cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                           masked_only=cfg.task == "mae", mask_noise=mask_noise)
        return loss


def pretrain(model: DenoisingMAE, train_set, cfg: PretrainSettings, *, device: torch.device, state_path: Path,
             workers: int = 0, progress: bool = True, on_epoch=None) -> list[dict]:
    """Train `model` in place with the training loop; returns one metrics row per epoch (epoch, loss, lr)."""
    step = PretrainStep(cfg, model, tuple(train_set[0][0].shape))
    return train(model, train_set, step, Schedule.of("pretrain", cfg, cfg.epochs), device=device,
                 state_path=state_path, workers=workers, progress=progress, on_epoch=on_epoch)


def pretrain_autoencoder(cfg: PretrainSettings, model_settings: ModelSettings, data: Path, *, out: Path,
                         results: Path, device: torch.device, state_path: Path, workers: int = 0,
                         progress: bool = True) -> None:
    """The pretrain stage: pretrain on the prepared training split (or take `cfg.init_from` as it is when
    cfg.epochs is 0), then write OUT/model.safetensors + config.json, RESULTS/metrics.tsv (the loss curve grows
    epoch by epoch, so a long run can be watched) and RESULTS/reconstructions.png|svg. Only rank 0 writes."""
    meta = read_meta(data)
    model_cfg = model_settings.config(meta)
    train_set = load_split(data, "train", augment=augment_options(cfg.augment))
    torch.manual_seed(cfg.seed)  # weight init
    model = DenoisingMAE(model_cfg)
    if cfg.init_from:
        init_from_checkpoint(model, cfg.init_from)

    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_tsv(results / "metrics.tsv", rows, COLUMNS)

    history = []
    if cfg.epochs:
        history = pretrain(model, train_set, cfg, device=device, state_path=state_path, workers=workers,
                           progress=progress, on_epoch=on_epoch)
    model.to(device)
    if not dist.is_main():
        return
    write_tsv(results / "metrics.tsv", history, COLUMNS)  # every epoch, also those before a resume
    save_weights(out, model.state_dict(), {"kind": "autoencoder", **model_cfg.to_dict()})
    test = load_split(data, "test")
    clean = torch.stack([test[i][0] for i in range(min(8, len(test)))]).to(device)
    image_grid(reconstruction_examples(model, clean, cfg, cfg.seed), results / "reconstructions",
               title=f"{cfg.task.upper()} on held-out test images")


@torch.no_grad()
def reconstruction_examples(model: DenoisingMAE, clean: torch.Tensor, cfg: PretrainSettings,
                            seed: int) -> dict[str, torch.Tensor]:
    """Rows for the figure, at model size: the clean image; the training corruption (noise, masked patches
    grey) and its reconstruction; the noisy image without masking and its reconstruction (the denoiser a
    defense would use).

    With per-patch normalized targets the patch statistics come from the noisy input, as in
    DenoisingMAE.pred_to_image.
    """
    model.eval()
    torch.manual_seed(derive_seed(seed, "figure"))
    sigma = sample_sigma(cfg.noise, clean.shape[0], np.random.default_rng(derive_seed(seed, "figure"))).to(
        clean.device)
    noisy = add_noise(clean, sigma)
    rows = {"clean": model.input_adapter.resize(clean)}
    if cfg.mask_ratio > 0:
        _, pred, mask = model(clean, noisy, cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
        patches = model.patchify(model.input_adapter.resize(noisy))
        mask = mask.unsqueeze(-1)
        rows["noisy + masked"] = model.unpatchify(patches * (1 - mask) + 0.5 * mask)
        rows["reconstructed"] = model.pred_to_image(pred, noisy, cfg.norm_pix_loss, sigma)
    if cfg.noise.dist != "none":
        rows["noisy"] = model.input_adapter.resize(noisy)
        rows["denoised"] = model.input_adapter.resize(model.reconstruct(noisy, cfg.norm_pix_loss, sigma))
    return rows
