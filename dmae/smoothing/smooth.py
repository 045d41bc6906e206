"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): PREDICT and CERTIFY around any base classifier, and
adaptive certification, which stops sampling an image once more samples cannot change which tabulated radii it
reaches.

Noise seeding. The noise of one example is a pure function of (seed, sigma, index, phase). The sample stream of
a phase is cut into blocks of NOISE_BLOCK samples, and block k is drawn from its own torch.Generator seeded with
`block_seed(seed, sigma, index, phase, k)`, a blake2b hash (stable across processes, unlike Python's `hash`).
Batches are cut from the streams of one or several images (dmae.smoothing.engine), so the counts do not depend on
batch_size, on how examples are spread over shards or devices, or on the order they are certified in. CPU and
CUDA generators give different streams, so results are reproducible per device type.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from dmae.smoothing.engine import ABSTAIN, PREDICTION, cohen_job, counts_job, mixture_job, run_jobs, union_job
from dmae.util.accel import compile_for_inference, inference_copy
from dmae.util.errors import UserError
from dmae.util.precision import autocast

METHODS = ("cohen", "mixture", "union")  # CERTIFY; adaptive with a mixture confidence sequence; with a union bound
ADAPTIVE = {"mixture": mixture_job, "union": union_job}


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class if a two-sided binomial test of the top two counts rejects p = 0.5."""
    counts = np.asarray(counts)
    second, top = np.argsort(counts, kind="stable")[-2:]
    n_a, n_b = int(counts[top]), int(counts[second])
    if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
        return int(top)
    return ABSTAIN


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


class Smooth:
    """The smoothed classifier g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I).

    base_classifier maps a batch [B, C, H, W] in [0, 1] to logits [B, num_classes]. It is put in eval mode: batch
    norm in train mode would couple the samples of a batch, and dropout would add unseeded randomness. In bf16
    it runs on a copy whose matrix-product weights are cast to bf16 once (dmae.util.accel.inference_copy: the
    same numbers as autocast, without casting every forward). compile=True runs it through torch.compile with
    frozen weights and one batch shape (eager if compiling fails), a speed knob.
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
        model = inference_copy(base_classifier.eval(), precision)
        self.base_classifier = compile_for_inference(model) if compile else model
        self.fixed_shape = compile
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
        predict, radius, _, _ = self._one(x, index, cohen_job(n0, n, alpha, self.sigma), batch_size)
        return predict, radius

    def certify_adaptive(
        self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int, *, radii: Sequence[float],
        method: str = "mixture", index: int = 0
    ) -> tuple[int, float, int, int]:
        """Adaptive certification: (class, l2 radius, estimation samples used, of them voting the class), or
        (-1, 0.0, samples, votes) to abstain.

        Selection with n0 samples as in CERTIFY; then estimation samples at the looks of `method` ('mixture' or
        'union'), stopping as soon as more samples cannot change which radii of `radii` are certified, or n_max
        samples are reached. The radius holds with probability at least 1 - alpha whatever the stopping time
        (dmae.smoothing.bounds).
        """
        check_certify_args(n0=n0, n=n_max, alpha=alpha, batch_size=batch_size)
        _check_adaptive(method, radii)
        return self._one(x, index, ADAPTIVE[method](n0, n_max, alpha, self.sigma, radii), batch_size)

    def certify_all(
        self, images: Iterable[tuple[int, torch.Tensor]], *, n0: int, n: int, alpha: float, batch_size: int,
        method: str = "cohen", radii: Sequence[float] = ()
    ) -> Iterator[tuple[int, int, float, int, int]]:
        """CERTIFY (method 'cohen', n samples) or adaptive certification ('mixture' or 'union', at most n) of every
        (index, image), several images per batch; yields (index, class or -1, radius, samples, of them voting cA)
        as each image finishes, which need not be in the order given."""
        check_certify_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
        if method != "cohen":
            _check_adaptive(method, radii)

        def job():
            if method == "cohen":
                return cohen_job(n0, n, alpha, self.sigma)
            return ADAPTIVE[method](n0, n, alpha, self.sigma, radii)

        items = ((index, _image(x), job()) for index, x in images)
        for index, result in run_jobs(self.classify(batch_size), self.num_classes, self.sigma, self.seed, items,
                                      batch_size, self.device):
            yield (index, *result)

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, *, index: int, phase: str) -> np.ndarray:
        """Class counts of the base classifier over num noisy copies of x (noise seeded as in the module doc)."""
        return self._one(x, index, counts_job(phase, num), batch_size)

    def classify(self, batch_size: int):
        """The predicted classes of a batch of noisy images (at most batch_size; padded to exactly that when
        compiled, so the compiled model sees one shape)."""
        def classify(batch: torch.Tensor) -> torch.Tensor:
            size = len(batch)
            if self.fixed_shape and size < batch_size:
                batch = torch.cat((batch, batch.new_zeros((batch_size - size, *batch.shape[1:]))))
            with autocast(batch.device, self.precision):
                logits = self.base_classifier(batch)
            if logits.shape != (len(batch), self.num_classes):
                raise UserError(f"base classifier returned logits of shape {tuple(logits.shape)}, expected "
                                f"({len(batch)}, num_classes={self.num_classes})")
            return logits[:size].argmax(dim=1)
        return classify

    def _one(self, x: torch.Tensor, index: int, job, batch_size: int):
        items = [(index, _image(x), job)]
        (_, result), = run_jobs(self.classify(batch_size), self.num_classes, self.sigma, self.seed, items,
                                batch_size, self.device)
        return result


def _image(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise UserError(f"x must be one image tensor [C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    return x


def check_method(method) -> None:
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _check_adaptive(method, radii) -> None:
    if method not in ADAPTIVE:
        check_method(method)
        raise UserError(f"method must be one of {', '.join(ADAPTIVE)} for adaptive certification, got {method!r}")
    _check_radii(radii)


def _check_radii(radii) -> None:
    try:
        values = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise UserError(f"radii must be numbers, got {radii!r}") from None
    if not values or not all(math.isfinite(r) and r >= 0 for r in values):
        raise UserError(f"radii must be a non-empty list of finite radii >= 0, got {radii!r}")
