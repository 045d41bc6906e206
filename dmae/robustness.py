"""Robust accuracy of a De^3 defense under the NIM paper's l-infinity attacks, one threat model per column.

For a defense D(x) = classifier(denoise(x + noise)) at test-time noise level sigma:
- white-box (`white_*`): gradients through the whole chain, noise draw and denoiser included; one draw per
  gradient, or (`*_eot`) the gradient averaged over `eot` draws (expectation over transformation);
- gray-box (`gray_*`): examples crafted on the classifier alone, evaluated through the defense; no gradient
  ever passes through the denoiser;
- black-box (`square`): Square, which only queries the defense's logits;
- AutoAttack 'standard' and 'rand' (APGD with EOT over 20 draws, for randomized models) through the chain.
Every column is the accuracy of one draw of the defense on the attacked examples (`clean`: on the clean ones).
At sigma 0 the model is the classifier alone and deterministic: EOT and gray-box coincide with the white-box
attack (copied, not rerun) and AutoAttack 'rand' does not apply (None).

Determinism: every attack and every evaluation reseeds torch's global RNG (the defense's noise) and the
attack's own generator from (seed, row key, column, batch index).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from dmae.attacks import autoattack, fgsm, pgd, robust_accuracy, square_attack
from dmae.defense import Defense
from dmae.seeding import derive_seed
from dmae.settings import AttackSettings

ATTACKS = ["white_fgsm", "white_fgsm_eot", "white_pgd", "white_pgd_eot", "gray_fgsm", "gray_pgd", "square"]
SAME_WHEN_DETERMINISTIC = {"white_fgsm_eot": "white_fgsm", "white_pgd_eot": "white_pgd",
                           "gray_fgsm": "white_fgsm", "gray_pgd": "white_pgd"}
SHOWN = "white_pgd_eot"  # the attack whose examples `evaluate` keeps for figures


def columns(cfg: AttackSettings) -> list[str]:
    """The accuracy columns of one row: clean, then every attack (AutoAttack versions as configured)."""
    return ["clean", *ATTACKS, *(f"autoattack_{v}" for v in cfg.autoattack)]


def craft(column: str, defense: Defense, x: torch.Tensor, y: torch.Tensor, cfg: AttackSettings,
          seed: int) -> torch.Tensor:
    """The examples of one column (the clean ones for 'clean'); random draws from `seed`."""
    if column == "clean":
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if column.startswith("autoattack_"):
        version = column.removeprefix("autoattack_")
        return autoattack(defense, x, y, cfg.eps, version, seed=seed % 2**31, batch_size=len(x))
    if column == "square":
        return square_attack(defense, x, y, cfg.eps, cfg.square.queries, cfg.square.p_init, generator)
    threat, method = column.split("_", 1)
    target = defense.classifier if threat == "gray" else defense
    eot = cfg.eot if method.endswith("_eot") else 1
    if method.startswith("fgsm"):
        return fgsm(target, x, y, cfg.eps, eot=eot)
    p = cfg.pgd
    return pgd(target, x, y, cfg.eps, p.steps, p.step_size, p.random_start, eot=eot, generator=generator)


@dataclass
class Evaluation:
    accuracy: dict[str, float | None]  # column -> accuracy (None: does not apply)
    shown: torch.Tensor | None  # the first examples of the SHOWN attack, when asked for


def evaluate(defense: Defense, x: torch.Tensor, y: torch.Tensor, cfg: AttackSettings, key: tuple, keep: int = 0,
             on_column: Callable[[str, float, float], None] | None = None) -> Evaluation:
    """Every column of `columns(cfg)` for `defense` on (x, y), in batches of cfg.batch_size.

    `key` (e.g. classifier name and sigma) keys the seeds; `keep` > 0 returns that many examples of the SHOWN
    attack; `on_column(column, accuracy, seconds)` runs after each column that was run (seconds: crafting and
    evaluating it).
    """
    deterministic = defense.sigma == 0
    accuracy: dict[str, float | None] = {}
    shown = None
    for column in columns(cfg):
        if deterministic and column in SAME_WHEN_DETERMINISTIC:
            accuracy[column] = accuracy[SAME_WHEN_DETERMINISTIC[column]]
            continue
        if deterministic and column == "autoattack_rand":
            accuracy[column] = None
            continue
        t0, correct, kept = time.perf_counter(), 0, []
        for b, start in enumerate(range(0, len(x), cfg.batch_size)):
            xb, yb = x[start:start + cfg.batch_size], y[start:start + cfg.batch_size]
            seed = derive_seed(cfg.seed, *key, column, b)
            torch.manual_seed(seed)
            x_adv = craft(column, defense, xb, yb, cfg, seed)
            torch.manual_seed(derive_seed(seed, "evaluate"))
            correct += round(robust_accuracy(defense, x_adv, yb) * len(yb))  # one draw: a count
            if column == SHOWN and keep > sum(map(len, kept)):
                kept.append(x_adv)
        accuracy[column] = correct / len(x)
        if kept:
            shown = torch.cat(kept)[:keep]
        if on_column:
            on_column(column, accuracy[column], time.perf_counter() - t0)
    return Evaluation(accuracy, shown)
