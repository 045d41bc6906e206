"""Adaptive CERTIFY against CERTIFY at the same N, on real classifiers: the table, ACR, samples and wall time.

For each sigma, on the same images and noise, with the same engine (full batches across images):
- `cohen`: CERTIFY with N estimation samples per image;
- `adaptive`: adaptive CERTIFY with at most N (dmae.smoothing.bounds: valid whatever the stopping time);
- `naive`: adaptive CERTIFY that re-applies the Clopper-Pearson bound at level alpha after every look, without
  splitting alpha: it stops earlier, and is NOT valid (tests/test_reliability_guarantee.py counts its false
  certificates on the linear oracle);
and, by simulation from each image's estimated pA (the CERTIFY counts at N), CERTIFY and adaptive CERTIFY at a
larger N (`simulate_n`), stated as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dmae.smoothing import Smooth
from dmae.smoothing.engine import ESTIMATION, SELECTION, adaptive_job, certify_from_counts, cohen_job, run_jobs


@dataclass(frozen=True)
class Result:
    method: str
    sigma: float
    n: int  # N of CERTIFY, n_max of the adaptive methods
    certified: list[float]  # certified accuracy at each radius
    acr: float
    mean_samples: float
    median_samples: float
    seconds: float | None  # wall time of the whole run (None: simulated)


def _cohen_with_counts(n0: int, n: int, alpha: float, sigma: float):
    """CERTIFY exactly as `cohen_job` (same phases, same noise), also returning (cA, nA) for the simulation."""
    selection = yield SELECTION, n0, n0
    estimation = yield ESTIMATION, n, n
    c_a = int(np.argmax(selection))
    return (*certify_from_counts(selection, estimation, alpha, sigma), n, c_a, int(estimation[c_a]))


def _summary(method, sigma, n, rows, labels, radii, seconds) -> Result:
    predict = np.array([r[0] for r in rows])
    radius = np.array([r[1] for r in rows])
    samples = np.array([r[2] for r in rows])
    correct = predict == labels
    certified = [float(np.mean(correct & (radius >= r))) for r in radii]
    return Result(method, sigma, n, certified, float(np.mean(radius * correct)), float(samples.mean()),
                  float(np.median(samples)), seconds)


def run_methods(smooth: Smooth, images: Sequence[torch.Tensor], labels: Sequence[int], *, n0: int, n: int,
                alpha: float, radii: Sequence[float], batch_size: int) -> tuple[list[Result], list[tuple]]:
    """CERTIFY, adaptive and naive adaptive CERTIFY of every image; returns their results and, for the
    simulation, each image's (label, cA, nA, n) from a CERTIFY run at N."""
    labels = np.asarray(labels)
    jobs = {"cohen": lambda: _cohen_with_counts(n0, n, alpha, smooth.sigma),
            "adaptive": lambda: adaptive_job(n0, n, alpha, smooth.sigma, radii),
            "naive (not valid)": lambda: adaptive_job(n0, n, alpha, smooth.sigma, radii, naive=True)}
    results, counts = [], None
    for method, job in jobs.items():
        start = time.perf_counter()
        found = dict(run_jobs(smooth.classify(batch_size), smooth.num_classes, smooth.sigma, smooth.seed,
                              ((i, x, job()) for i, x in enumerate(images)), batch_size, smooth.device))
        seconds = time.perf_counter() - start
        rows = [found[i] for i in range(len(images))]
        if method == "cohen":
            counts = [(int(label), c_a, n_a, n) for label, (*_, c_a, n_a) in zip(labels, rows)]
            rows = [row[:3] for row in rows]
        results.append(_summary(method, smooth.sigma, n, rows, labels, radii, seconds))
    return results, counts


def _drive(job, c_a: int, p: float, rng: np.random.Generator):
    """Run a job on simulated counts: selection picks cA; each estimation sample is cA with probability p."""
    counts, result = None, None
    try:
        while True:
            phase, need, _ = job.send(counts)
            counts = np.zeros(2, dtype=np.int64)
            hits = need if phase == SELECTION else int(rng.binomial(need, p))
            counts[0], counts[1] = hits, need - hits
    except StopIteration as stop:
        result = stop.value
    predict, radius, samples = result
    return (c_a if predict == 0 else -1, radius, samples)


def simulate(counts: list[tuple], sigma: float, *, n: int, alpha: float, radii: Sequence[float],
             seed: int = 0) -> list[Result]:
    """CERTIFY and adaptive CERTIFY at N = n (the same decision code as the engine's jobs), each image's
    estimation samples drawn as Bernoulli(pA) with pA its estimate (nA + 1/2) / (N + 1) from the measured
    counts, and cA as measured."""
    labels, out = np.array([c[0] for c in counts]), []
    for name, job in (("cohen", lambda: cohen_job(1, n, alpha, sigma)),
                      ("adaptive", lambda: adaptive_job(1, n, alpha, sigma, radii))):
        rng = np.random.default_rng(seed)
        rows = [_drive(job(), c_a, (n_a + 0.5) / (measured + 1), rng) for _, c_a, n_a, measured in counts]
        out.append(_summary(f"{name} (simulated)", sigma, n, rows, labels, radii, None))
    return out


def markdown(results: list[Result], radii: Sequence[float]) -> str:
    head = ["σ", "method", "N", *(f"r = {r:g}" for r in radii), "ACR", "samples / image (mean)", "(median)",
            "N / mean", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            f"{r.sigma:g}", r.method, f"{r.n:,}", *(f"{100 * a:.1f}" for a in r.certified), f"{r.acr:.3f}",
            f"{r.mean_samples:,.0f}", f"{r.median_samples:,.0f}", f"{r.n / r.mean_samples:.1f}x",
            "—" if r.seconds is None else f"{r.seconds:.0f}"]) + " |")
    return "\n".join(lines) + "\n"
