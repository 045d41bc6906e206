"""The guarantee of randomized smoothing, measured: on a linear base classifier the smoothed classifier and its
true certified radius are known exactly (Cohen et al. 2019), so the rate of false certificates of CERTIFY and
the error rate of PREDICT can be counted, and must not exceed alpha beyond binomial sampling error.

For f(x) = [w.x + b > 0] with ||w|| = 1, the point x = CENTER + m*w lies at signed distance m from the boundary:
g(x) = [m > 0] and the true radius is |m|. A certificate is false if its class is wrong or its radius exceeds
|m|; a PREDICT answer is an error if it is a class other than [m > 0] (abstaining is never an error).

Each case also checks that the test can fail: the same samples judged without the confidence bound (the point
estimate of pA, or the plain majority vote) break the bound by far. Reduced sizes run by default; the full size
(10,000 inputs per case, alpha 0.01 and 0.05, fp32 and bf16 autocast) is marked slow. The noise is seeded, so
every count is deterministic (the counts measured are in docs/reliability.md).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, norm

from dmae.smoothing import ABSTAIN, ESTIMATION, PREDICTION, SELECTION
from dmae.smoothing.engine import mixture_job, run_jobs, union_job
from tests.test_smoothing import CENTER, linear_smooth

SIGMA, N0, N, BATCH = 0.25, 32, 300, 512
LEVEL = 1e-4  # one-sided level of the binomial test "rate <= alpha"


def upper_bound(trials: int, alpha: float) -> int:
    """The most failures a procedure with failure probability alpha shows in `trials`, at level LEVEL."""
    return int(binom.ppf(1 - LEVEL, trials, alpha))


def clopper_pearson(k: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    low = 0.0 if k == 0 else beta.ppf(a, k, trials - k + 1)
    high = 1.0 if k == trials else beta.ppf(1 - a, k + 1, trials - k)
    return float(low), float(high)


def report(what: str, k: int, trials: int, alpha: float, precision: str) -> str:
    low, high = clopper_pearson(k, trials)
    return (f"{what} ({precision}, alpha {alpha}): {k}/{trials} = {k / trials:.4f} "
            f"(95% CI {low:.4f}..{high:.4f}); allowed <= {upper_bound(trials, alpha)}")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches run fastest on one thread; on a shared CPU more threads only contend (bf16 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = [
    pytest.param(0.1, 2000, "fp32", id="alpha0.1-2000-fp32"),
    pytest.param(0.05, 2000, "fp32", id="alpha0.05-2000-fp32"),
    pytest.param(0.05, 2000, "bf16", id="alpha0.05-2000-bf16"),
    pytest.param(0.01, 10_000, "fp32", id="alpha0.01-10000-fp32", marks=pytest.mark.slow),
    pytest.param(0.01, 10_000, "bf16", id="alpha0.01-10000-bf16", marks=pytest.mark.slow),
    pytest.param(0.05, 10_000, "fp32", id="alpha0.05-10000-fp32", marks=pytest.mark.slow),
    pytest.param(0.05, 10_000, "bf16", id="alpha0.05-10000-bf16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("alpha, trials, precision", CASES)
def test_false_certificate_rate_at_most_alpha_on_linear_oracle(alpha, trials, precision):
    smooth, w = linear_smooth(SIGMA, precision=precision)
    margins = np.random.default_rng(0).uniform(-0.5, 0.5, trials)
    false = certified = naive_false = 0
    for index, margin in enumerate(margins):
        truth, true_radius = int(margin > 0), abs(float(margin))
        x = CENTER + float(margin) * w
        predict, radius = smooth.certify(x, N0, N, alpha, BATCH, index=index)
        if predict != ABSTAIN:
            certified += 1
            false += predict != truth or radius > true_radius
        # the same samples, certified with the point estimate of pA instead of its lower confidence bound
        c_a = int(np.argmax(smooth.sample_counts(x, N0, BATCH, index=index, phase=SELECTION)))
        p_hat = smooth.sample_counts(x, N, BATCH, index=index, phase=ESTIMATION)[c_a] / N
        if p_hat > 0.5:
            naive_false += c_a != truth or SIGMA * norm.ppf(min(p_hat, 1 - 1e-12)) > true_radius
    print(report("false certificates", false, trials, alpha, precision))
    print(report("point-estimate false certificates", naive_false, trials, alpha, precision))
    assert false <= upper_bound(trials, alpha), report("false certificates", false, trials, alpha, precision)
    assert naive_false > upper_bound(trials, alpha)  # the test has the power to catch a missing bound
    assert certified >= trials // 2  # not vacuous: most inputs get a certificate


@pytest.mark.parametrize("alpha, trials, precision", CASES)
def test_predict_error_rate_at_most_alpha_on_linear_oracle(alpha, trials, precision):
    # Inputs close to the boundary (true pA within 0.47..0.53): a majority vote is wrong about a third of the time.
    smooth, w = linear_smooth(SIGMA, precision=precision)
    margins = np.random.default_rng(1).uniform(-0.02, 0.02, trials)
    errors = answered = naive_errors = 0
    for index, margin in enumerate(margins):
        truth = int(margin > 0)
        x = CENTER + float(margin) * w
        predict = smooth.predict(x, N, alpha, BATCH, index=index)
        if predict != ABSTAIN:
            answered += 1
            errors += predict != truth
        # the same samples, answered by the plain majority vote (no hypothesis test, never abstains)
        naive_errors += int(np.argmax(smooth.sample_counts(x, N, BATCH, index=index, phase=PREDICTION))) != truth
    print(report("PREDICT errors", errors, trials, alpha, precision))
    print(report("majority-vote errors", naive_errors, trials, alpha, precision))
    assert errors <= upper_bound(trials, alpha), report("PREDICT errors", errors, trials, alpha, precision)
    assert naive_errors > upper_bound(trials, alpha)
    assert answered >= trials // 50  # not vacuous: it does answer


# -- adaptive certification: valid whatever the stopping time -----------------------------------------------------
N_MAX = 1000  # union: looks at 32, 64, 128, 256, 512 and 1000 estimation samples; mixture: wherever a decision can
RADII = [0.0, 0.1, 0.2, 0.3]  # bracket boundaries at pA = Phi(r / sigma)
ADAPTIVE = [
    pytest.param("mixture", 0.1, 1500, id="mixture-alpha0.1-1500"),
    pytest.param("union", 0.1, 1500, id="union-alpha0.1-1500"),
    pytest.param("mixture", 0.01, 10_000, id="mixture-alpha0.01-10000", marks=pytest.mark.slow),
    pytest.param("mixture", 0.05, 10_000, id="mixture-alpha0.05-10000", marks=pytest.mark.slow),
    pytest.param("union", 0.05, 10_000, id="union-alpha0.05-10000", marks=pytest.mark.slow),
    pytest.param("union", 0.01, 10_000, id="union-alpha0.01-10000", marks=pytest.mark.slow),
]
JOBS = {"mixture": mixture_job, "union": union_job, "naive": partial(union_job, naive=True)}


def adaptive_false_certificates(method: str, alpha: float, margins: np.ndarray) -> tuple[int, int, float]:
    """(false certificates, certificates, mean estimation samples) of an adaptive method on inputs at `margins`."""
    smooth, w = linear_smooth(SIGMA)
    jobs = ((i, CENTER + float(m) * w, JOBS[method](N0, N_MAX, alpha, SIGMA, RADII)) for i, m in enumerate(margins))
    results = dict(run_jobs(smooth.classify(BATCH), 2, SIGMA, smooth.seed, jobs, BATCH, smooth.device))
    false = certified = 0
    for i, (predict, radius, _, _) in results.items():
        if predict != ABSTAIN:
            certified += 1
            false += predict != int(margins[i] > 0) or radius > abs(margins[i])
    return false, certified, float(np.mean([samples for _, _, samples, _ in results.values()]))


@pytest.mark.parametrize("method, alpha, trials", ADAPTIVE)
def test_adaptive_false_certificate_rate_at_most_alpha_at_bracket_boundaries(method, alpha, trials):
    """Inputs whose true radius is exactly a bracket boundary, where stopping at the first look whose lower bound
    clears the boundary is most tempting: the method keeps the rate within alpha; re-applying the Clopper-Pearson
    bound at level alpha after every look (the naive method, the negative control) does not."""
    margins = np.asarray(RADII[1:])[np.arange(trials) % (len(RADII) - 1)]
    false, certified, _ = adaptive_false_certificates(method, alpha, margins)
    naive, _, _ = adaptive_false_certificates("naive", alpha, margins)
    print(report(f"{method} false certificates at boundaries", false, trials, alpha, "fp32"))
    print(report("naive repeated testing, false certificates", naive, trials, alpha, "fp32"))
    assert false <= upper_bound(trials, alpha), report(f"{method} false certificates", false, trials, alpha, "fp32")
    assert naive > upper_bound(trials, alpha)  # naive repeated testing breaks the guarantee here
    assert certified >= trials // 2


@pytest.mark.parametrize("method, alpha, trials", ADAPTIVE)
def test_adaptive_false_certificate_rate_at_most_alpha_on_linear_oracle(method, alpha, trials):
    margins = np.random.default_rng(2).uniform(-0.5, 0.5, trials)
    false, certified, samples = adaptive_false_certificates(method, alpha, margins)
    print(report(f"{method} false certificates", false, trials, alpha, "fp32"), f"mean samples {samples:.0f}")
    assert false <= upper_bound(trials, alpha)
    assert certified >= trials // 2
    assert samples < N_MAX  # some inputs stop early (the savings are measured in docs/benchmarks.md)
