"""Confidence bounds on the top-class probability pA: Clopper-Pearson for CERTIFY, and the anytime-valid sequences
of adaptive certification.

An adaptive method looks at the estimation counts (nA of n samples voting cA) at looks of its choosing and may stop
at any of them. Its sequence answers, at a look: is pA > t shown (`certifies`), is it no use sampling on for t
(`futile`), where to look next (`next_look`), and which lower bound to report (`lower`). Valid means: with
probability at least 1 - alpha, pA is above every bound the sequence gives at any look, so the certificate holds
whatever the stopping time. `futile` only decides when to stop and needs no share of alpha. docs/certification.md
derives both sequences:

- `MixtureSequence` (method 'mixture'): a confidence sequence from one-sided beta-binomial mixture martingales
  (Robbins' mixture over the alternatives above each p), valid at every sample count by Ville's inequality; the
  prior is the posterior of pA given the N0 selection samples. It looks where a decision first becomes possible,
  spends MIXTURE_FINAL_SHARE of alpha on Clopper-Pearson at n_max, and gives up on t when the posterior chance
  that the count at n_max certifies it is below FUTILITY.
- `UnionOfLooks` (method 'union'): Clopper-Pearson bounds at looks 32, 64, 128, ... and n_max, with alpha split
  over the looks (a union bound). With `naive=True` it spends alpha at every look: NOT valid, for comparison.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Protocol

import numpy as np
from scipy.special import betainc, betaincc, betainccinv, betaln, gammaln
from scipy.stats import beta, norm

FIRST_LOOK = 32  # union: estimation samples at the first look; each look doubles, the last is n_max
FINAL_SHARE = 0.5  # union: share of alpha spent at the last look (the rest is split equally over the earlier ones)
PRIOR = (0.5, 0.5)  # mixture: Jeffreys' Beta(1/2, 1/2), updated with the selection counts
MIXTURE_FINAL_SHARE = 0.9  # mixture: share of alpha spent on Clopper-Pearson at n_max (the rest on the sequence)
FUTILITY = 1e-3  # mixture: give up on a radius when the chance that sampling on to n_max certifies it is below this
CUT_ULPS = 16  # thresholds are raised by this many units in the last place, beyond the rounding of norm.cdf
ROUNDING = 1e-9  # relative margin of a mixture's log value over its rounding error (terms of size 1e4: ~1e-12)
BISECTIONS = 64  # halvings of [0, nA / n] when computing the mixture's lower bound (below 2 ** -64: a float's ulp)
STOP_LOOKS = 64  # mixture: futility is looked at at least n / STOP_LOOKS samples apart
COVER_STEPS = 64  # most steps of `MixtureSequence.covered` (each multiplies the bound's excess; a few suffice)
STEP_MARGIN = 1e-6  # `covered` aims each step at a prior mass this much (in log) below the bound, past rounding
TAIL_BLOCK = 512  # predictive_tail: terms summed per block
TAIL_DROP = 50.0  # predictive_tail: stop once a term is e^-50 below the first (the rest, falling, is negligible)
TINY = 1e-290  # probabilities below this (near the subnormals) are taken as lost: nothing is certified from them


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


def brackets(radii, sigma: float) -> tuple[list[float], list[float]]:
    """The tabulated radii (0 included, ascending) and the pA each needs: Phi(r / sigma), raised by CUT_ULPS so
    that showing pA above it shows pA >= Phi(r / sigma) despite rounding. A radius whose threshold rounds to 1
    cannot be certified with finitely many samples and is left out."""
    pairs = {}
    for r in sorted({0.0, *map(float, radii)}):
        t = float(norm.cdf(r / sigma))
        t += CUT_ULPS * float(np.spacing(t))
        if t < 1 and t not in pairs:
            pairs[t] = r
    return list(pairs.values()), list(pairs)


def radius_from_lower(lower: float, sigma: float) -> float | None:
    """The certified radius of a lower bound on pA, or None (abstain) when it is below 1/2."""
    return None if lower < 0.5 else float(sigma * norm.ppf(lower))


class ConfidenceSequence(Protocol):
    """The bounds of an adaptive method at a look with n_a of n samples voting cA (see the module doc)."""

    n_max: int

    def certifies(self, n_a: int, n: int, t: float) -> bool: ...
    def futile(self, n_a: int, n: int, t: float) -> bool: ...
    def next_look(self, n_a: int, n: int, t: float) -> int: ...
    def lower(self, n_a: int, n: int) -> float: ...


# -- the beta-binomial mixture --------------------------------------------------------------------------------------

class MixtureSequence:
    """One-sided beta-binomial mixtures (Robbins 1970; Howard et al. 2021). For the prior Beta(a, b) and p in (0, 1),

        M_n(p) = [integral over q > p of (q / p)^nA ((1 - q) / (1 - p))^(n - nA) dBeta(q; a, b)] / P(Beta(a, b) > p),

    the likelihood ratio of the alternatives above p averaged over the prior restricted to them, is a martingale
    with mean 1 when pA = p, so by Ville's inequality P(M_n(pA) >= 1 / alpha' at some n) <= alpha'. The sequence
    rejects p when M_n(p) >= 1 / alpha', and certifies t when it rejects every p <= t: then t < pA, unless pA itself
    was rejected at some n. Of alpha it gets alpha' = (1 - final_share) alpha; Clopper-Pearson at n_max gets the
    rest (a union bound of the two: a fixed n is where Clopper-Pearson is at its best)."""

    def __init__(self, n_max: int, alpha: float, a: float, b: float, final_share: float = MIXTURE_FINAL_SHARE):
        self.n_max, self.a, self.b = n_max, a, b
        self.level = math.log(1 / ((1 - final_share) * alpha))
        self.final_alpha = final_share * alpha
        self.prior = float(betaln(a, b))
        self._masses: dict[float, float | None] = {}
        self._needs: dict[float, int] = {}

    @classmethod
    def from_selection(cls, n_max: int, alpha: float, n_a0: int, n0: int) -> "MixtureSequence":
        """The prior is the posterior of pA given the selection samples (n_a0 of n0 voting cA), which are
        independent of the estimation samples: it is fixed before the first estimation sample is drawn."""
        return cls(n_max, alpha, PRIOR[0] + n_a0, PRIOR[1] + n0 - n_a0)

    def log_tail(self, n_a: int, n: int, p: float) -> float | None:
        """log of the integral over q above p of the likelihood ratio against p, lowered by a margin beyond its
        rounding error; None where the posterior's mass there underflows."""
        a, b = self.a + n_a, self.b + n - n_a
        mass = _log(betaincc(a, b, p))
        if mass is None:
            return None
        terms = (float(betaln(a, b)), mass, -self.prior, -n_a * math.log(p), -(n - n_a) * math.log1p(-p))
        return math.fsum(terms) - ROUNDING * (1 + sum(map(abs, terms)))

    def log_prior_mass(self, p: float) -> float | None:
        """log P(Beta(a, b) > p), raised by a margin beyond its rounding error; None on underflow."""
        if p not in self._masses:  # kept: the thresholds come back at every look
            mass = _log(betaincc(self.a, self.b, p))
            self._masses[p] = None if mass is None else mass + ROUNDING * (1 + abs(mass))
        return self._masses[p]

    def rejects(self, n_a: int, n: int, p: float) -> bool:
        """M_n(p) >= 1 / alpha'."""
        tail, mass = self.log_tail(n_a, n, p), self.log_prior_mass(p)
        return tail is not None and mass is not None and tail - mass >= self.level

    def covered(self, n_a: int, n: int, t: float) -> bool:
        """Every p <= t (< nA / n) is rejected. Below nA / n the integral falls as p rises, and so does the prior
        mass above p, so on [low, high] M_n >= integral(high) / mass(low): from high = t, step down to the low where
        that bound is 1 / alpha' until the integral alone reaches it (the mass is at most 1)."""
        high = t
        for _ in range(COVER_STEPS):
            tail = self.log_tail(n_a, n, high)
            if tail is None:
                return False
            budget = tail - self.level  # log of the largest prior mass above `low` that keeps the bound
            if budget >= 0:
                return True
            low = float(betainccinv(self.a, self.b, math.exp(budget - STEP_MARGIN)))
            mass = self.log_prior_mass(low)
            if mass is None or mass > budget or low >= high:
                return False
            high = low
        return False

    def certifies(self, n_a: int, n: int, t: float) -> bool:
        return (n_a > t * n and self.rejects(n_a, n, t) and self.covered(n_a, n, t)) or self._final(n_a, n, t)

    def futile(self, n_a: int, n: int, t: float) -> bool:
        if t not in self._needs:
            self._needs[t] = fewest_votes(lambda c: self._may_certify(c, self.n_max, t), self.n_max)
        return predictive_futility(self._needs[t], n_a, n, self.n_max, self.a, self.b)

    def next_look(self, n_a: int, n: int, t: float) -> int:
        """The first sample count at which t may be certified (every sample from here on voting cA), or n_max;
        or, if earlier, the first at which t may become futile (every one voting otherwise), but at least
        n / STOP_LOOKS samples on: a rule that only stops sampling may look a little late, at most that share
        more samples, instead of after every few samples."""
        left = self.n_max - n
        up = _first(lambda m: self._may_certify(n_a + m, n + m, t), left)
        down = _first(lambda m: self.futile(n_a, n + m, t), left)
        return n + min(up, max(down, math.ceil(n / STOP_LOOKS)))

    def lower(self, n_a: int, n: int) -> float:
        """The lower end of the confidence sequence: the largest p found `covered` (bisection, kept on the covered
        side), and at n_max the larger of it and Clopper-Pearson's; 0 when no sample votes cA."""
        low, high = 0.0, n_a / n
        if n_a:
            for _ in range(BISECTIONS):
                mid = (low + high) / 2
                if self.rejects(n_a, n, mid) and self.covered(n_a, n, mid):
                    low = mid
                else:
                    high = mid
        return max(low, lower_confidence_bound(n_a, n, self.final_alpha)) if self._at_final(n) else low

    def _may_certify(self, n_a: int, n: int, t: float) -> bool:
        """t is rejected (`covered` aside: a stopping rule need not check every p below t)."""
        return (n_a > t * n and self.rejects(n_a, n, t)) or self._final(n_a, n, t)

    def _at_final(self, n: int) -> bool:
        return n == self.n_max and self.final_alpha > 0

    def _final(self, n_a: int, n: int, t: float) -> bool:
        """Clopper-Pearson at n_max shows pA > t: P(Binomial(n, t) >= nA) = I_t(nA, n - nA + 1) <= alpha."""
        return self._at_final(n) and n_a > 0 and betainc(n_a, n - n_a + 1, t) <= self.final_alpha * (1 - ROUNDING)


def fewest_votes(certifies_at_n_max: Callable[[int], bool], n_max: int) -> int:
    """The fewest votes for cA of n_max samples that certify a threshold (n_max + 1 if none do)."""
    return bisect.bisect_left(range(n_max + 1), True, key=certifies_at_n_max)


def predictive_futility(need: int, n_a: int, n: int, n_max: int, a: float, b: float) -> bool:
    """Sampling on is futile for a threshold that `need` votes of n_max samples certify: the posterior chance
    (prior Beta(a, b) updated with nA of n) that the count at n_max reaches `need` is below FUTILITY; certain when
    even every further sample voting cA would not reach it (at n_max, always short of it). A stopping rule only: it
    takes no alpha, and FUTILITY sets how rarely an image stops short of a radius more samples would certify."""
    more, left = need - n_a, n_max - n
    return more > left or (more > 0 and predictive_tail(more, left, a + n_a, b + n - n_a) < FUTILITY)


def predictive_tail(k: int, m: int, a: float, b: float) -> float:
    """P(BetaBinomial(m, a, b) >= k), summed from k away from the bulk in blocks until a term is negligible
    against the first (the pmf is unimodal: past the mode the terms only fall), so its cost grows with the spread,
    not with m (scipy's sf sums all m terms); as 1 - P(X < k), summed downwards, when k is below the mean."""
    upper = k > m * a / (a + b)
    total, start, first = 0.0, (k if upper else k - 1), None
    while 0 <= start <= m:
        j = (np.arange(start, min(start + TAIL_BLOCK, m + 1)) if upper
             else np.arange(start, max(start - TAIL_BLOCK, -1), -1))
        log_pmf = (gammaln(m + 1) - gammaln(j + 1) - gammaln(m - j + 1) + betaln(j + a, m - j + b) - betaln(a, b))
        first = log_pmf[0] if first is None else first
        total += float(np.exp(log_pmf).sum())
        if log_pmf[-1] < first - TAIL_DROP:
            break
        start = j[-1] + (1 if upper else -1)
    return min(total, 1.0) if upper else max(1.0 - total, 0.0)


def _log(x: float) -> float | None:
    """log x, or None where x is too small to hold its digits (subnormal or 0)."""
    return math.log(x) if x > TINY else None


def _first(holds, most: int) -> int:
    """The least m in 1..most where `holds` (false, then true from some m on), or `most` if it never holds."""
    return min(bisect.bisect_left(range(1, most + 1), True, key=holds) + 1, most)


# -- Clopper-Pearson with alpha split over a fixed schedule of looks -------------------------------------------------

def looks(n_max: int, first: int = FIRST_LOOK) -> list[int]:
    """The sample counts at which the union method may stop: first, 2 first, 4 first, ... below n_max, then n_max."""
    out, n = [], first
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def look_alphas(k: int, alpha: float, naive: bool = False) -> list[float]:
    """The level of each of k looks, summing to alpha; `naive` spends alpha at every look (not valid: for
    comparison only, it is what re-applying Clopper-Pearson after every look does)."""
    if naive:
        return [alpha] * k
    if k == 1:
        return [alpha]
    return [alpha * (1 - FINAL_SHARE) / (k - 1)] * (k - 1) + [alpha * FINAL_SHARE]


class UnionOfLooks:
    """Clopper-Pearson bounds at look j at level alpha_j, sum_j alpha_j = alpha: P(pA < L_j at some look) <=
    sum_j P(pA < L_j) <= alpha (a union bound)."""

    def __init__(self, n_max: int, alpha: float, naive: bool = False):
        self.n_max = n_max
        self.at = looks(n_max)
        self.alphas = look_alphas(len(self.at), alpha, naive)

    def _level(self, n: int) -> float:
        return self.alphas[self.at.index(n)]

    def certifies(self, n_a: int, n: int, t: float) -> bool:
        return self.lower(n_a, n) >= t

    def futile(self, n_a: int, n: int, t: float) -> bool:
        """pA < t is shown at this look's level, or no later look (m samples, level alpha_m) gives a lower bound
        >= t even if every further sample agrees."""
        j = self.at.index(n) + 1
        return upper_confidence_bound(n_a, n, self._level(n)) < t or not any(
            lower_confidence_bound(n_a + m - n, m, a) >= t for m, a in zip(self.at[j:], self.alphas[j:]))

    def next_look(self, n_a: int, n: int, t: float) -> int:
        return next(m for m in self.at if m > n)

    def lower(self, n_a: int, n: int) -> float:
        return lower_confidence_bound(n_a, n, self._level(n))


# -- what a fixed-N test would need --------------------------------------------------------------------------------

def fewest_samples(p: float, t: float, alpha: float) -> int | None:
    """The fewest samples n with which CERTIFY, if pA = p and it saw the expected n p votes, shows pA >= t: the
    Clopper-Pearson bound at the real-valued count n p reaches t (with p = 1, n >= ln(1/alpha) / ln(1/t)). None
    when p <= t (no sample count suffices)."""
    if p <= t:
        return None

    def enough(n: int) -> bool:
        return n > 0 and beta.ppf(alpha, n * p, n * (1 - p) + 1) >= t

    most = 1
    while not enough(most):
        most *= 2
    return bisect.bisect_left(range(most + 1), True, key=enough)
