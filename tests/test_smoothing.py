"""Randomized smoothing: statistical checks against a linear base classifier whose smoothed pA is exact."""

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import betaln
from scipy.stats import beta, betabinom, binomtest, norm
from torch import nn

from dmae.smoothing import (
    ABSTAIN,
    ESTIMATION,
    SELECTION,
    Smooth,
    block_seed,
    certify_from_counts,
    lower_confidence_bound,
    predict_from_counts,
    radius_cap,
)
from dmae.smoothing.bounds import (CUT_ULPS, FUTILITY, STOP_LOOKS, MixtureSequence, UnionOfLooks, _first, brackets,
                                   fewest_samples, look_alphas, looks, predictive_tail)
from dmae.util.errors import UserError
from tools.certify_bench import LinearBinary

SHAPE = (2, 2, 2)
CENTER = torch.full(SHAPE, 0.5)
PINNED_SEED = 16425303213512341852  # block_seed(0, 0.25, 3, SELECTION, 0)


class ThreeWay(nn.Module):
    """No parameters; three classes at 120 degrees in the first two pixels, so at x = 0 each has pA = 1/3."""

    def forward(self, x):
        angles = torch.tensor([0.0, 2.0944, 4.1888])
        directions = torch.stack((angles.cos(), angles.sin()), dim=1)
        return x.flatten(1)[:, :2] @ directions.T


def unit_direction(seed=0) -> torch.Tensor:
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return w / w.norm()


def linear_smooth(sigma=0.25, seed=0, **kwargs):
    """A smoothed classifier whose boundary passes through CENTER with unit normal w; x = CENTER + m*w is at
    signed distance m, so its true class is [m > 0] and its true radius |m|."""
    w = unit_direction()
    return Smooth(LinearBinary(w, -float((w * CENTER).sum())), 2, sigma, seed=seed, **kwargs), w


# The false-certificate rate on the linear oracle (alpha 0.1, 0.05, 0.01; fp32 and bf16; up to 10,000 inputs) and
# PREDICT's error rate: tests/test_reliability_guarantee.py.


def test_abstains_when_true_pa_below_half():
    smooth = Smooth(ThreeWay(), 3, 0.5)
    for index in range(5):
        assert smooth.certify(torch.zeros(SHAPE), 30, 500, 0.01, 200, index=index) == (ABSTAIN, 0.0)


def test_radius_close_to_truth_for_large_n():
    sigma = 0.25
    smooth, w = linear_smooth(sigma)
    predict, radius = smooth.certify(CENTER + sigma * w, 100, 100_000, 0.001, 10_000)
    assert predict == 1
    assert 0.96 * sigma <= radius <= sigma


def test_radius_cap_when_all_samples_agree():
    sigma, n, alpha = 0.5, 1000, 0.001
    smooth = Smooth(LinearBinary(torch.zeros(SHAPE), 1.0), 2, sigma)
    predict, radius = smooth.certify(CENTER, 10, n, alpha, 256)
    assert predict == 1
    assert radius == pytest.approx(radius_cap(sigma, n, alpha), rel=1e-12)
    assert radius_cap(sigma, n, alpha) == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize("n_a, n", [(0, 10), (1, 10), (5, 10), (10, 10), (37, 100), (990, 1000)])
def test_lower_confidence_bound_matches_exact_binomial_interval(n_a, n, alpha):
    # The two-sided exact interval at level 1 - 2 alpha has alpha in each tail.
    expected = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_predict_from_counts():
    assert predict_from_counts(np.array([5, 5, 0]), 0.05) == ABSTAIN  # a tie always abstains
    assert predict_from_counts(np.array([0, 50, 50]), 0.999) == ABSTAIN
    assert predict_from_counts(np.array([100, 0]), 0.001) == 0
    # binomtest(60, 100).pvalue = 0.057: two-sided, compared with alpha inclusively
    assert predict_from_counts(np.array([0, 60, 40]), 0.05) == ABSTAIN
    assert predict_from_counts(np.array([0, 60, 40]), 0.06) == 1


def test_certify_from_counts_uses_selection_class():
    # cA comes from the selection counts even when the estimation counts favour another class.
    assert certify_from_counts(np.array([9, 1]), np.array([10, 90]), 0.01, 1.0) == (ABSTAIN, 0.0)
    predict, radius = certify_from_counts(np.array([1, 9]), np.array([10, 90]), 0.01, 1.0)
    assert predict == 1 and radius == pytest.approx(norm.ppf(lower_confidence_bound(90, 100, 0.01)))


def test_predict_on_linear_oracle_and_three_way_tie():
    smooth, w = linear_smooth()
    assert smooth.predict(CENTER + 0.5 * w, 200, 0.01, 64) == 1
    assert smooth.predict(CENTER - 0.5 * w, 200, 0.01, 64) == 0
    assert Smooth(ThreeWay(), 3, 0.5).predict(torch.zeros(SHAPE), 300, 0.01, 64) == ABSTAIN


def test_results_do_not_depend_on_batch_size():
    smooth, w = linear_smooth(0.5)
    x = CENTER + 0.1 * w
    counts = [smooth.sample_counts(x, 600, bs, index=3, phase=ESTIMATION) for bs in (1, 7, 100, 256, 1000)]
    for other in counts[1:]:
        np.testing.assert_array_equal(counts[0], other)
    results = {smooth.certify(x, 50, 600, 0.01, bs, index=3) for bs in (1, 7, 100)}
    assert len(results) == 1 and results.pop()[0] == 1


def test_noise_depends_on_seed_index_and_phase():
    # The hash is pinned: results must be the same in every process and Python version.
    assert block_seed(0, 0.25, 3, SELECTION, 0) == PINNED_SEED
    seeds = {block_seed(0, 0.25, 3, SELECTION, 0), block_seed(1, 0.25, 3, SELECTION, 0),
             block_seed(0, 0.5, 3, SELECTION, 0), block_seed(0, 0.25, 4, SELECTION, 0),
             block_seed(0, 0.25, 3, ESTIMATION, 0), block_seed(0, 0.25, 3, SELECTION, 1)}
    assert len(seeds) == 6
    smooth, w = linear_smooth(0.5)
    x = CENTER + 0.05 * w
    draws = {tuple(smooth.sample_counts(x, 300, 64, index=i, phase=ESTIMATION)) for i in range(5)}
    assert len(draws) > 1


def test_bf16_precision_runs():
    smooth, w = linear_smooth(precision="bf16")
    predict, radius = smooth.certify(CENTER + 0.5 * w, 20, 200, 0.01, 64)
    assert predict == 1 and 0 < radius <= 0.5


@pytest.mark.parametrize(
    "kwargs, name",
    [({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
     ({"batch_size": 0}, "batch_size"), ({"n": 2.5}, "n")],
)
def test_bad_certify_args(kwargs, name):
    smooth, _ = linear_smooth()
    args = {"n0": 10, "n": 100, "alpha": 0.01, "batch_size": 10, **kwargs}
    with pytest.raises(UserError, match=f"^{name} "):
        smooth.certify(CENTER, **args)


@pytest.mark.parametrize(
    "args, name",
    [((2, 0.0), "sigma"), ((2, -1.0), "sigma"), ((2, float("nan")), "sigma"), ((1, 0.25), "num_classes")],
)
def test_bad_smooth_args(args, name):
    with pytest.raises(UserError, match=name):
        Smooth(ThreeWay(), *args)
    with pytest.raises(UserError, match="precision"):
        Smooth(ThreeWay(), 3, 0.25, precision="fp16")


def test_bad_predict_args_and_inputs():
    smooth, _ = linear_smooth()
    with pytest.raises(UserError, match="^alpha"):
        smooth.predict(CENTER, 100, 1.5, 10)
    with pytest.raises(UserError, match="x must be"):
        smooth.predict(CENTER[None], 100, 0.01, 10)
    with pytest.raises(UserError, match="num_classes=3"):
        Smooth(LinearBinary(torch.zeros(SHAPE), 1.0), 3, 0.25).certify(CENTER, 10, 10, 0.01, 10)


# -- adaptive certification ----------------------------------------------------------------------------------------
def test_looks_and_their_levels():
    assert looks(1000) == [32, 64, 128, 256, 512, 1000] and looks(20) == [20] and looks(64) == [32, 64]
    levels = look_alphas(6, 0.001)
    assert sum(levels) == pytest.approx(0.001) and levels[-1] == pytest.approx(0.0005)
    assert look_alphas(1, 0.01) == [0.01] and look_alphas(3, 0.01, naive=True) == [0.01] * 3


def test_brackets_raise_thresholds_past_rounding_and_drop_the_unreachable():
    radii, cuts = brackets([0.5, 0.25, 0.25, 9.0], 0.5)  # 9.0 is 18 sigma: Phi rounds to 1
    assert radii == [0.0, 0.25, 0.5]
    for r, t in zip(radii, cuts):
        exact = norm.cdf(r / 0.5)
        assert t == exact + CUT_ULPS * np.spacing(exact)


def test_union_is_clopper_pearson_at_each_looks_level():
    union = UnionOfLooks(1000, 0.001)  # looks 32, 64, 128, 256, 512, 1000
    low = lower_confidence_bound(120, 128, union.alphas[2])
    assert union.lower(120, 128) == low
    assert union.certifies(120, 128, low) and not union.certifies(120, 128, low + 1e-9)
    assert union.futile(60, 128, 0.7) and not union.futile(60, 128, 0.5)  # pA < 0.7 shown at this look's level
    best = max(lower_confidence_bound(m, m, a) for m, a in zip(union.at[1:], union.alphas[1:]))
    assert not union.futile(32, 32, best) and union.futile(32, 32, best + 1e-9)  # out of reach of every later look
    assert union.futile(1000, 1000, 0.5)  # no later look
    assert union.next_look(0, 0, 0.5) == 32 and union.next_look(500, 512, 0.9) == 1000


def test_mixture_is_the_beta_binomial_mixture_over_the_alternatives_above_p():
    sequence = MixtureSequence(1000, 0.01, 3.5, 1.5)
    for n_a, n, p in [(8, 10, 0.5), (30, 40, 0.6), (0, 5, 0.3), (40, 40, 0.9)]:
        ratio = quad(lambda q: (q / p) ** n_a * ((1 - q) / (1 - p)) ** (n - n_a) * beta.pdf(q, 3.5, 1.5), p, 1)[0]
        assert sequence.log_tail(n_a, n, p) == pytest.approx(np.log(ratio), rel=1e-7)
        assert sequence.log_prior_mass(p) == pytest.approx(np.log(beta.sf(p, 3.5, 1.5)), rel=1e-7)
    assert sequence.log_prior_mass(1 - 1e-300) is None  # underflow: nothing is certified from it


def test_mixture_lower_end_is_the_first_p_not_rejected():
    sequence = MixtureSequence(10_000, 0.001, 90.5, 10.5, final_share=0.25)  # the sequence at 0.75 alpha
    for n_a, n in [(950, 1000), (1000, 1000), (55, 100), (4990, 5000)]:
        low = sequence.lower(n_a, n)
        assert sequence.covered(n_a, n, low) and not sequence.rejects(n_a, n, low * (1 + 1e-6))  # rounding margins
        assert sequence.log_tail(n_a, n, low) - sequence.log_prior_mass(low) == pytest.approx(np.log(1 / 0.00075),
                                                                                          abs=1e-6)
        grid = np.linspace(low / 2, low, 200)  # every p below it is rejected, not only where `covered` looked
        assert all(sequence.rejects(n_a, n, p) for p in grid)
    assert sequence.lower(0, 10) == 0.0
    # every sample agreeing: B(a + n, b) P(Beta(a + n, b) > p) / (B(a, b) P(Beta(a, b) > p) p^n)
    assert sequence.log_tail(1000, 1000, 0.99) - sequence.log_prior_mass(0.99) == pytest.approx(
        betaln(1090.5, 10.5) + np.log(beta.sf(0.99, 1090.5, 10.5)) - betaln(90.5, 10.5)
        - np.log(beta.sf(0.99, 90.5, 10.5)) - 1000 * np.log(0.99), abs=1e-6)  # less the rounding margins


def test_one_sided_mixture_needs_fewer_agreeing_samples_than_two_sided():
    """With 100 agreeing selection samples, r = 3 sigma (t = Phi(3)) at alpha 0.001: the mass of the prior
    Beta(100.5, 1/2) below t (60 %) is not spent on alternatives that cannot certify t."""
    t = norm.cdf(3.0)
    one_sided = MixtureSequence(100_000, 0.001, 100.5, 0.5, final_share=0.0)
    n = _first(lambda m: one_sided.certifies(m, m, t), 100_000)
    two_sided = next(m for m in range(5000, 100_000, 10) if betaln(100.5 + m, 0.5) - betaln(100.5, 0.5) - m * np.log(t)
                     >= np.log(1000))
    assert fewest_samples(1.0, t, 0.001) == 5114 < n < 0.9 * two_sided


def test_mixture_spends_the_final_share_of_alpha_on_clopper_pearson_at_n_max():
    sequence, t = MixtureSequence(10_000, 0.001, 100.5, 0.5, final_share=0.25), norm.cdf(3.0)
    final = lower_confidence_bound(9_998, 10_000, 0.00025)
    assert final >= t and sequence.lower(9_998, 10_000) == final  # the sequence's own bound is lower here
    assert sequence.certifies(9_998, 10_000, t) and not sequence.certifies(9_997, 9_999, t)
    assert not sequence.futile(9_000, 9_002, t) and sequence.futile(9_000, 9_003, t)  # out of reach


def test_mixture_gives_up_when_the_posterior_chance_of_certifying_at_n_max_is_below_futility():
    sequence, t = MixtureSequence(10_000, 0.001, 100.5, 0.5), norm.cdf(3.0)
    need = next(c for c in range(9_990, 10_001) if sequence.certifies(c, 10_000, t))
    assert need == 9_997  # Clopper-Pearson at 9/10 of alpha allows 3 disagreeing samples of 10,000
    for n in (1_000, 2_000, 3_000, 5_000, 8_000):  # 3 disagreeing so far: every further sample must agree
        a, b = 100.5 + n - 3, 0.5 + 3
        chance = np.exp(betaln(a + 10_000 - n, b) - betaln(a, b))  # P(all agree) under Beta(a, b), closed form
        assert sequence.futile(n - 3, n, t) == (chance < FUTILITY)
    assert sequence.futile(996, 1_000, t)  # 4 disagree: out of reach
    assert not sequence.futile(1_000, 1_000, t)
    assert sequence.futile(900, 1_000, 0.95) and not sequence.futile(990, 1_000, 0.95)
    assert sequence.futile(9_999, 10_000, 0.5) or sequence.certifies(9_999, 10_000, 0.5)  # n_max: always decided


@pytest.mark.parametrize("k, m, a, b", [(1, 1, 0.5, 0.5), (9_990, 10_000, 9_000.5, 3.5), (5_200, 10_000, 60.5, 40.5),
                                        (95_000, 99_000, 9_000.5, 100.5), (40, 100_000, 0.5, 100.5), (3, 7, 2.0, 2.0)])
def test_predictive_tail_is_the_beta_binomial_upper_tail(k, m, a, b):
    """Summed from k away from the mode until negligible: the same as scipy's sum over all m terms."""
    assert predictive_tail(k, m, a, b) == pytest.approx(float(betabinom.sf(k - 1, m, a, b)), abs=1e-9)  # float sums


@pytest.mark.parametrize("n_a, n", [(0, 0), (200, 200), (191, 200), (1995, 2000), (2900, 2950)])
def test_mixture_looks_where_a_decision_first_becomes_possible(n_a, n):
    """Before the next look no outcome can certify t (every further sample agreeing); none can make t futile
    (every one disagreeing) before the look less n / STOP_LOOKS samples; at the look one of them
    can (or the look is n_max, or the n / STOP_LOOKS step)."""
    sequence, t = MixtureSequence(3000, 0.001, 95.5, 5.5), norm.cdf(2.0)
    look, late = sequence.next_look(n_a, n, t), int(np.ceil(n / STOP_LOOKS))
    assert n < look <= 3000
    for m in range(1, look - n):
        assert not sequence.certifies(n_a + m, n + m, t)
        if m < look - n - late:
            assert not sequence.futile(n_a, n + m, t)
    m = look - n
    assert look == 3000 or m == late or sequence.certifies(n_a + m, look, t) or sequence.futile(n_a, look, t)


def test_fewest_samples_of_a_fixed_n_test():
    t = norm.cdf(3.0)
    assert fewest_samples(1.0, t, 0.001) == int(np.ceil(np.log(1000) / -np.log(t)))  # every sample agreeing: 5,114
    t, p = norm.cdf(1.0), 0.9
    n = fewest_samples(p, t, 0.001)
    assert beta.ppf(0.001, n * p, n * (1 - p) + 1) >= t > beta.ppf(0.001, (n - 1) * p, (n - 1) * (1 - p) + 1)
    assert fewest_samples(0.8, 0.9, 0.001) is None


@pytest.mark.parametrize("method", ["mixture", "union"])
def test_certify_adaptive_stops_early_and_is_valid(method):
    sigma = 0.25
    smooth, w = linear_smooth(sigma)
    far = smooth.certify_adaptive(CENTER + 0.5 * w, 32, 10_000, 0.001, 512, radii=[0.0, 0.25, 0.4], method=method)
    assert far[0] == 1 and far[2] < 10_000 and 0 < far[3] <= far[2]  # decided long before n_max
    assert 0.4 <= far[1] <= 0.5  # the top bracket (pA >= Phi(1.6)) is certified, and the radius is valid
    wrong_side = smooth.certify_adaptive(CENTER - 0.5 * w, 32, 10_000, 0.001, 512, radii=[0.0, 0.25], method=method)
    assert wrong_side[0] == 0 and wrong_side[2] < 10_000
    # a bracket boundary at the true pA: sampled long, and the radius stays below the true one
    predict, radius, samples, _ = smooth.certify_adaptive(CENTER + 0.25 * w, 32, 2000, 0.001, 512,
                                                          radii=[0.0, 0.25], method=method, index=3)
    assert predict == 1 and radius < 0.25 and samples > 1000


@pytest.mark.parametrize("method", ["mixture", "union"])
def test_certify_all_gives_the_same_results_for_any_batch_and_order(method):
    smooth, w = linear_smooth(0.25)
    images = [(i, CENTER + m * w) for i, m in enumerate([0.4, -0.1, 0.05, 0.3, 0.0, -0.6])]
    kwargs = {"n0": 32, "n": 3000, "alpha": 0.001, "method": method, "radii": [0.0, 0.1, 0.2]}
    one = sorted(smooth.certify_all(images, batch_size=512, **kwargs))
    assert one == sorted(smooth.certify_all(images[::-1], batch_size=97, **kwargs))
    assert one == sorted(smooth.certify_all(images, batch_size=4096, **kwargs))
    assert [r[1:] for r in one] == [smooth.certify_adaptive(x, 32, 3000, 0.001, 64, radii=[0.0, 0.1, 0.2],
                                                            method=method, index=i) for i, x in images]
    assert len({r[3] for r in one}) > 1  # images stop at different looks


def test_certify_adaptive_arguments():
    smooth, _ = linear_smooth()
    with pytest.raises(UserError, match="radii must be"):
        smooth.certify_adaptive(CENTER, 10, 100, 0.01, 10, radii=[])
    with pytest.raises(UserError, match="method must be one of mixture, union for adaptive"):
        smooth.certify_adaptive(CENTER, 10, 100, 0.01, 10, radii=[0.0], method="cohen")
    with pytest.raises(UserError, match="method must be one of cohen, mixture, union, got 'fast'"):
        list(smooth.certify_all([(0, CENTER)], n0=10, n=100, alpha=0.01, batch_size=10, method="fast"))
