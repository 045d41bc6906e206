"""l-infinity adversarial attacks and robust accuracy for any image classifier.

Every attack takes a `model` mapping images in [0,1] of shape [B, C, H, W] to logits (it may be randomized, e.g.
noise inside), clean images `x`, labels `y` and a budget `eps` in [0,1] pixel units, and returns adversarial
images inside both the eps ball around `x` and [0,1]. The model runs in eval mode with its parameters frozen for
the duration of an attack; both are restored afterwards and no parameter gradients are left behind.

Randomness: attack-internal draws (random starts, Square's proposals) come from `generator` when one is given; a
randomized model draws from its own RNG (usually torch's global one), which the caller seeds.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dmae.util.errors import UserError

# Square attack: the window fraction p is halved after each of these iteration counts (Andriushchenko et al.
# 2020, schedule defined for 10,000 queries and applied by absolute iteration count).
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Square attack: redraws allowed when a proposal would leave an image unchanged (a wasted query).
_SQUARE_REDRAWS = 10


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


@contextmanager
def _attack_mode(model: nn.Module):
    """Eval mode and frozen parameters inside the block; each module's mode and each flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


def _check_inputs(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.dim() != 4:
        raise UserError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise UserError(f"y must have shape [{x.shape[0]}] to match x, got {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError(f"x must lie in [0,1], got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    if not 0 <= eps <= 1:
        raise UserError(f"eps must be in [0,1] (pixel units), got {eps}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Nearest point of the eps ball around x intersected with [0,1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0,1) samples on `device`, drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def _dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): best other minus true logit, over top1 - top3."""
    if logits.shape[1] < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    logits = logits.float()
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return (other - true) / (top[:, 0] - top[:, 2] + 1e-12)


_LOSSES = {"ce": _ce, "dlr": _dlr}


# ---------------------------------------------------------------------------------------------------------------
# white-box attacks


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1,
                   loss: str = "ce") -> torch.Tensor:
    """Gradient of the summed loss ('ce' or 'dlr') w.r.t. x, averaged over `eot` draws of the model.

    For a randomized model each copy of x sees a fresh draw, so eot > 1 estimates the gradient of the expected
    loss (expectation over transformation). The eot copies go through the model as one batch of eot * B images.
    Summing over the batch keeps each example's gradient independent of the others.
    """
    _check_count("eot", eot)
    if loss not in _LOSSES:
        raise UserError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
    copies = x.detach().repeat(eot, 1, 1, 1).requires_grad_(True)
    with _attack_mode(model), torch.enable_grad():
        grad = torch.autograd.grad(_LOSSES[loss](model(copies), y.repeat(eot)).sum(), copies)[0]
    return grad.view(eot, *x.shape).mean(0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eot: int = 1) -> torch.Tensor:
    """Fast gradient sign method: one step of size eps along the sign of the cross-entropy gradient (averaged
    over `eot` passes, for randomized models)."""
    _check_inputs(x, y, eps)
    return (x + eps * input_gradient(model, x, y, eot=eot).sign()).clamp(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
        random_start: bool = True, eot: int = 1, generator: torch.Generator | None = None,
        loss: str = "ce") -> torch.Tensor:
    """Projected gradient ascent on the loss with sign steps (Madry et al. 2018).

    random_start: start from a uniform point of the eps ball (drawn from `generator`); eot: gradient averaged
    over that many passes per step, for randomized models.
    """
    _check_inputs(x, y, eps)
    _check_count("steps", steps)
    if not step_size >= 0:
        raise UserError(f"step_size must be >= 0, got {step_size}")
    x = x.detach()
    x_adv = x
    if random_start:
        x_adv = _project(x + eps * (2 * _uniform(x.shape, generator, x.device) - 1), x, eps)
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, eot=eot, loss=loss)
        x_adv = _project(x_adv + step_size * grad.sign(), x, eps)
    return x_adv


# ---------------------------------------------------------------------------------------------------------------
# black-box attack


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True logit minus the best other logit; positive while the example is classified correctly."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def _square_side(p_init: float, it: int, h: int, w: int) -> int:
    """Side of the square window at iteration `it`: about sqrt(p h w), p halved on the paper's schedule."""
    p = p_init / 2 ** sum(it > t for t in _SQUARE_HALVINGS)
    return min(max(round(math.sqrt(p * h * w)), 1), max(min(h, w) - 1, 1))


def _window(n: int, side: int, h: int, w: int, generator, device) -> torch.Tensor:
    """Boolean mask [n, 1, H, W] of one side x side square per image at a uniform random position."""
    top = (_uniform(n, generator, device) * (h - side + 1)).long()
    left = (_uniform(n, generator, device) * (w - side + 1)).long()
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def _signs(shape, generator, device) -> torch.Tensor:
    return torch.where(_uniform(shape, generator, device) < 0.5, -1.0, 1.0)


@torch.no_grad()
def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int,
                  p_init: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """Score-based black-box Square attack, l-infinity (Andriushchenko et al. 2020).

    Uses only the model's logits: random search on the margin loss (true logit minus best other), starting
    from vertical stripes of +-eps; each step proposes +-eps (one sign per channel) on a random square whose
    area fraction p starts at `p_init` and halves on the paper's schedule, and keeps it if the margin drops.
    `queries` bounds the forward passes each example sees, counting the clean check and the stripe start; an
    example stops as soon as it is misclassified (those misclassified when clean are returned unchanged).
    """
    _check_inputs(x, y, eps)
    _check_count("queries", queries)
    if not 0 < p_init <= 1:
        raise UserError(f"p_init must be in (0,1], got {p_init}")
    x = x.detach()
    _, c, h, w = x.shape
    x_adv = x.clone()
    with _attack_mode(model):
        margin = _margin(model(x), y)
        todo = (margin > 0).nonzero().squeeze(1)
        if eps == 0 or queries < 2 or len(todo) == 0:
            return x_adv
        stripes = x[todo] + eps * _signs((len(todo), c, 1, w), generator, x.device)
        x_adv[todo] = stripes.clamp(0, 1)
        margin[todo] = _margin(model(x_adv[todo]), y[todo])
        for it in range(1, queries - 1):
            todo = (margin > 0).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            current, clean = x_adv[todo], x[todo]
            window = _window(len(todo), _square_side(p_init, it, h, w), h, w, generator, x.device)
            signs = _signs((len(todo), c, 1, 1), generator, x.device)
            for _ in range(_SQUARE_REDRAWS):
                proposal = torch.where(window, clean + eps * signs, current).clamp(0, 1)
                same = (proposal == current).flatten(1).all(1)
                if not same.any():
                    break
                signs = torch.where(same[:, None, None, None], _signs(signs.shape, generator, x.device), signs)
            new_margin = _margin(model(proposal), y[todo])
            better = new_margin < margin[todo]
            x_adv[todo[better]] = proposal[better]
            margin[todo[better]] = new_margin[better]
    return x_adv


# ---------------------------------------------------------------------------------------------------------------
# AutoAttack and evaluation


class _Messages(logging.Handler):
    """Collects what a logger warns about."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str = "standard",
               seed: int = 0, batch_size: int = 250, *, iterations: int = 100, target_classes: int = 9,
               square_queries: int = 5000, eot_iter: int = 20, warnings: list[str] | None = None) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020), l-infinity, run by `pyautoattack` (a PyPI packaging of fra31/auto-attack).

    version 'standard': APGD-CE, APGD-T (9 target classes), FAB-T (9 targets), Square (5000 queries), each run
    on the points the previous ones did not break. version 'rand' (randomized defenses): APGD-CE and APGD-DLR,
    each with EOT over 20 draws. The keyword arguments set that budget (their defaults are the package's
    standard values, 100 iterations for every APGD and FAB); models with fewer classes than target_classes + 1
    get n_classes - 1 target classes. The package's own reliability checks (a randomized or dynamic defense,
    zero gradients, Square lowering the accuracy further) are appended to `warnings`. The package seeds torch's
    RNG with `seed` and clears sys.settrace; both are restored afterwards.
    """
    _check_inputs(x, y, eps)
    _check_count("batch_size", batch_size)
    if version not in ("standard", "rand"):
        raise UserError(f"version must be 'standard' or 'rand', got {version!r}")
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise UserError("autoattack needs the 'pyautoattack' package (pip install pyautoattack)") from e
    x = x.detach()
    cuda = [x.device] if x.device.type == "cuda" else []
    tracer = sys.gettrace()  # the package's dynamic-defense check resets it (breaks coverage, debuggers)
    with _attack_mode(model), torch.random.fork_rng(devices=cuda):
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        needed = 4 if version == "standard" else 3  # the (targeted) DLR losses compare top-3/top-4 logits
        if n_classes < needed:
            raise UserError(f"AutoAttack {version!r} needs at least {needed} classes, the model has {n_classes}")
        adversary = AutoAttack(model, eps=eps, version=version, seed=seed, device=x.device)
        adversary.fab.n_iter = iterations
        for apgd in (adversary.apgd, adversary.apgd_targeted):  # APGD derives its step-size checkpoints in __init__
            apgd.n_iter = apgd.n_iter_orig = iterations
            apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = (max(int(f * iterations), 1) for f in (0.22, 0.06, 0.03))
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = min(target_classes,
                                                                                         n_classes - 1)
        adversary.square.n_queries = square_queries
        if version == "rand":
            adversary.apgd.eot_iter = eot_iter
        collected = _Messages()
        adversary.logger.addHandler(collected)
        try:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        finally:
            sys.settrace(tracer)
            adversary.logger.removeHandler(collected)
        if warnings is not None:
            warnings += collected.messages
    return _project(x_adv.detach(), x, eps)


@torch.no_grad()
def correct_per_draw(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int = 1) -> list[int]:
    """How many of x_adv are classified as y, for each of `draws` draws of a randomized model (one batch of
    draws * B images)."""
    _check_count("draws", draws)
    with _attack_mode(model):
        hits = model(x_adv.repeat(draws, 1, 1, 1)).argmax(1) == y.repeat(draws)
    return hits.view(draws, -1).sum(1).tolist()


def robust_accuracy(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int = 1) -> float:
    """Fraction of x_adv classified as y; for a randomized model, averaged over `draws` draws."""
    return sum(correct_per_draw(model, x_adv, y, draws)) / (draws * len(y))
