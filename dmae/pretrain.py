"""The pretraining loop of the three pretext tasks (DMAE, NIM, MAE), resumable at epoch boundaries.

Determinism: every epoch reseeds the global RNG and the data order from (seed, epoch, rank), so a run resumed
from the checkpoint of epoch e continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from dmae.checkpoint import checkpoint_training, resume_training
from dmae.model import DenoisingMAE
from dmae.noise import add_noise, sample_sigma
from dmae.optim import lr_at, param_groups, set_lr
from dmae.precision import autocast
from dmae.progress import console, progress_bar
from dmae.seeding import derive_seed
from dmae.settings import PretrainSettings


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, workers: int) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch); incomplete last batch dropped."""
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, "order"))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=workers,
                      drop_last=True)


def pretrain(model: DenoisingMAE, train_set: Dataset, cfg: PretrainSettings, *, device: torch.device,
             state_path: Path, workers: int = 0, progress: bool = True,
             on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place; returns one metrics row per epoch. Resumes from `state_path` when present.

    `cfg.batch_size` is the effective batch, reached with `accum_steps` micro-batches per optimizer step.
    `on_epoch(row)` runs after each epoch's checkpoint is saved.
    """
    micro = cfg.batch_size // cfg.accum_steps
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"pretrain.batch_size {cfg.batch_size} exceeds the {len(train_set)} training images")

    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=(0.9, 0.95))
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    done, history = resume_training(state_path, model, optimizer)
    if done:
        console.log(f"resuming pretraining after epoch {done} from {state_path}")

    masked_only = cfg.task == "mae"
    with progress_bar(progress, unit="img") as bar:
        task = bar.add_task("pretrain", total=(cfg.epochs - done) * steps_per_epoch * cfg.batch_size,
                            status="")
        for epoch in range(done, cfg.epochs):
            torch.manual_seed(derive_seed(cfg.seed, epoch))
            model.train()
            t0, loss_sum, batches = time.perf_counter(), 0.0, 0
            data_iter = iter(epoch_loader(train_set, micro, cfg.seed, epoch, workers))
            for step in range(steps_per_epoch):
                lr = lr_at(epoch * steps_per_epoch + step, total, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                for _ in range(cfg.accum_steps):
                    clean, _ = next(data_iter)
                    clean = clean.to(device, non_blocking=True)
                    sigma = sample_sigma(cfg.noise, clean.shape[0], device)
                    noisy = add_noise(clean, sigma) if cfg.noise.dist != "none" else clean
                    with autocast(device, cfg.precision):
                        loss, _, _ = model(clean, noisy, cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                                               masked_only=masked_only)
                        (loss / cfg.accum_steps).backward()
                    loss_sum += loss.item()
                    batches += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(task, advance=cfg.batch_size,
                           status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / batches:.4f}")
            row = {"epoch": epoch + 1, "loss": loss_sum / batches, "lr": lr}
            history.append(row)
            checkpoint_training(state_path, model, optimizer, epoch + 1, history)
            console.log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} "
                        f"({time.perf_counter() - t0:.1f} s)")
            if on_epoch:
                on_epoch(row)
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
    sigma = sample_sigma(cfg.noise, clean.shape[0], clean.device)
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
