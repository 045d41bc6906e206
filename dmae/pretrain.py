"""The pretraining loop of the three pretext tasks (DMAE, NIM, MAE), resumable at epoch boundaries.

Determinism: the data order and every corruption draw are keyed by (seed, epoch, step, position in the global
batch), so a run resumed from the checkpoint of epoch e continues exactly as the uninterrupted run would have,
and 1 or N processes (torchrun) train on the same corrupted batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from dmae import distributed as dist
from dmae.batches import epoch_batches, micro_batch_size, steps_per_epoch
from dmae.checkpoint import checkpoint_training, resume_training
from dmae.model import DenoisingMAE
from dmae.noise import add_noise, keyed_normal, sample_sigma
from dmae.optim import lr_at, param_groups, set_lr
from dmae.precision import autocast
from dmae.progress import console, progress_bar
from dmae.seeding import derive_seed
from dmae.settings import PretrainSettings


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


def pretrain(model: DenoisingMAE, train_set: Dataset, cfg: PretrainSettings, *, device: torch.device,
             state_path: Path, workers: int = 0, progress: bool = True,
             on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place; returns one metrics row per epoch. Resumes from `state_path` when present.

    `cfg.batch_size` is the global batch of an optimizer step, reached with `accum_steps` micro-batches per
    process (and split over processes under torchrun). `on_epoch(row)` runs on rank 0 after each epoch's
    checkpoint is saved.
    """
    steps = steps_per_epoch(train_set, cfg.batch_size, "pretrain")
    micro_batch_size(cfg.batch_size, cfg.accum_steps, "pretrain")
    model.to(device)
    ddp_model = dist.wrap(model, device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=(0.9, 0.95))
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    total, warmup = cfg.epochs * steps, cfg.warmup_epochs * steps
    shape = tuple(train_set[0][0].shape)

    done, history = resume_training(state_path, model, optimizer)
    if done:
        console.log(f"resuming pretraining after epoch {done} from {state_path}")
    masked_only = cfg.task == "mae"
    with progress_bar(progress and dist.is_main(), unit="img") as bar:
        task = bar.add_task("pretrain", total=(cfg.epochs - done) * steps * cfg.batch_size, status="")
        for epoch in range(done, cfg.epochs):
            torch.manual_seed(derive_seed(cfg.seed, epoch, dist.rank()))
            ddp_model.train()
            t0, loss_sum, count = time.perf_counter(), 0.0, 0
            for mb in epoch_batches(train_set, cfg.batch_size, cfg.accum_steps, cfg.seed, epoch, workers,
                                    "pretrain"):
                lr = lr_at(epoch * steps + mb.step, total, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                clean = mb.x.to(device, non_blocking=True)
                sigma, eps, mask_noise = corruption(cfg, (cfg.seed, epoch, mb.step), mb.positions, shape,
                                                    model.cfg.num_patches, device)
                noisy = add_noise(clean, sigma, eps=eps) if cfg.noise.dist != "none" else clean
                with dist.no_sync(ddp_model, mb.last), autocast(device, cfg.precision):
                    loss, _, _ = ddp_model(clean, noisy, cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                                           masked_only=masked_only, mask_noise=mask_noise)
                    (loss / cfg.accum_steps).backward()
                loss_sum, count = loss_sum + loss.item(), count + 1
                if mb.last:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    bar.update(task, advance=cfg.batch_size,
                               status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / count:.4f}")
            row = {"epoch": epoch + 1, "loss": dist.mean_over_ranks(loss_sum / count, device), "lr": lr}
            history.append(row)
            if dist.is_main():
                checkpoint_training(state_path, model, optimizer, epoch + 1, history)
                console.log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} "
                            f"({time.perf_counter() - t0:.1f} s)")
                if on_epoch:
                    on_epoch(row)
            dist.barrier()
    return history


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
