"""Certified-robustness summaries from per-sigma certification TSVs (Cohen et al. 2019 definitions).

Certified accuracy at radius r: the fraction of examples with correct == 1 and radius >= r (an abstention counts
as wrong; a radius exactly equal to r counts). ACR: the mean over all examples of radius * correct. The paper's
tables report, at each radius, the best certified accuracy over sigma; `best_over_sigma` computes that envelope.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dmae.smoothing.bounds import brackets, fewest_samples
from dmae.smoothing.certify import CertifyRow, read_certify_tsv
from dmae.util.errors import UserError

CURVE_STEP = 0.01  # radius resolution of the sampled curves (pixel units)


@dataclass(frozen=True)
class Run:
    """One sigma's certification: per-example radius (0 on abstain), correctness and abstention."""

    sigma: float
    radius: np.ndarray
    correct: np.ndarray  # bool
    abstain: np.ndarray  # bool
    samples: np.ndarray  # estimation samples used per example
    votes: np.ndarray  # of them, those for the selected class: votes / samples estimates pA

    @classmethod
    def from_rows(cls, sigma: float, rows: Sequence[CertifyRow]) -> "Run":
        return cls(sigma, np.array([r.radius for r in rows], dtype=np.float64),
                   np.array([r.correct == 1 for r in rows]), np.array([r.predict == -1 for r in rows]),
                   np.array([r.samples for r in rows], dtype=np.int64),
                   np.array([r.votes for r in rows], dtype=np.int64))

    def certified_accuracy(self, radii: Sequence[float]) -> list[float]:
        hits = self.correct[None, :] & (self.radius[None, :] >= np.asarray(radii, dtype=np.float64)[:, None])
        return [float(v) for v in hits.mean(axis=1)]

    @property
    def acr(self) -> float:
        return float(np.mean(self.radius * self.correct))

    @property
    def abstain_rate(self) -> float:
        return float(np.mean(self.abstain))

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def mean_samples(self) -> float:
        return float(np.mean(self.samples))

    @property
    def median_samples(self) -> float:
        return float(np.median(self.samples))

    def fixed_n_samples(self, radii: Sequence[float], alpha: float) -> np.ndarray:
        """Per example, a reference for the samples it needed: the fewest with which a fixed-N test that knows its
        pA (estimated as votes / samples) certifies the same bracket, the highest radius of `radii` not above
        its certified radius (Clopper-Pearson at the expected count: dmae.smoothing.bounds.fewest_samples). 0 on
        abstain (nothing to certify); the samples it used where the estimate is not above the bracket's
        threshold (no sample count would do)."""
        tabulated, cuts = brackets(radii, self.sigma)
        out = []
        for radius, abstain, samples, votes in zip(self.radius, self.abstain, self.samples, self.votes):
            if abstain:
                out.append(0)
                continue
            need = fewest_samples(votes / samples, cuts[bisect.bisect_right(tabulated, radius) - 1], alpha)
            out.append(samples if need is None else need)
        return np.array(out, dtype=np.int64)


def load_runs(paths: Mapping[float, str | os.PathLike]) -> dict[float, Run]:
    """Read one TSV per sigma; every file must hold the same examples, each once.

    The expected examples are idx 0 .. max idx over all files (the certify stage certifies every test example);
    a file lacking any of them, or with a repeated idx, is a UserError naming it.
    """
    rows = {sigma: read_certify_tsv(path) for sigma, path in paths.items()}  # also rejects repeated idx
    for sigma, path in paths.items():
        if not rows[sigma]:
            raise UserError(f"certification file {path} has no examples")
    expected = set(range(max(r[-1].idx for r in rows.values()) + 1))
    for sigma, path in paths.items():
        missing = sorted(expected - {row.idx for row in rows[sigma]})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise UserError(f"certification file {path} misses {len(missing)} example(s) (idx {shown}): every "
                            f"sigma's file must hold idx 0..{len(expected) - 1}; rerun `dmae certify --sigma {sigma}`")
    return {sigma: Run.from_rows(sigma, rows[sigma]) for sigma, path in paths.items()}


@dataclass(frozen=True)
class Best:
    accuracy: float
    sigma: float  # the smallest sigma reaching it


def best_over_sigma(runs: Mapping[float, Run], radii: Sequence[float]) -> list[Best]:
    """At each radius, the best certified accuracy over sigma (ties go to the smallest sigma)."""
    per_sigma = {sigma: run.certified_accuracy(radii) for sigma, run in sorted(runs.items())}
    return [max((Best(acc[i], sigma) for sigma, acc in per_sigma.items()), key=lambda b: (b.accuracy, -b.sigma))
            for i in range(len(radii))]


def curve_radii(runs: Mapping[float, Run], step: float = CURVE_STEP) -> list[float]:
    """0, step, 2 step, ... up to the first grid point past the largest radius (where every curve is 0)."""
    top = max(float(run.radius.max()) for run in runs.values())
    last = math.floor(top / step)
    while round(last * step, 10) <= top:
        last += 1
    return [round(k * step, 10) for k in range(last + 1)]


@dataclass(frozen=True)
class Summary:
    radii: list[float]  # the report grid (params report.radii)
    runs: dict[float, Run]  # by sigma, ascending

    @classmethod
    def of(cls, runs: Mapping[float, Run], radii: Sequence[float]) -> "Summary":
        return cls(sorted(float(r) for r in set(radii)), dict(sorted(runs.items())))

    @property
    def examples(self) -> int:
        return len(next(iter(self.runs.values())).radius)

    def best(self, radii: Sequence[float] | None = None) -> list[Best]:
        return best_over_sigma(self.runs, self.radii if radii is None else radii)

    def best_acr(self) -> Best:
        """The highest per-sigma ACR (ties go to the smallest sigma)."""
        return max((Best(run.acr, sigma) for sigma, run in self.runs.items()), key=lambda b: (b.accuracy, -b.sigma))

    def curves(self) -> tuple[list[float], dict[float, list[float]], list[float]]:
        """Certified accuracy sampled on a fine radius grid: (grid, per-sigma values, best over sigma)."""
        grid = curve_radii(self.runs)
        per_sigma = {sigma: run.certified_accuracy(grid) for sigma, run in self.runs.items()}
        return grid, per_sigma, [max(values) for values in zip(*per_sigma.values())]


def radius_key(r: float) -> str:
    return f"r={float(r)!r}"


def sigma_key(sigma: float) -> str:
    return f"sigma={float(sigma)!r}"


def _num(x: float) -> float:
    return round(float(x), 6)


def certification_metrics(summary: Summary) -> dict:
    """The DVC metrics: headline (best over sigma) at the grid radii, best ACR, and everything per sigma."""
    best, acr = summary.best(), summary.best_acr()
    return {
        "examples": summary.examples,
        "certified_accuracy": {radius_key(r): _num(b.accuracy) for r, b in zip(summary.radii, best)},
        "best_sigma": {radius_key(r): b.sigma for r, b in zip(summary.radii, best)},
        "acr": _num(acr.accuracy),
        "acr_sigma": acr.sigma,
        "per_sigma": {
            sigma_key(sigma): {
                "certified_accuracy": {radius_key(r): _num(a)
                                       for r, a in zip(summary.radii, run.certified_accuracy(summary.radii))},
                "acr": _num(run.acr),
                "abstain_rate": _num(run.abstain_rate),
                "clean_accuracy": _num(run.clean_accuracy),
                "mean_samples": _num(run.mean_samples),
                "median_samples": _num(run.median_samples),
            }
            for sigma, run in summary.runs.items()
        },
    }


def curve_rows(summary: Summary) -> tuple[list[dict], list[str]]:
    """The curves as TSV rows (radius, one column per sigma, best last) and their column names."""
    grid, per_sigma, best = summary.curves()
    columns = ["radius", *map(sigma_key, per_sigma), "best"]
    rows = [{"radius": r, **{sigma_key(s): v[i] for s, v in per_sigma.items()}, "best": best[i]}
            for i, r in enumerate(grid)]
    return rows, columns
