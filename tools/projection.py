"""What each stage of a params file costs at full scale: FLOPs from tools/flops.py times the data set's sizes,
and GPU-hours at the sustained throughput README.md ("Paper scale") assumes. Estimates, +/- 2x.

Counted per stage (F = forward FLOPs per image; training costs 3 F per image and view):
- pretrain / denoiser@NAME: epochs x training images x 3 F(autoencoder at its mask ratio);
- finetune@σ: epochs x images x 3 F(classifier) x m noisy copies (consistency regularization);
- finetune_defense@NAME, finetune_chain@σ: epochs x images x (3 F(classifier) + F(denoising)) for denoised inputs;
- certify@σ: certified test images x (N0 + N) x F(classifier); the adaptive methods: at most N0 + n_max;
- certify_chain@σ-CHAIN: its images x (N0 + N) x (F(classifier) + F(denoising));
- attack: per (classifier, test σ) row and example, the gradient evaluations of every attack (3 F each) and the
  forward passes of Square and of the evaluation draws; AutoAttack and Square stop early on broken examples, so
  this is an upper bound.
"""

from __future__ import annotations

import math

from dmae.models.architectures import ModelConfig
from dmae.settings import MAIN_DENOISER, Params
from tools.flops import TRAIN_FACTOR, autoencoder_flops, classifier_flops

GPU_FLOPS = 300e12  # sustained bf16 FLOP/s of one H100 assumed by README.md ("Paper scale")
FULL_SIZES = {"imagenet": (1_281_167, 50_000, 1000), "cifar10": (50_000, 10_000, 10),
              "digits": (1_437, 360, 10)}  # (training images before the hold-out, test split, classes)


def _config(params: Params) -> ModelConfig:
    channels = 1 if params.data.dataset == "digits" else 3
    return ModelConfig(params.model.preset, params.model.img_size, params.model.patch_size, channels,
                       (0.5,) * channels, (0.5,) * channels)


def denoising_flops(cfg: ModelConfig, params: Params, denoiser: str) -> float:
    """One reconstruction: a pass over the whole image, or an MAE's passes over complementary masks."""
    groups = params.denoiser_settings(denoiser).reconstruct_groups
    return autoencoder_flops(cfg, 0.0) if groups == 1 else groups * autoencoder_flops(cfg, 1 - 1 / groups)


def attack_flops(params: Params, classifier: float, denoise: dict[str, float], test: int) -> float:
    """Every (classifier, test σ) row of the attack stage on its examples (of the `test` images), at most."""
    a, aa = params.attack, params.attack.autoattack
    budget = aa.budget
    examples = test if a.examples == "all" else min(a.examples, test)
    aa_examples = examples if aa.examples == "all" else min(aa.examples, examples)
    total = 0.0
    for name, spec in params.defense.classifiers.items():
        for sigma in a.test_sigmas if spec.denoiser else [0.0]:
            chain = classifier + (denoise[spec.denoiser] if sigma > 0 else 0.0)
            random = sigma > 0
            eot = a.eot if random else 1
            white = 1 + a.pgd.steps + (eot + 2 * a.pgd.steps * eot if random else 0)  # FGSM, PGD, EOT, BPDA
            white += a.pgd.steps * len(a.eps_sweep)
            gray = (1 + a.pgd.steps) * classifier if random else 0.0  # on the classifier alone
            columns = 1 + 8 + len(a.eps_sweep)
            per_example = (TRAIN_FACTOR * (white * chain + gray) + a.square.queries * chain
                           + (a.draws if random else 1) * columns * chain)
            total += examples * per_example
            for column in params.attack.autoattack_columns(name, sigma):
                if column == "autoattack_standard":  # APGD-CE, APGD-T and FAB-T gradients, Square's queries
                    grads = budget.iterations * (1 + 2 * budget.target_classes)
                    cost = TRAIN_FACTOR * grads * chain + budget.square_queries * chain
                else:  # 'rand': APGD-CE and APGD-DLR, each gradient averaged over eot_iter draws
                    cost = TRAIN_FACTOR * 2 * budget.iterations * budget.eot_iter * chain
                total += aa_examples * cost
    return total


def stage_flops(params: Params) -> dict[str, float]:
    """FLOPs of every stage of the DAG at full scale, by DVC stage name (stages without model work left out)."""
    cfg = _config(params)
    train_all, test_all, classes = FULL_SIZES[params.data.dataset]
    train = train_all * (1 - params.data.val_fraction)
    test = math.ceil(test_all / params.data.test_every)
    certified = math.ceil(test / params.certify.test_every)
    classify = classifier_flops(cfg, classes)
    denoisers = [MAIN_DENOISER, *params.defense.denoisers]
    denoise = {name: denoising_flops(cfg, params, name) for name in denoisers}
    out: dict[str, float] = {}
    for name in denoisers:
        p = params.denoiser_settings(name)
        stage = "pretrain" if name == MAIN_DENOISER else f"denoiser@{name}"
        out[stage] = p.epochs * train * TRAIN_FACTOR * autoencoder_flops(cfg, p.mask_ratio)
    ft, c = params.finetune, params.certify
    copies = ft.consistency.m if ft.consistency.enabled else 1
    samples = c.n0 + (c.n if c.method == "cohen" else c.n_max)
    for sigma in params.sigmas:
        out[f"finetune@{sigma}"] = ft.epochs_at(sigma) * train * TRAIN_FACTOR * copies * classify
        out[f"certify@{sigma}"] = certified * samples * classify
    de3 = params.defense_finetune()
    for name, spec in params.defense.classifiers.items():
        extra = denoise[spec.denoiser] if spec.input == "denoised" else 0.0
        out[f"finetune_defense@{name}"] = de3.epochs * train * (TRAIN_FACTOR * classify + extra)
    out["attack"] = attack_flops(params, classify, denoise, test)
    chains = params.denoised_smoothing
    chain_test = math.ceil(certified / chains.test_every)
    for sigma in params.sigmas:
        out[f"finetune_chain@{sigma}"] = de3.epochs * train * (TRAIN_FACTOR * classify
                                                               + denoise[chains.finetune.denoiser])
        for chain, spec in chains.chains.items():
            out[f"certify_chain@{sigma}-{chain}"] = chain_test * samples * (classify + denoise[spec.denoiser])
    return out


def gpu_hours(flops: float) -> float:
    return flops / GPU_FLOPS / 3600

