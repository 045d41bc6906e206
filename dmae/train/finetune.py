"""Fine-tuning of a classifier on what it will see at test time: the step the training loop runs, and the stage.

The inputs are an object (`Inputs`): for a smoothed classifier, `NoisyInputs` (m copies of each image noised at
the certification sigma, unclamped; m > 1 for consistency regularization); for a De^3 classifier,
dmae.defense.chain.DefenseInputs (clean, noisy or denoised images). Each step turns the clean batch into those
inputs, then mixup/cutmix, then the loss; AdamW steps it (full fine-tuning), or LARS (the linear probe, as MAE).
Model selection never looks at the test set: the last epoch is kept; held-out validation accuracy (clean and on
one draw of the inputs) is reported per epoch, NaN when there is no held-out split (data.val_fraction 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmae.data import load_split, read_meta
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import encoder_state_dict_from
from dmae.models.checkpoint import load_config, load_weights, save_weights
from dmae.models.classifier import Classifier
from dmae.settings import FinetuneSettings, ModelSettings, augment_options
from dmae.train.batches import MicroBatch
from dmae.train.loop import Schedule, Step, train
from dmae.train.losses import consistency_loss, soft_cross_entropy
from dmae.train.mixup import mix, soft_targets
from dmae.train.noise import add_noise, keyed_normal
from dmae.train.optim import param_groups
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from dmae.util.io import write_tsv
from dmae.util.precision import autocast
from dmae.util.progress import log
from dmae.util.seeding import derive_seed

COLUMNS = ["epoch", "train_loss", "val_clean_acc", "val_noisy_acc", "lr"]  # of the metrics file (a DVC plot)


class Inputs(Protocol):
    """How fine-tuning turns a batch of clean images [B, C, H, W] into what the classifier sees."""

    sigma: float  # the noise level that keys every draw (De^3: the largest level)
    copies: int  # views per image: m > 1 for consistency regularization
    label: str  # what they are, for logs and progress

    def __call__(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        """[copies, B, C, H, W]; the draws of image i come from keys[i]."""

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One view per image, [B, C, H, W], drawn from `generator` (for evaluation)."""


class NoisyInputs:
    """`copies` views of each image, each noised at sigma (the base classifier of a smoothed model)."""

    def __init__(self, sigma: float, copies: int = 1):
        self.sigma, self.copies, self.label = sigma, copies, f"σ={sigma}"

    def __call__(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        eps = keyed_normal(keys, (self.copies, *x.shape[1:]), x.device).transpose(0, 1)
        return add_noise(x.unsqueeze(0).expand(self.copies, *x.shape), self.sigma, eps=eps)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return add_noise(x, self.sigma, generator=generator)


def lars(groups: list[dict]) -> torch.optim.Optimizer:
    """MAE's linear-probe optimizer: LARS with momentum 0.9 and trust coefficient 0.001 (timm's Lars), the
    layer-wise adaptation on weight matrices only (biases take plain momentum steps), whatever the weight decay."""
    from timm.optim import Lars

    for group in groups:
        group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
    return Lars(groups, lr=0.0, momentum=0.9, trust_coeff=0.001)


@torch.inference_mode()
def validation_accuracy(model: Classifier, dataset: Dataset, inputs: Inputs, *, device: torch.device, seed: int,
                        batch_size: int = 256, precision: str = "fp32") -> dict[str, float]:
    """Held-out accuracy of the classifier on clean images and on one seeded draw of `inputs` (NaN without
    held-out images: data.val_fraction 0)."""
    if not len(dataset):
        return {"val_clean_acc": math.nan, "val_noisy_acc": math.nan}
    model.eval()
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, inputs.sigma, "eval"))
    correct_clean = correct_inputs = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            correct_clean += (model(x).argmax(-1) == y).sum().item()
            correct_inputs += (model(inputs.sample(x, gen)).argmax(-1) == y).sum().item()
        total += len(y)
    return {"val_clean_acc": correct_clean / total, "val_noisy_acc": correct_inputs / total}


class FinetuneStep(Step):
    """Inputs (keyed per sample), then mixup/cutmix, then cross-entropy or the consistency loss."""

    loss_column = "train_loss"

    def __init__(self, cfg: FinetuneSettings, inputs: Inputs, model: Classifier, val_set: Dataset,
                 device: torch.device):
        c = cfg.consistency
        if c.enabled and inputs.copies != c.m:
            raise ValueError(f"consistency regularization compares {c.m} views per image, the inputs give "
                             f"{inputs.copies}")
        self.cfg, self.inputs, self.num_classes, self.val_set, self.device = (
            cfg, inputs, model.num_classes, val_set, device)
        self.eta = c.eta[inputs.sigma] if c.enabled else None
        self.name = f"finetune {inputs.label}"
        self.seed = (cfg.seed, inputs.sigma)
        self.order_seed = derive_seed(*self.seed)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, num_layers=model.cfg.arch.depth)
        if cfg.mode == "linear_probe":
            return lars(groups)
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=True)

    def start_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng(derive_seed(*self.seed, epoch, "mix", dist.rank()))  # mixup draws

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        cfg, x = self.cfg, batch.x
        targets = soft_targets(batch.y, self.num_classes, cfg.label_smoothing)
        keys = [derive_seed(*self.seed, batch.epoch, batch.step, p) for p in batch.positions]
        views, targets = mix(self.inputs(x, keys), targets, cfg.mixup, cfg.cutmix, self.rng)
        logits = model(views.flatten(0, 1)).view(self.inputs.copies, x.shape[0], -1)
        if self.eta is not None:
            return consistency_loss(logits, targets, cfg.consistency.lam, self.eta)["loss"]
        return soft_cross_entropy(logits[0], targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return validation_accuracy(model, self.val_set, self.inputs, device=self.device, seed=self.cfg.seed,
                                   precision=self.cfg.precision)


def finetune(model: Classifier, train_set: Dataset, val_set: Dataset, inputs: Inputs, cfg: FinetuneSettings, *,
             device: torch.device, state_path: Path, workers: int = 0, progress: bool = True,
             on_epoch=None) -> list[dict]:
    """Train `model` in place on `inputs` for cfg.epochs_at(inputs.sigma) epochs; one metrics row per epoch.

    Under torchrun the global batch is split over processes; the draws are keyed by sample position, so they
    match a single-process run. Drop path and mixup pairs are drawn per process, so with those on, N processes
    train equivalently but not bit-identically.
    """
    step = FinetuneStep(cfg, inputs, model, val_set, device)
    if not len(val_set):
        log(f"{step.name}: no held-out split (data.val_fraction 0): the val_* metrics are NaN")
    schedule = Schedule.of("finetune", cfg, cfg.epochs_at(inputs.sigma))
    return train(model, train_set, step, schedule, device=device, state_path=state_path, workers=workers,
                 progress=progress, on_epoch=on_epoch)


def noisy_inputs(cfg: FinetuneSettings, sigma: float) -> NoisyInputs:
    """The inputs of the smoothed classifier's fine-tuning at sigma: m copies with consistency regularization."""
    return NoisyInputs(sigma, cfg.consistency.m if cfg.consistency.enabled else 1)


def finetune_classifier(cfg: FinetuneSettings, model_settings: ModelSettings, inputs: Inputs, data: Path, *,
                        pretrained: Path, out: Path, results: Path, device: torch.device, state_path: Path,
                        workers: int = 0, progress: bool = True) -> None:
    """The fine-tuning stages: build the classifier (from the `pretrained` encoder unless cfg.init is scratch),
    fine-tune it on `inputs`, write OUT/model.safetensors + config.json and RESULTS/metrics.tsv (per epoch:
    training loss, held-out clean and input accuracy). Only rank 0 writes."""
    meta = read_meta(data)
    model_cfg = model_settings.config(meta)
    torch.manual_seed(cfg.seed)
    model = Classifier(model_cfg, meta["num_classes"], cfg.mode, drop_path=cfg.drop_path)
    if cfg.init == "pretrained":
        pre_cfg = ModelConfig.from_dict(load_config(pretrained))
        if pre_cfg != model_cfg:
            raise UserError(f"{pretrained}: pretrained for {pre_cfg}, params ask for {model_cfg}; rerun pretrain")
        model.load_encoder(encoder_state_dict_from(load_weights(pretrained)), source=str(pretrained))

    train_set, val_set = load_split(data, "train", augment=augment_options(cfg.augment)), load_split(data, "val")
    rows: list[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        write_tsv(results / "metrics.tsv", rows, COLUMNS)

    history = finetune(model, train_set, val_set, inputs, cfg, device=device, state_path=state_path,
                       workers=workers, progress=progress, on_epoch=on_epoch)
    if dist.is_main():
        write_tsv(results / "metrics.tsv", history, COLUMNS)  # every epoch, also those before a resume
        save_weights(out, model.state_dict(), model.config())
