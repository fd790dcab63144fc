"""Exact integer noise samplers against their exact pmfs.

Goodness of fit is Pearson's chi-square over bins with at least 5 expected
draws (tails pooled), at a fixed seed. The threshold is the chi-square
quantile at 1 − 1e-6: a correct sampler fails it for about one seed in a
million, so at a fixed seed the test is deterministic and not brittle, while
it still catches real errors: a rounded continuous Gaussian (a common wrong
"discrete Gaussian") fails it by orders of magnitude (tested below).
"""

import math
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import fedzip.privacy.samplers as S
from fedzip.errors import ConfigError
from fedzip.privacy import (
    bernoulli_exp,
    discrete_gaussian,
    discrete_gaussian_array,
    discrete_laplace,
    discrete_laplace_array,
    skellam_array,
)
from fedzip.seeding import numpy_rng

# --- exact pmfs, written out -----------------------------------------------


def gaussian_pmf(sigma):
    s2 = float(Fraction(sigma) ** 2)
    kmax = int(40 * math.sqrt(s2)) + 10
    ks = np.arange(-kmax, kmax + 1)
    w = np.exp(-(ks.astype(float) ** 2) / (2 * s2))
    return ks, w / w.sum()


def laplace_pmf(scale):
    b = float(Fraction(scale))
    kmax = int(60 * b) + 10
    ks = np.arange(-kmax, kmax + 1)
    r = math.exp(-1 / b)
    return ks, (1 - r) / (1 + r) * r ** np.abs(ks)


def skellam_pmf(mu):
    # the difference of two independent Poisson(μ/2): P[k] = Σ_j P(j + k) P(j)
    lam = mu / 2
    jmax = int(lam + 40 * math.sqrt(lam) + 40)
    j = np.arange(jmax + 1)
    pois = np.exp(-lam + j * math.log(lam) - np.array([math.lgamma(x + 1) for x in j]))
    ks = np.arange(-jmax, jmax + 1)
    pmf = np.array([np.dot(pois[abs(k):], pois[: jmax + 1 - abs(k)]) for k in ks])
    return ks, pmf


def chi_square(samples, ks, pmf):
    """(statistic, 1 − 1e-6 threshold) with tails pooled until >= 5 expected."""
    n = len(samples)
    expected = n * pmf
    keep = np.flatnonzero(expected >= 5)
    lo, hi = ks[keep[0]], ks[keep[-1]]
    samples = np.asarray(samples)
    obs = [np.count_nonzero(samples < lo)] + [np.count_nonzero(samples == k) for k in range(lo, hi + 1)]
    obs.append(np.count_nonzero(samples > hi))
    exp = [expected[ks < lo].sum()] + list(expected[(ks >= lo) & (ks <= hi)]) + [expected[ks > hi].sum()]
    obs, exp = np.array(obs, float), np.array(exp)
    nz = exp > 0
    stat = float(((obs[nz] - exp[nz]) ** 2 / exp[nz]).sum())
    return stat, float(stats.chi2.ppf(1 - 1e-6, nz.sum() - 1))


def assert_fits(samples, ks, pmf):
    stat, limit = chi_square(samples, ks, pmf)
    assert stat < limit, f"chi-square {stat:.1f} above the 1e-6 threshold {limit:.1f}"


# --- discrete Gaussian -------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.5, Fraction(7, 3), 10.0])
def test_discrete_gaussian_array_matches_exact_pmf(sigma):
    x = discrete_gaussian_array(sigma, 300_000, np.random.default_rng(1))
    assert x.dtype == np.int64 and x.shape == (300_000,)
    assert_fits(x, *gaussian_pmf(sigma))


def test_discrete_gaussian_reference_path_matches_exact_pmf():
    rng = np.random.default_rng(2)
    x = [discrete_gaussian(Fraction(3, 2), rng) for _ in range(8_000)]
    assert all(isinstance(v, int) for v in x)
    assert_fits(x, *gaussian_pmf(Fraction(3, 2)))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_discrete_gaussian_mean_zero_and_variance_just_below_sigma2(sigma):
    ks, pmf = gaussian_pmf(sigma)
    var = float((ks.astype(float) ** 2 * pmf).sum())
    m4 = float((ks.astype(float) ** 4 * pmf).sum())
    # CKS 2020: Var[N_Z(0, σ²)] < σ², and within 1e-6 relative once σ >= 1
    assert var <= sigma**2  # the deficit is below float64 resolution from σ ≈ 2 on
    if sigma < 1:
        assert var < sigma**2 * 0.9
    else:
        assert var > sigma**2 * (1 - 1e-6)
    n = 1_000_000
    x = discrete_gaussian_array(sigma, n, np.random.default_rng(3)).astype(float)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * math.sqrt((m4 - var**2) / n)


def test_rounded_continuous_gaussian_fails_the_same_check():
    # the check has power: round(N(0, σ²)) is not the discrete Gaussian
    rng = np.random.default_rng(4)
    x = np.rint(rng.normal(0, 0.5, 300_000)).astype(np.int64)
    stat, limit = chi_square(x, *gaussian_pmf(0.5))
    assert stat > 10 * limit


def test_exact_fallback_path_gives_the_same_distribution(monkeypatch):
    # A wide margin sends a few percent of the comparisons (and some floors) to
    # the exact rational path; the distribution must not change.
    calls = {"compare": 0, "floor": 0}
    real_bernoulli, real_exp = S._bernoulli, S._bernoulli_exp

    def bernoulli(rng, p):
        calls["compare"] += 1
        return real_bernoulli(rng, p)

    def bernoulli_exp_exact(gamma, rng):
        calls["floor"] += 1
        return real_exp(gamma, rng)

    monkeypatch.setattr(S, "_MARGIN", 2.0**-5)
    monkeypatch.setattr(S, "_bernoulli", bernoulli)
    monkeypatch.setattr(S, "_bernoulli_exp", bernoulli_exp_exact)
    x = discrete_gaussian_array(Fraction(5, 3), 200_000, np.random.default_rng(5))
    assert calls["compare"] > 100 and calls["floor"] > 100
    assert_fits(x, *gaussian_pmf(Fraction(5, 3)))


# --- discrete Laplace and Bernoulli(exp(-γ)) ----------------------------------


@pytest.mark.parametrize("scale", [1, Fraction(3, 2), 0.3, 7.25])
def test_discrete_laplace_array_matches_exact_pmf(scale):
    x = discrete_laplace_array(scale, 300_000, np.random.default_rng(6))
    assert_fits(x, *laplace_pmf(scale))
    assert abs(x.mean()) < 5 * x.std() / math.sqrt(x.size)


def test_discrete_laplace_reference_path_matches_exact_pmf():
    rng = np.random.default_rng(7)
    assert_fits([discrete_laplace(Fraction(5, 2), rng) for _ in range(8_000)], *laplace_pmf(2.5))


@pytest.mark.parametrize("gamma", [Fraction(1, 3), 1, Fraction(23, 10)])
def test_bernoulli_exp_frequency(gamma):
    rng = np.random.default_rng(8)
    n = 20_000
    hits = sum(bernoulli_exp(gamma, rng) for _ in range(n))
    p = math.exp(-float(gamma))
    assert abs(hits / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert bernoulli_exp(0, rng) is True


# --- Skellam -------------------------------------------------------------------


@pytest.mark.parametrize("mu", [3.7, 50.0])
def test_skellam_pmf_mean_and_variance_mu(mu):
    n = 400_000
    x = skellam_array(mu, n, np.random.default_rng(9))
    assert x.dtype == np.int64
    assert_fits(x, *skellam_pmf(mu))
    # Skellam(μ/2, μ/2): mean 0, variance μ, fourth central moment μ + 3μ²
    assert abs(x.mean()) < 5 * math.sqrt(mu / n)
    assert abs(x.var() - mu) < 5 * math.sqrt((mu + 3 * mu**2 - mu**2) / n)


# --- reproducibility and errors ---------------------------------------------------


@pytest.mark.parametrize("draw", [
    lambda rng: discrete_gaussian_array(2.5, (3, 1000), rng),
    lambda rng: discrete_laplace_array(1.5, 1000, rng),
    lambda rng: skellam_array(10.0, 1000, rng),
])
def test_same_seed_same_draws(draw):
    a = draw(numpy_rng(0, 3, "c7", "dp-noise"))
    b = draw(numpy_rng(0, 3, "c7", "dp-noise"))
    c = draw(numpy_rng(0, 3, "c8", "dp-noise"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ta = draw(torch.Generator().manual_seed(11))
    tb = draw(torch.Generator().manual_seed(11))
    assert np.array_equal(ta, tb)


def test_reference_path_is_reproducible():
    a = [discrete_gaussian(2, np.random.default_rng(12)) for _ in range(3)]
    b = [discrete_gaussian(2, np.random.default_rng(12)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("call, match", [
    (lambda: discrete_gaussian_array(0, 10, np.random.default_rng()), "sigma"),
    (lambda: discrete_gaussian_array(-1.0, 10, np.random.default_rng()), "sigma"),
    (lambda: discrete_gaussian(float("nan"), np.random.default_rng()), "sigma"),
    (lambda: discrete_gaussian(0.0, np.random.default_rng()), "sigma"),
    (lambda: discrete_gaussian_array(2.0**41, 10, np.random.default_rng()), "sigma"),
    (lambda: skellam_array(0.0, 10, np.random.default_rng()), "mu"),
    (lambda: skellam_array(-2, 10, np.random.default_rng()), "mu"),
    (lambda: discrete_laplace_array(0, 10, np.random.default_rng()), "scale"),
    (lambda: discrete_laplace_array(1e-30, 10, np.random.default_rng()), "scale"),
    (lambda: discrete_gaussian_array(1.0, 10, 123), "rng"),
    (lambda: discrete_gaussian_array(1.0, -1, np.random.default_rng()), "size"),
])
def test_bad_parameters_are_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_two_million_draws_in_a_few_seconds():
    t = time.perf_counter()
    x = discrete_gaussian_array(10.0, 2_000_000, np.random.default_rng(13))
    elapsed = time.perf_counter() - t
    assert x.size == 2_000_000
    # about 1 s on one core; a per-draw Python loop would take minutes
    assert elapsed < 20, f"{elapsed:.1f}s"
