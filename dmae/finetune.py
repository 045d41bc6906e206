"""Noise fine-tuning of the base classifier at one certification sigma, resumable at epoch boundaries.

Each step adds Gaussian noise at sigma to the [0,1] inputs (unclamped; m copies when consistency
regularization is on), then mixup/cutmix, then the loss. A De^3 classifier is fine-tuned instead on one view
per image given by `dmae.defense.TrainingInputs` (clean, noisy or denoised). Model selection never looks at
the test set: the last epoch is kept; held-out validation accuracy (clean and under noise) is reported per epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dmae import distributed as dist
from dmae.batches import epoch_batches, micro_batch_size, steps_per_epoch
from dmae.checkpoint import checkpoint_training, resume_training
from dmae.classifier import Classifier
from dmae.defense import TrainingInputs, keyed_uniform
from dmae.losses import consistency_loss, soft_cross_entropy
from dmae.mixup import mix, soft_targets
from dmae.noise import add_noise, keyed_normal
from dmae.optim import lr_at, param_groups, set_lr
from dmae.precision import autocast
from dmae.progress import console, progress_bar
from dmae.seeding import derive_seed
from dmae.settings import FinetuneSettings


def training_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, cfg: FinetuneSettings,
                  rng: np.random.Generator, noise_keys: list[int], num_classes: int,
                  inputs: TrainingInputs | None = None) -> torch.Tensor:
    """One batch's loss: noise (m copies with consistency regularization), then mixup/cutmix, then the loss.

    The m noise draws of sample i come from a generator seeded with noise_keys[i]. `inputs` (De^3) replaces
    the noise at sigma: one view per image, its draws keyed the same way.
    """
    c = cfg.consistency
    m = c.m if c.enabled else 1
    targets = soft_targets(y, num_classes, cfg.label_smoothing)
    eps = keyed_normal(noise_keys, (m, *x.shape[1:]), x.device).transpose(0, 1)
    if inputs is None:
        noisy = add_noise(x.unsqueeze(0).expand(m, *x.shape), sigma, eps=eps)
    else:
        noisy = inputs(x, eps[0], keyed_uniform(noise_keys)).unsqueeze(0)
    noisy, targets = mix(noisy, targets, cfg.mixup, cfg.cutmix, rng)
    logits = model(noisy.flatten(0, 1)).view(m, x.shape[0], -1)
    if c.enabled:
        return consistency_loss(logits, targets, c.lam, c.eta[sigma])["loss"]
    return soft_cross_entropy(logits[0], targets)


@torch.inference_mode()
def evaluate(model: Classifier, dataset: Dataset, sigma: float, *, device: torch.device, seed: int,
             batch_size: int = 256, precision: str = "fp32",
             inputs: TrainingInputs | None = None) -> dict[str, float]:
    """Accuracy of the base classifier on clean inputs and on one seeded noisy draw at sigma (or of `inputs`)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, sigma, "eval"))
    correct_clean = correct_noisy = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            correct_clean += (model(x).argmax(-1) == y).sum().item()
            seen = add_noise(x, sigma, generator=gen) if inputs is None else inputs.sample(x, gen)
            correct_noisy += (model(seen).argmax(-1) == y).sum().item()
        total += len(y)
    return {"clean_acc": correct_clean / total, "noisy_acc": correct_noisy / total}


def finetune(model: Classifier, train_set: Dataset, val_set: Dataset, sigma: float, cfg: FinetuneSettings, *,
             device: torch.device, state_path: Path, workers: int = 0, progress: bool = True,
             on_epoch: Callable[[dict], None] | None = None, inputs: TrainingInputs | None = None) -> list[dict]:
    """Train `model` in place at noise level sigma (or on `inputs`); returns one metrics row per epoch.

    Under torchrun the global batch is split over processes; the noise is keyed by sample position, so it
    matches a single-process run. Drop path and mixup pairs are drawn per process, so with those on, N processes
    train equivalently but not bit-identically.
    """
    if inputs is not None and cfg.consistency.enabled:
        raise ValueError("De^3 inputs give one view per image: consistency regularization must be off")
    steps = steps_per_epoch(train_set, cfg.batch_size, "finetune")
    micro_batch_size(cfg.batch_size, cfg.accum_steps, "finetune")
    model.to(device)
    ddp_model = dist.wrap(model, device)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, num_layers=model.cfg.arch.depth)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    epochs = cfg.epochs_at(sigma)
    total, warmup = epochs * steps, cfg.warmup_epochs * steps

    done, history = resume_training(state_path, model, optimizer)
    if done:
        console.log(f"resuming fine-tuning (sigma {sigma}) after epoch {done} from {state_path}")
    with progress_bar(progress and dist.is_main(), unit="img") as bar:
        task = bar.add_task(f"finetune σ={sigma}", total=(epochs - done) * steps * cfg.batch_size, status="")
        for epoch in range(done, epochs):
            torch.manual_seed(derive_seed(cfg.seed, sigma, epoch, dist.rank()))
            rng = np.random.default_rng(derive_seed(cfg.seed, sigma, epoch, "mix", dist.rank()))
            ddp_model.train()
            t0, loss_sum, count = time.perf_counter(), 0.0, 0
            for mb in epoch_batches(train_set, cfg.batch_size, cfg.accum_steps, derive_seed(cfg.seed, sigma),
                                    epoch, workers, "finetune"):
                lr = lr_at(epoch * steps + mb.step, total, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                x, y = mb.x.to(device, non_blocking=True), mb.y.to(device, non_blocking=True)
                keys = [derive_seed(cfg.seed, sigma, epoch, mb.step, p) for p in mb.positions]
                with dist.no_sync(ddp_model, mb.last), autocast(device, cfg.precision):
                    loss = training_loss(ddp_model, x, y, sigma, cfg, rng, keys, model.num_classes, inputs)
                    (loss / cfg.accum_steps).backward()
                loss_sum, count = loss_sum + loss.item(), count + 1
                if mb.last:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    bar.update(task, advance=cfg.batch_size,
                               status=f"epoch {epoch + 1}/{epochs} loss {loss_sum / count:.4f}")
            val = evaluate(model, val_set, sigma, device=device, seed=cfg.seed, precision=cfg.precision,
                           inputs=inputs)
            row = {"epoch": epoch + 1, "train_loss": dist.mean_over_ranks(loss_sum / count, device),
                   "val_clean_acc": val["clean_acc"], "val_noisy_acc": val["noisy_acc"], "lr": lr}
            history.append(row)
            if dist.is_main():
                checkpoint_training(state_path, model, optimizer, epoch + 1, history)
                console.log(f"finetune σ={sigma} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}, "
                            f"val clean {row['val_clean_acc']:.3f}, noisy {row['val_noisy_acc']:.3f} "
                            f"({time.perf_counter() - t0:.1f} s)")
                if on_epoch:
                    on_epoch(row)
            dist.barrier()
    return history
