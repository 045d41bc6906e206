"""Noise fine-tuning of the base classifier at one certification sigma, resumable at epoch boundaries.

Each step adds Gaussian noise at sigma to the [0,1] inputs (unclamped; m copies when consistency
regularization is on), then mixup/cutmix, then the loss. Model selection never looks at the test set: the last
epoch is kept; held-out validation accuracy (clean and under noise) is reported per epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dmae.checkpoint import checkpoint_training, resume_training
from dmae.classifier import Classifier
from dmae.losses import consistency_loss, soft_cross_entropy
from dmae.mixup import mix, soft_targets
from dmae.noise import add_noise
from dmae.optim import lr_at, param_groups, set_lr
from dmae.precision import autocast
from dmae.pretrain import epoch_loader
from dmae.progress import console, progress_bar
from dmae.seeding import derive_seed
from dmae.settings import FinetuneSettings


def training_loss(model: Classifier, x: torch.Tensor, y: torch.Tensor, sigma: float, cfg: FinetuneSettings,
                  rng: np.random.Generator) -> torch.Tensor:
    """One batch's loss: noise (m copies with consistency regularization), then mixup/cutmix, then the loss."""
    c = cfg.consistency
    m = c.m if c.enabled else 1
    targets = soft_targets(y, model.num_classes, cfg.label_smoothing)
    noisy = add_noise(x.unsqueeze(0).expand(m, *x.shape), sigma)
    noisy, targets = mix(noisy, targets, cfg.mixup, cfg.cutmix, rng)
    logits = model(noisy.flatten(0, 1)).view(m, x.shape[0], -1)
    if c.enabled:
        return consistency_loss(logits, targets, c.lam, c.eta[sigma])["loss"]
    return soft_cross_entropy(logits[0], targets)


@torch.inference_mode()
def evaluate(model: Classifier, dataset: Dataset, sigma: float, *, device: torch.device, seed: int,
             batch_size: int = 256, precision: str = "fp32") -> dict[str, float]:
    """Accuracy of the base classifier on clean inputs and on one seeded noisy draw at sigma."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, sigma, "eval"))
    correct_clean = correct_noisy = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            correct_clean += (model(x).argmax(-1) == y).sum().item()
            correct_noisy += (model(add_noise(x, sigma, generator=gen)).argmax(-1) == y).sum().item()
        total += len(y)
    return {"clean_acc": correct_clean / total, "noisy_acc": correct_noisy / total}


def finetune(model: Classifier, train_set: Dataset, val_set: Dataset, sigma: float, cfg: FinetuneSettings, *,
             device: torch.device, state_path: Path, workers: int = 0, progress: bool = True,
             on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place at noise level sigma; returns one metrics row per epoch."""
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} exceeds the {len(train_set)} training images")
    model.to(device)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, num_layers=model.cfg.arch.depth)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    done, history = resume_training(state_path, model, optimizer)
    if done:
        console.log(f"resuming fine-tuning (sigma {sigma}) after epoch {done} from {state_path}")
    with progress_bar(progress, unit="img") as bar:
        task = bar.add_task(f"finetune σ={sigma}", total=(cfg.epochs - done) * steps_per_epoch * cfg.batch_size,
                            status="")
        for epoch in range(done, cfg.epochs):
            torch.manual_seed(derive_seed(cfg.seed, sigma, epoch))
            rng = np.random.default_rng(derive_seed(cfg.seed, sigma, epoch, "mix"))
            model.train()
            t0, loss_sum = time.perf_counter(), 0.0
            loader = epoch_loader(train_set, cfg.batch_size, derive_seed(cfg.seed, sigma), epoch, workers)
            for step, (x, y) in enumerate(loader):
                lr = lr_at(epoch * steps_per_epoch + step, total, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    loss = training_loss(model, x, y, sigma, cfg, rng)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item()
                bar.update(task, advance=cfg.batch_size,
                           status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / (step + 1):.4f}")
            val = evaluate(model, val_set, sigma, device=device, seed=cfg.seed, precision=cfg.precision)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch,
                   "val_clean_acc": val["clean_acc"], "val_noisy_acc": val["noisy_acc"], "lr": lr}
            history.append(row)
            checkpoint_training(state_path, model, optimizer, epoch + 1, history)
            console.log(f"finetune σ={sigma} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
                        f"val clean {row['val_clean_acc']:.3f}, noisy {row['val_noisy_acc']:.3f} "
                        f"({time.perf_counter() - t0:.1f} s)")
            if on_epoch:
                on_epoch(row)
    return history
