"""The one training loop: epochs of optimizer steps over keyed micro-batches, resumable at epoch boundaries.

Pretraining and fine-tuning (for smoothing and for De^3) differ only in their `Step`: the optimizer, how a
micro-batch becomes a loss, and what is measured after each epoch. The loop does the rest: data order,
accumulation over micro-batches and processes (DDP no_sync), the warm-up + cosine schedule, a checkpoint after
every epoch, resume, per-epoch metrics, progress and logs, and the stop on a non-finite loss.

Determinism: torch's global RNG is reseeded at every epoch from (step.seed, epoch, rank), the data order is
keyed by (step.order_seed, epoch), and a step keys its own draws by the micro-batch's (epoch, step, positions).
So a run resumed from the checkpoint of epoch e continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dmae.train.batches import MicroBatch, epoch_batches, micro_batch_size, steps_per_epoch
from dmae.train.optim import lr_at, set_lr
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from dmae.util.precision import autocast
from dmae.util.progress import log, progress_bar
from dmae.util.seeding import derive_seed
from dmae.util.state import load_state, save_state


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: `batch_size` is the global batch of one optimizer step, reached with
    `accum_steps` micro-batches per process; the lr warms up linearly, then follows a half cosine to min_lr."""

    section: str  # the params section it comes from (named in error messages)
    epochs: int
    batch_size: int
    accum_steps: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    precision: str

    @classmethod
    def of(cls, section: str, cfg, epochs: int) -> "Schedule":
        """From a pretrain or finetune settings section; lr = base_lr * batch_size / 256."""
        return cls(section, epochs, cfg.batch_size, cfg.accum_steps, cfg.base_lr * cfg.batch_size / 256,
                   cfg.min_lr, cfg.warmup_epochs, cfg.precision)


class Step:
    """What one kind of training supplies to the loop; subclasses set the attributes and override `loss`."""

    name: str  # progress and logs, e.g. "finetune σ=0.5"
    loss_column: str = "loss"  # the metrics column of the epoch's mean loss
    seed: tuple  # torch's global RNG at epoch e is seeded with derive_seed(*seed, e, rank)
    order_seed: int  # the data order of epoch e is keyed by (order_seed, e)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before the first micro-batch of every epoch (also the first one after a resume)."""

    def loss(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        """The mean loss of one micro-batch (inputs already on the model's device)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics after an epoch (every process computes them)."""
        return {}


def micro_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: Step, batch: MicroBatch,
               accum_steps: int, precision: str, device: torch.device) -> float:
    """Forward and backward of one micro-batch (gradients all-reduced only on the last of an optimizer step),
    then the optimizer step if it is the last; returns the micro-batch's loss."""
    with dist.no_sync(model, batch.last), autocast(device, precision):
        loss = step.loss(model, batch)
        (loss / accum_steps).backward()
    if batch.last:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model: nn.Module, train_set: Dataset, step: Step, schedule: Schedule, *, device: torch.device,
          state_path: Path, workers: int = 0, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place; returns one metrics row per epoch (epoch, mean loss, step.evaluate(), lr).

    Resumes from `state_path` when it exists and saves it after every epoch. `on_epoch(row)` runs on rank 0
    after each epoch's checkpoint is saved.
    """
    s = schedule
    steps = steps_per_epoch(train_set, s.batch_size, s.section)
    micro_batch_size(s.batch_size, s.accum_steps, s.section)
    model.to(device)
    ddp_model = dist.wrap(model, device)
    optimizer = step.optimizer(model)
    total, warmup = s.epochs * steps, s.warmup_epochs * steps

    done, history = resume(state_path, model, optimizer)
    if done:
        log(f"resuming {step.name} after epoch {done} from {state_path}")
    with progress_bar(progress and dist.is_main(), unit="img") as bar:
        task = bar.add_task(step.name, total=(s.epochs - done) * steps * s.batch_size, status="")
        for epoch in range(done, s.epochs):
            torch.manual_seed(derive_seed(*step.seed, epoch, dist.rank()))
            step.start_epoch(epoch)
            ddp_model.train()
            t0, loss_sum, count = time.perf_counter(), 0.0, 0
            for batch in epoch_batches(train_set, s.batch_size, s.accum_steps, step.order_seed, epoch, workers,
                                       s.section):
                lr = lr_at(epoch * steps + batch.step, total, warmup, s.peak_lr, s.min_lr)
                set_lr(optimizer, lr)
                batch = batch.to(device)
                loss = micro_step(ddp_model, optimizer, step, batch, s.accum_steps, s.precision, device)
                if not math.isfinite(loss):
                    raise UserError(f"{step.name}: the loss is {loss} at epoch {epoch + 1}, step {batch.step + 1}; "
                                    f"training stopped (lower {s.section}.base_lr, or train in fp32)")
                loss_sum, count = loss_sum + loss, count + 1
                if batch.last:
                    bar.update(task, advance=s.batch_size,
                               status=f"epoch {epoch + 1}/{s.epochs} loss {loss_sum / count:.4f}")
            row = {"epoch": epoch + 1, step.loss_column: dist.mean_over_ranks(loss_sum / count, device),
                   **step.evaluate(model), "lr": lr}
            history.append(row)
            if dist.is_main():
                save_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch + 1, "history": history})
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr"))
                log(f"{step.name} epoch {epoch + 1}/{s.epochs}: {shown} "
                            f"({time.perf_counter() - t0:.1f} s)")
                if on_epoch:
                    on_epoch(row)
            dist.barrier()
    return history


def resume(state_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore model and optimizer from `state_path` if it exists; returns (epochs done, metrics history)."""
    saved = load_state(state_path)
    if saved is None:
        return 0, []
    try:  # a state file of other code (a changed model) or edited by hand: refuse it, never a traceback
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        return int(saved["epoch"]), list(saved["history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UserError(f"{state_path}: resume state does not fit this run ({detail[:300]}); "
                        f"delete it to start the stage afresh") from None
