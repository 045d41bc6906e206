"""Confidence bounds on the top-class probability pA, and the anytime-valid bounds of adaptive CERTIFY.

Adaptive CERTIFY looks at the estimation counts after n_1 < n_2 < ... < n_K = n_max samples (`looks`) and may
stop at any look. At look j it uses one-sided Clopper-Pearson bounds at level alpha_j (`look_alphas`), with
sum_j alpha_j = alpha. Validity under any stopping rule (docs/certification.md derives it): the event "the
certificate overstates pA" at the stopped look tau is contained in the union over j of {pA < L_j}, each of
probability <= alpha_j, so P(pA < L_tau) <= sum_j alpha_j = alpha whatever tau is. The upper bound U_j and the
best bound a later look could reach only decide when to stop (`decided`), so they need no share of alpha for the
certificate to hold.
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


def decided(lower: float, upper: float, best: float, cuts: np.ndarray) -> bool:
    """True once more samples cannot raise the certificate to another tabulated radius: the next threshold above
    `lower` (the bound now) is above `upper` (pA lies below it, w.p. >= 1 - alpha_j), or above `best` (the highest
    lower bound any later look could give, every remaining sample agreeing), or there is none."""
    above = cuts[cuts > lower]
    return not len(above) or upper < above[0] or best < above[0]


def best_later(n_a: int, n: int, later: list[int], alphas: list[float]) -> float:
    """The highest lower bound a later look (n_j samples, level alpha_j) can give if every further sample
    agrees with the top class; 0 when there is no later look."""
    return max((lower_confidence_bound(n_a + m - n, m, a) for m, a in zip(later, alphas)), default=0.0)


def radius_from_lower(lower: float, sigma: float) -> float | None:
    """The certified radius of a lower bound on pA, or None (abstain) when it is below 1/2."""
    return None if lower < 0.5 else float(sigma * norm.ppf(lower))
