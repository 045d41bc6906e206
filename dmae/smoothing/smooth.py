"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): PREDICT and CERTIFY around any base classifier.

Noise seeding. The noise of one example is a pure function of (seed, sigma, index, phase). The sample stream of
a phase is cut into blocks of NOISE_BLOCK samples, and block k is drawn from its own torch.Generator seeded with
`block_seed(seed, sigma, index, phase, k)`, a blake2b hash (stable across processes, unlike Python's `hash`).
Batches are cut from consecutive blocks, so the counts do not depend on batch_size, on how examples are spread
over shards or devices, or on the order they are certified in. CPU and CUDA generators give different streams,
so results are reproducible per device type.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from dmae.util.accel import compile_for_inference
from dmae.util.errors import UserError
from dmae.util.precision import autocast

ABSTAIN = -1
NOISE_BLOCK = 256  # samples per generator; changing it changes every result
SELECTION, ESTIMATION, PREDICTION = "selection", "estimation", "prediction"


def block_seed(seed: int, sigma: float, index: int, phase: str, block: int) -> int:
    """The 64-bit generator seed of one noise block of one example."""
    key = f"dmae.smoothing|{int(seed)}|{float(sigma)!r}|{int(index)}|{phase}|{int(block)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n."""
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: all n agree, so pA_lower = alpha ** (1 / n)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class if a two-sided binomial test of the top two counts rejects p = 0.5."""
    counts = np.asarray(counts)
    second, top = np.argsort(counts, kind="stable")[-2:]
    n_a, n_b = int(counts[top]), int(counts[second])
    if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
        return int(top)
    return ABSTAIN


def certify_from_counts(
    selection: np.ndarray, estimation: np.ndarray, alpha: float, sigma: float
) -> tuple[int, float]:
    """CERTIFY's decision: cA from the selection counts, its lower bound from the independent estimation counts."""
    c_a = int(np.argmax(selection))
    p_lower = lower_confidence_bound(int(estimation[c_a]), int(np.sum(estimation)), alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * norm.ppf(p_lower))


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(alpha) -> None:
    if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")


def check_certify_args(*, n0, n, alpha, batch_size) -> None:
    """Raise UserError naming the first bad CERTIFY argument."""
    _check_count("n0", n0)
    _check_count("n", n)
    _check_alpha(alpha)
    _check_count("batch_size", batch_size)


def _noise_batches(
    shape: torch.Size, num: int, batch_size: int, seed_of: Callable[[int], int], device: torch.device
) -> Iterator[torch.Tensor]:
    """Yield num standard normal samples of `shape`, batch_size at a time (the last batch may be smaller).

    Block k comes from a generator seeded with seed_of(k); at most one block plus one batch is held at a time.
    The caller may overwrite each yielded tensor.
    """
    pending = torch.empty((0, *shape), device=device)
    for block in range(math.ceil(num / NOISE_BLOCK)):
        size = min(NOISE_BLOCK, num - block * NOISE_BLOCK)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed_of(block))
        fresh = torch.randn((size, *shape), generator=gen, device=device)
        pending = torch.cat((pending, fresh)) if len(pending) else fresh
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if len(pending):
        yield pending


class Smooth:
    """The smoothed classifier g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I).

    base_classifier maps a batch [B, C, H, W] in [0, 1] to logits [B, num_classes]. It is put in eval mode: batch
    norm in train mode would couple the samples of a batch, and dropout would add unseeded randomness.
    compile=True runs it through torch.compile with frozen weights (dmae.accel.compile_for_inference; eager if
    compiling fails), a speed knob.
    """

    def __init__(
        self, base_classifier: nn.Module, num_classes: int, sigma: float, *, seed: int = 0, precision: str = "fp32",
        compile: bool = False,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
            raise UserError(f"sigma must be a finite number > 0, got {sigma!r}")
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.base_classifier = compile_for_inference(base_classifier.eval()) if compile else base_classifier.eval()
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.precision = precision

    @property
    def device(self) -> torch.device:
        param = next(self.base_classifier.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, index: int = 0) -> int:
        """PREDICT: the smoothed class of x, or -1 (abstain) when the top two classes are not told apart."""
        _check_count("n", n)
        _check_alpha(alpha)
        _check_count("batch_size", batch_size)
        return predict_from_counts(self.sample_counts(x, n, batch_size, index=index, phase=PREDICTION), alpha)

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *, index: int = 0
    ) -> tuple[int, float]:
        """CERTIFY: (class, l2 radius) holding with probability >= 1 - alpha, or (-1, 0.0) to abstain."""
        check_certify_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
        selection = self.sample_counts(x, n0, batch_size, index=index, phase=SELECTION)
        estimation = self.sample_counts(x, n, batch_size, index=index, phase=ESTIMATION)
        return certify_from_counts(selection, estimation, alpha, self.sigma)

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, *, index: int, phase: str) -> np.ndarray:
        """Class counts of the base classifier over num noisy copies of x (noise seeded as in the module doc)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise UserError(f"x must be one image tensor [C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        device = self.device
        x = x.to(device=device, dtype=torch.float32)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        seed_of = functools.partial(block_seed, self.seed, self.sigma, index, phase)
        with torch.inference_mode():
            for noise in _noise_batches(x.shape, num, batch_size, seed_of, device):
                batch = noise.mul_(self.sigma).add_(x)  # in place, x broadcast: no per-batch copy of x
                with autocast(device, self.precision):
                    logits = self.base_classifier(batch)
                if logits.shape != (len(batch), self.num_classes):
                    raise UserError(
                        f"base classifier returned logits of shape {tuple(logits.shape)}, "
                        f"expected ({len(batch)}, num_classes={self.num_classes})"
                    )
                counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)
        return counts.cpu().numpy()  # the one host sync
