"""Robust accuracy of a De^3 defense under the NIM paper's l-infinity attacks, one threat model per column.

For a defense D(x) = classifier(denoise(x + noise)) at test-time noise level sigma:
- white-box (`white_*`): gradients through the whole chain, noise draw and denoiser included; one draw per
  gradient, or (`*_eot`) the gradient averaged over `eot` draws (expectation over transformation);
- BPDA (`white_pgd_bpda`): PGD with EOT through the defense with the denoiser's backward pass replaced by the
  identity, a second white-box route;
- gray-box (`gray_*`): examples crafted on the classifier alone, evaluated through the defense; no gradient
  ever passes through the denoiser;
- black-box (`square`): Square, which only queries the defense's logits;
- AutoAttack 'standard' and 'rand' (APGD with EOT over 20 draws, for randomized models) through the chain, on
  `autoattack.examples` of the examples (those drawn first), for the classifiers and test sigmas of `autoattack`
  (None elsewhere);
- the eps sweep (`sweep_pgd_<eps>`): white-box PGD at each eps of `eps_sweep` (steps scaled to reach the ball's
  edge), for the sanity check that accuracy falls with eps and vanishes at a large one.
Every column is evaluated over `draws` noise draws of the defense on the attacked examples (`clean`: on the clean
ones): the mean accuracy over the draws, and the accuracy of the worst draw. At sigma 0 the model is the
classifier alone and deterministic: one draw, EOT and gray-box coincide with the white-box attack (copied, not
rerun) and AutoAttack 'rand' does not apply.

Determinism: every attack and every evaluation reseeds torch's global RNG (the defense's noise) and the
attack's own generator from (seed, row key, column, batch index).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch.utils.data import DataLoader, Subset

from dmae.defense.attacks import autoattack, correct_per_draw, fgsm, pgd, square_attack
from dmae.defense.chain import Defense, StraightThrough
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import load_autoencoder
from dmae.models.classifier import load_classifier
from dmae.settings import AttackSettings
from dmae.util import distributed as dist
from dmae.util.progress import log, progress_bar
from dmae.util.seeding import derive_seed
from dmae.util.state import load_state, save_state

ATTACKS = ["white_fgsm", "white_fgsm_eot", "white_pgd", "white_pgd_eot", "white_pgd_bpda", "gray_fgsm", "gray_pgd",
           "square"]
SAME_WHEN_DETERMINISTIC = {"white_fgsm_eot": "white_fgsm", "white_pgd_eot": "white_pgd",
                           "white_pgd_bpda": "white_pgd", "gray_fgsm": "white_fgsm", "gray_pgd": "white_pgd"}
SWEEP = "sweep_pgd_"  # + eps: the eps-sweep columns
AUTOATTACK = "autoattack_"  # + version
SHOWN = "white_pgd_eot"  # the attack whose examples `evaluate` keeps for figures


def columns(cfg: AttackSettings) -> list[str]:
    """The accuracy columns of one row: clean, then every attack (AutoAttack versions as configured)."""
    return ["clean", *ATTACKS, *(AUTOATTACK + v for v in cfg.autoattack.versions), *sweep_columns(cfg)]


def column_examples(cfg: AttackSettings, column: str, examples: int) -> int:
    """How many of the `examples` attack examples a column is evaluated on (AutoAttack: the first drawn)."""
    if column.startswith(AUTOATTACK) and cfg.autoattack.examples != "all":
        return min(cfg.autoattack.examples, examples)
    return examples


def sweep_columns(cfg: AttackSettings) -> dict[str, float]:
    """Column -> eps of the eps sweep (the configured eps is the white_pgd column itself)."""
    return {f"{SWEEP}{eps:g}": eps for eps in cfg.eps_sweep}


def craft(column: str, defense: Defense, x: torch.Tensor, y: torch.Tensor, cfg: AttackSettings,
          seed: int, warnings: list[str] | None = None) -> torch.Tensor:
    """The examples of one column (the clean ones for 'clean'); random draws from `seed`. AutoAttack's own
    reliability warnings are appended to `warnings`."""
    if column == "clean":
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if column.startswith(AUTOATTACK):
        version = column.removeprefix(AUTOATTACK)
        return autoattack(defense, x, y, cfg.eps, version, seed=seed % 2**31, batch_size=len(x),
                          warnings=warnings, **cfg.autoattack.budget.model_dump())
    if column == "square":
        return square_attack(defense, x, y, cfg.eps, cfg.square.queries, cfg.square.p_init, generator)
    p = cfg.pgd
    if column.startswith(SWEEP):
        eps = sweep_columns(cfg)[column]
        return pgd(defense, x, y, eps, p.steps, max(p.step_size, 2.5 * eps / p.steps), p.random_start,
                   generator=generator)
    if column == "white_pgd_bpda":
        return pgd(StraightThrough(defense), x, y, cfg.eps, p.steps, p.step_size, p.random_start, eot=cfg.eot,
                   generator=generator)
    threat, method = column.split("_", 1)
    target = defense.classifier if threat == "gray" else defense
    eot = cfg.eot if method.endswith("_eot") else 1
    if method.startswith("fgsm"):
        return fgsm(target, x, y, cfg.eps, eot=eot)
    return pgd(target, x, y, cfg.eps, p.steps, p.step_size, p.random_start, eot=eot, generator=generator)


@dataclass
class Evaluation:
    accuracy: dict[str, float | None]  # column -> mean accuracy over the noise draws (None: does not apply)
    worst: dict[str, float | None]  # column -> accuracy of the worst draw
    mse: float | None  # mean squared error of the denoised clean images against them (None: no denoiser)
    shown: torch.Tensor | None  # the first examples of the SHOWN attack, when asked for
    warnings: list[str]  # "column: message" for each reliability warning AutoAttack gave, once each


def evaluate_defense(defense: Defense, x: torch.Tensor, y: torch.Tensor, cfg: AttackSettings, key: tuple, keep: int = 0,
                     on_column: Callable[[str, float, float], None] | None = None,
                     autoattack: tuple[str, ...] = (), ranks: torch.Tensor | None = None) -> Evaluation:
    """Every column of `columns(cfg)` for `defense` on (x, y), in batches of cfg.batch_size; of the AutoAttack
    columns only those in `autoattack` (the others None).

    `key` (e.g. classifier name and sigma) keys the seeds; `keep` > 0 returns that many examples of the SHOWN
    attack; `on_column(column, accuracy, seconds)` runs after each column that was run (seconds: crafting and
    evaluating it). (x, y) may stay on the CPU (a whole validation split): batches move to the defense's device.
    `ranks`: each example's rank in the seeded draw (attack_examples); AutoAttack takes those of rank below
    autoattack.examples. Default: x is in draw order.
    """
    deterministic = defense.sigma == 0
    draws = 1 if deterministic else cfg.draws
    device = _device(defense)
    ranks = torch.arange(len(x)) if ranks is None else ranks
    accuracy: dict[str, float | None] = {}
    worst: dict[str, float | None] = {}
    shown, warnings = None, []
    for column in columns(cfg):
        if deterministic and column in SAME_WHEN_DETERMINISTIC:
            accuracy[column] = accuracy[SAME_WHEN_DETERMINISTIC[column]]
            worst[column] = worst[SAME_WHEN_DETERMINISTIC[column]]
            continue
        if column.startswith(AUTOATTACK) and column not in autoattack:
            accuracy[column] = worst[column] = None
            continue
        if sweep_columns(cfg).get(column) == 0:  # PGD in a ball of radius 0 is the clean image
            accuracy[column], worst[column] = accuracy["clean"], worst["clean"]
            continue
        n = column_examples(cfg, column, len(x))
        xs, ys = (x, y) if n == len(x) else (x[ranks < n], y[ranks < n])  # AutoAttack: a random subset
        t0, correct, kept = time.perf_counter(), [0] * draws, []
        for b, start in enumerate(range(0, n, cfg.batch_size)):
            stop = min(start + cfg.batch_size, n)
            xb, yb = xs[start:stop].to(device), ys[start:stop].to(device)
            seed = derive_seed(cfg.seed, *key, column, b)
            torch.manual_seed(seed)
            said: list[str] = []
            x_adv = craft(column, defense, xb, yb, cfg, seed, said)
            warnings += [w for w in (f"{column}: {m}" for m in said) if w not in warnings]
            torch.manual_seed(derive_seed(seed, "evaluate"))
            correct = [c + hits for c, hits in zip(correct, correct_per_draw(defense, x_adv, yb, draws))]
            if column == SHOWN and keep > sum(map(len, kept)):
                kept.append(x_adv)
        accuracy[column], worst[column] = sum(correct) / (draws * n), min(correct) / n
        if kept:
            shown = torch.cat(kept)[:keep]
        if on_column:
            on_column(column, accuracy[column], time.perf_counter() - t0)
    return Evaluation(accuracy, worst, None if deterministic else denoising_error(defense, x, cfg, key), shown,
                      warnings)


@torch.no_grad()
def denoising_error(defense: Defense, x: torch.Tensor, cfg: AttackSettings, key: tuple) -> float:
    """Mean squared error (per pixel, [0,1] units) of the defense's denoised version of the clean images, over
    cfg.draws noise draws: how well its denoiser undoes the noise, whatever the classifier."""
    total, device = 0.0, _device(defense)
    for d in range(cfg.draws):
        torch.manual_seed(derive_seed(cfg.seed, *key, "mse", d))
        for i in range(0, len(x), cfg.batch_size):
            xb = x[i:i + cfg.batch_size].to(device)
            total += float(((defense.purify(xb)[1] - xb) ** 2).sum())
    return total / (cfg.draws * x.numel())


def _device(defense: Defense) -> torch.device:
    return next(defense.classifier.parameters()).device


# -- every classifier of the comparison --------------------------------------------------------------------------

@dataclass(frozen=True)
class Chain:
    """One classifier of the comparison and the denoiser of its defense (None: evaluated undefended)."""

    name: str
    classifier: Path
    denoiser: Path | None
    norm_pix_loss: bool  # how the denoiser was pretrained (its output is turned into pixels accordingly)
    groups: int  # 1, or the complementary masks an MAE denoises over (PretrainSettings.reconstruct_groups)


@dataclass(frozen=True)
class Row:
    classifier: str
    sigma: float  # test-time noise level of the defense; 0: the classifier alone
    defended: bool  # the classifier has a denoiser (evaluated over the test sigmas)
    accuracy: dict[str, float | None]  # mean over the noise draws
    worst: dict[str, float | None]  # the worst draw
    mse: float | None  # denoising error on the clean images (None without noise)
    warnings: tuple[str, ...] = ()  # AutoAttack's reliability warnings ("column: message")


def sigma_label(sigma: float) -> str:
    return "none" if sigma == 0 else f"{round(sigma * 255, 1):g}/255"


def attack_examples(dataset, n: int | Literal["all"], seed: int,
                    workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first n (all if "all") of a seeded random order of `dataset`, in index order, on the CPU (read by
    `workers` data-loader processes): images, labels and each one's rank in that order, so that the first drawn
    are a random subset even of a class-sorted split (ImageNet val)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, "examples")))
    chosen = sorted(order[:None if n == "all" else n].tolist())
    x, y = None, torch.empty(len(chosen), dtype=torch.long)
    for start, (xb, yb) in zip(range(0, len(chosen), 256), DataLoader(Subset(dataset, chosen), batch_size=256,
                                                                      num_workers=workers)):
        x = torch.empty(len(chosen), *xb.shape[1:]) if x is None else x  # filled in place: 30 GB for ImageNet val
        x[start:start + len(xb)], y[start:start + len(xb)] = xb, yb
    rank = torch.empty(len(order), dtype=torch.long)
    rank[order] = torch.arange(len(order))
    return x, y, rank[chosen]


def row_cost(chain: Chain, sigma: float, cfg: AttackSettings) -> float:
    """Forward passes per example of one row, roughly (to share rows out among processes): a randomized defense
    runs the EOT, BPDA and gray-box columns and more draws; AutoAttack and Square dominate where they run."""
    random = sigma > 0
    grads = 1 + cfg.pgd.steps * (1 + len(cfg.eps_sweep)) + (cfg.eot * (1 + 2 * cfg.pgd.steps) if random else 0)
    cost = 3 * grads * (2 if random else 1) + cfg.square.queries + (cfg.draws if random else 1) * 14
    b = cfg.autoattack.budget
    for column in cfg.autoattack_columns(chain.name, sigma):
        cost += 3 * b.iterations * (1 + 2 * b.target_classes) + b.square_queries if column.endswith("standard") \
            else 6 * b.iterations * b.eot_iter
    return cost


def share_rows(keys: list[tuple[Chain, float]], cfg: AttackSettings, processes: int) -> list[list[int]]:
    """Indices of `keys` per process: the costliest row first, each to the least loaded process."""
    load, share = [0.0] * processes, [[] for _ in range(processes)]
    for i in sorted(range(len(keys)), key=lambda i: -row_cost(*keys[i], cfg)):
        p = load.index(min(load))
        share[p].append(i)
        load[p] += row_cost(*keys[i], cfg)
    return [sorted(s) for s in share]


def _row_key(chain: Chain, sigma: float) -> str:
    return f"{chain.name}|{sigma!r}"


def evaluate_chains(chains: list[Chain], model_cfg: ModelConfig, num_classes: int, x: torch.Tensor,
                    y: torch.Tensor, cfg: AttackSettings, *, device: torch.device, state_dir: Path,
                    ranks: torch.Tensor | None = None, show: int = 0,
                    progress: bool = True) -> tuple[list[Row], dict[str, torch.Tensor]] | None:
    """Every column of every chain: with a denoiser at each cfg.test_sigmas, else once, undefended (`ranks`: as
    evaluate_defense takes them).

    Under torchrun the rows are shared out among the processes (`share_rows`); a row's result depends only on
    its own seeds, so it is the same whichever process evaluates it. Each process saves its finished rows in
    `state_dir` after every row; a rerun, with any number of processes, resumes from all of them. Returns, on
    rank 0 (None elsewhere), the rows and, for the figure, `show` clean examples and, for chain cfg.figure at
    every test sigma > 0, its white-box PGD-EOT examples with their noisy and denoised versions.
    """
    done: dict[str, dict] = {}  # finished rows: "name|sigma" -> {"accuracy", "worst", "mse", "shown", "warnings"}
    for saved in sorted(state_dir.glob("rows-*.pt")):
        done |= load_state(saved)
    keys = [(chain, sigma) for chain in chains for sigma in (cfg.test_sigmas if chain.denoiser else [0.0])]
    todo = [k for k in keys if _row_key(*k) not in done]
    mine = [todo[i] for i in share_rows(todo, cfg, dist.world_size())[dist.rank()]]
    state_path = state_dir / f"rows-{dist.rank()}.pt"
    x, y, models = x.to(device), y.to(device), {}
    with progress_bar(progress and dist.is_main(), unit="row") as bar:
        task = bar.add_task("attack", status="", total=len(mine))
        for chain, sigma in mine:
            if chain.name not in models:
                models = {chain.name: (load_classifier(chain.classifier, num_classes, model_cfg).to(device),
                                       load_autoencoder(chain.denoiser, model_cfg).to(device) if chain.denoiser
                                       else None)}
            where = f"{chain.name} σ={sigma_label(sigma)}"

            def logged(column: str, accuracy: float, seconds: float) -> None:
                log(f"{where} {column}: accuracy {accuracy:.3f} ({seconds:.1f} s)")
                bar.update(task, status=f"{where} {column}")

            classifier, denoiser = models[chain.name]
            defense = Defense(denoiser, classifier, sigma, chain.norm_pix_loss, chain.groups)
            result = evaluate_defense(defense, x, y, cfg, key=(chain.name, sigma),
                                      keep=show if chain.name == cfg.figure and sigma > 0 else 0, on_column=logged,
                                      autoattack=tuple(cfg.autoattack_columns(chain.name, sigma)), ranks=ranks)
            done[_row_key(chain, sigma)] = {"accuracy": result.accuracy, "worst": result.worst, "mse": result.mse,
                                            "shown": result.shown, "warnings": result.warnings}
            save_state(state_path, done)
            bar.advance(task)
    for other in dist.gather_objects(done):
        done |= other
    if not dist.is_main():
        return None
    rows = [Row(chain.name, sigma, chain.denoiser is not None, done[k]["accuracy"], done[k]["worst"],
                done[k]["mse"], tuple(done[k]["warnings"])) for chain, sigma in keys for k in [_row_key(chain, sigma)]]
    return rows, figure_examples(chains, model_cfg, num_classes, x, cfg, done, device, show)


@torch.no_grad()
def figure_examples(chains: list[Chain], model_cfg: ModelConfig, num_classes: int, x: torch.Tensor,
                    cfg: AttackSettings, done: dict[str, dict], device: torch.device,
                    show: int) -> dict[str, torch.Tensor]:
    """`show` clean examples, and for chain cfg.figure at every test sigma > 0 its kept white-box PGD-EOT
    examples, noised and denoised as its defense does (seeded per sigma)."""
    shown = {"clean": x[:show]}
    chain = next(c for c in chains if c.name == cfg.figure)
    classifier = load_classifier(chain.classifier, num_classes, model_cfg).to(device)
    denoiser = load_autoencoder(chain.denoiser, model_cfg).to(device)
    for sigma in [s for s in cfg.test_sigmas if s > 0]:
        adversarial = done[_row_key(chain, sigma)]["shown"].to(device)
        torch.manual_seed(derive_seed(cfg.seed, "figure", sigma))
        noisy, denoised = Defense(denoiser, classifier, sigma, chain.norm_pix_loss, chain.groups).purify(adversarial)
        label = sigma_label(sigma)
        shown |= {f"adversarial\nσ={label}": adversarial, f"noisy\nσ={label}": noisy,
                  f"denoised\nσ={label}": denoised}
    return shown
