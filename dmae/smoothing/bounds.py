"""Confidence bounds on the top-class probability pA, and the anytime-valid bounds of adaptive CERTIFY.

Adaptive CERTIFY looks at the estimation counts after n_1 < n_2 < ... < n_K = n_max samples (`looks`) and may
stop at any look. At look j it uses one-sided Clopper-Pearson bounds at level alpha_j (`look_alphas`), with
sum_j alpha_j = alpha. Validity under any stopping rule (docs/certification.md derives it): the event "the
certificate overstates pA" at the stopped look tau is contained in the union over j of {pA < L_j}, each of
probability <= alpha_j, so P(pA < L_tau) <= sum_j alpha_j = alpha whatever tau is; the upper bound U_j only
decides when to stop (an early abstention), so it needs no share of alpha for the certificate to hold.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta, norm

FIRST_LOOK = 32  # estimation samples at the first look; each look doubles, the last is n_max
FINAL_SHARE = 0.5  # share of alpha spent at the last look (the rest is split equally over the earlier ones)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n."""
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def upper_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound."""
    if n_a == n:
        return 1.0
    return float(beta.ppf(1 - alpha, n_a + 1, n - n_a))


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: all n agree, so pA_lower = alpha ** (1 / n)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def looks(n_max: int, first: int = FIRST_LOOK) -> list[int]:
    """The sample counts at which adaptive CERTIFY may stop: first, 2 first, 4 first, ... below n_max, then n_max."""
    out, n = [], first
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def look_alphas(k: int, alpha: float, naive: bool = False) -> list[float]:
    """The level of each of k looks, summing to alpha; `naive` spends alpha at every look (not valid: for
    comparison only, it is what re-applying Clopper-Pearson after every batch does)."""
    if naive:
        return [alpha] * k
    if k == 1:
        return [alpha]
    return [alpha * (1 - FINAL_SHARE) / (k - 1)] * (k - 1) + [alpha * FINAL_SHARE]


def thresholds(radii, sigma: float) -> np.ndarray:
    """The pA values at which the certified radius sigma * Phi^-1(pA) reaches each radius (0.5 for radius 0)."""
    return np.unique(norm.cdf(np.asarray([0.0, *radii], dtype=np.float64) / sigma))


def decided(lower: float, upper: float, cuts: np.ndarray) -> bool:
    """True once [lower, upper] lies in one bracket between consecutive thresholds: every threshold t is either
    certified already (lower >= t) or out of reach (upper < t), so more samples cannot change which tabulated
    radii the certificate reaches."""
    return bool(np.all((lower >= cuts) | (upper < cuts)))


def reachable(cuts: np.ndarray, n_looks: list[int], alphas: list[float]) -> np.ndarray:
    """The thresholds some look could certify (all its samples agreeing); the others can never be reached, so
    they decide nothing."""
    best = max(lower_confidence_bound(n, n, a) for n, a in zip(n_looks, alphas))
    return cuts[cuts <= best]


def radius_from_lower(lower: float, sigma: float) -> float | None:
    """The certified radius of a lower bound on pA, or None (abstain) when it is below 1/2."""
    return None if lower < 0.5 else float(sigma * norm.ppf(lower))
