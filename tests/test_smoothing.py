"""Randomized smoothing: statistical checks against a linear base classifier whose smoothed pA is exact."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
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
from dmae.smoothing.bounds import best_later, decided, look_alphas, looks, thresholds, upper_confidence_bound
from dmae.util.errors import UserError

SHAPE = (2, 2, 2)
CENTER = torch.full(SHAPE, 0.5)
PINNED_SEED = 16425303213512341852  # block_seed(0, 0.25, 3, SELECTION, 0)


class LinearBinary(nn.Module):
    """f(x) = [w.x + b > 0] as the logits (0, w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w.reshape(1, -1))
            self.linear.bias.fill_(b)

    def forward(self, x):
        z = self.linear(x.flatten(1))
        return torch.cat((torch.zeros_like(z), z), dim=1)


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


# -- adaptive CERTIFY ----------------------------------------------------------------------------------------------
def test_looks_and_their_levels():
    assert looks(1000) == [32, 64, 128, 256, 512, 1000] and looks(20) == [20] and looks(64) == [32, 64]
    levels = look_alphas(6, 0.001)
    assert sum(levels) == pytest.approx(0.001) and levels[-1] == pytest.approx(0.0005)
    assert look_alphas(1, 0.01) == [0.01] and look_alphas(3, 0.01, naive=True) == [0.01] * 3


def test_bounds_match_the_exact_binomial_interval():
    for n_a, n in [(0, 10), (3, 10), (10, 10), (480, 500)]:
        interval = binomtest(n_a, n).proportion_ci(0.98, method="exact")
        assert lower_confidence_bound(n_a, n, 0.01) == pytest.approx(interval.low, abs=1e-9)
        assert upper_confidence_bound(n_a, n, 0.01) == pytest.approx(interval.high, abs=1e-9)


def test_decided_once_more_samples_cannot_raise_the_bracket():
    cuts = thresholds([0.0, 0.25, 0.5], 0.5)  # pA 0.5, Phi(0.5), Phi(1)
    assert list(cuts) == pytest.approx([0.5, norm.cdf(0.5), norm.cdf(1.0)])
    assert decided(0.70, 0.80, 1.0, cuts)  # between Phi(0.5) = 0.69 and Phi(1) = 0.84
    assert not decided(0.60, 0.80, 1.0, cuts)  # straddles Phi(0.5)
    assert decided(0.10, 0.45, 1.0, cuts)  # cannot certify radius 0: abstain
    assert decided(0.90, 1.00, 1.0, cuts)  # above every threshold
    assert decided(0.70, 1.00, 0.80, cuts)  # no later look can reach Phi(1), whatever it draws
    # 10 of 10 now; 100 samples at the last look: at best 0.001 ** (1/100) = 0.933
    assert best_later(10, 10, [100], [0.001]) == pytest.approx(0.001 ** (1 / 100))
    assert best_later(5, 10, [20, 40], [0.001, 0.001]) == pytest.approx(lower_confidence_bound(35, 40, 0.001))
    assert best_later(10, 10, [], []) == 0.0


def test_certify_adaptive_stops_early_and_is_valid_against_cohen():
    sigma = 0.25
    smooth, w = linear_smooth(sigma)
    far = smooth.certify_adaptive(CENTER + 0.5 * w, 32, 10_000, 0.001, 512, radii=[0.0, 0.25, 0.4])
    assert far[0] == 1 and far[2] < 10_000  # decided long before n_max
    assert far[1] >= 0.4  # the top bracket (pA >= Phi(1.6)) is certified
    wrong_side = smooth.certify_adaptive(CENTER - 0.5 * w, 32, 10_000, 0.001, 512, radii=[0.0, 0.25])
    assert wrong_side[0] == 0 and wrong_side[2] < 10_000
    # never decided early (a bracket boundary at the true pA): all n_max samples, the counts of CERTIFY's N,
    # at the final look's level (half of alpha), so never a larger radius than CERTIFY with N = n_max
    x = CENTER + 0.25 * w
    predict, radius, samples = smooth.certify_adaptive(x, 32, 2000, 0.001, 512, radii=[0.0, 0.25], index=3)
    cohen = smooth.certify(x, 32, 2000, 0.001, 512, index=3)
    assert samples == 2000 and predict == cohen[0] == 1 and radius <= cohen[1]


def test_certify_all_gives_the_same_results_for_any_batch_and_order():
    smooth, w = linear_smooth(0.25)
    images = [(i, CENTER + m * w) for i, m in enumerate([0.4, -0.1, 0.05, 0.3, 0.0, -0.6])]
    kwargs = {"n0": 32, "n": 3000, "alpha": 0.001, "method": "adaptive", "radii": [0.0, 0.1, 0.2]}
    one = sorted(smooth.certify_all(images, batch_size=512, **kwargs))
    assert one == sorted(smooth.certify_all(images[::-1], batch_size=97, **kwargs))
    assert one == sorted(smooth.certify_all(images, batch_size=4096, **kwargs))
    assert [r[1:] for r in one] == [smooth.certify_adaptive(x, 32, 3000, 0.001, 64, radii=[0.0, 0.1, 0.2],
                                                            index=i) for i, x in images]
    assert len({r[3] for r in one}) > 1  # images stop at different looks


def test_certify_adaptive_arguments():
    smooth, _ = linear_smooth()
    with pytest.raises(UserError, match="radii must be"):
        smooth.certify_adaptive(CENTER, 10, 100, 0.01, 10, radii=[])
    with pytest.raises(UserError, match="method must be one of"):
        list(smooth.certify_all([(0, CENTER)], n0=10, n=100, alpha=0.01, batch_size=10, method="fast"))
