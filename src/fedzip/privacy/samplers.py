"""Exact integer noise: discrete Gaussian, discrete Laplace, and Skellam.

Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy"
(NeurIPS 2020), Algorithms 1–3:

1. :func:`bernoulli_exp`: Bernoulli(exp(−γ)) for rational γ >= 0, from
   Bernoulli(γ/k) draws (von Neumann's series trick), no floating point.
2. :func:`discrete_laplace`: P[x] ∝ exp(−|x|/scale) on the integers, for a
   rational scale t/s: a uniform remainder accepted with Bernoulli(exp(−U/t)),
   a geometric number of whole periods, a sign.
3. :func:`discrete_gaussian`: P[x] ∝ exp(−x²/(2σ²)), by rejection from the
   discrete Laplace of scale ⌊σ⌋ + 1 with Bernoulli(exp(−(|Y| − σ²/t)²/(2σ²))).

A float parameter is taken as the rational it is exactly (``Fraction(0.1)``
is 3602879701896397/2^55, not 1/10); pass a :class:`fractions.Fraction` to
say another one. Both paths below are exact for that rational: no draw
depends on a rounding error, so a privacy proof about the discrete Gaussian
holds for the values these functions return (a float sampler's would not:
Mironov, "On Significance of the Least Significant Bits for DP", CCS 2012).

Two paths, the same distributions, different streams for the same seed:

* the scalar functions follow Algorithms 1–3 line by line in
  :class:`fractions.Fraction` arithmetic: the readable reference;
* the ``*_array`` functions run the same rejection loops over numpy arrays.
  Where Algorithm 1 needs Bernoulli(p) for a rational p with large terms,
  they compare p to a uniform U = (W + V)/2^53 *lazily*: W is 53 random
  bits, and when a certified float interval around p already lies on one
  side of [W/2^53, (W + 1)/2^53) the answer is known without V; otherwise
  (for about 2^-35 of the comparisons; none in 2 million draws at σ = 5/3)
  that one comparison is finished in exact rational arithmetic with fresh
  bits for V. The result is the same Bernoulli(p) as an infinitely precise
  comparison, at about two million draws a second.

:func:`skellam_array` is Agarwal, Kairouz, Liu, "The Skellam Mechanism for
Differentially Private Federated Learning" (NeurIPS 2021): the difference of
two Poisson(μ/2) draws, variance μ, pmf e^{−μ} I_k(μ). It uses numpy's
Poisson sampler (floating point inside, as in the paper, whose point is that
Poisson samplers ship with every numerical library).

Randomness comes from a seeded ``numpy.random.Generator`` (for fedzip's
keyed draws: ``fedzip.seeding.numpy_rng(seed, round, client, purpose)``) or
a ``torch.Generator``, from which one 63-bit seed is drawn per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch

from fedzip.errors import ConfigError

Rational = int | float | Fraction
Generator = np.random.Generator | torch.Generator
Size = int | tuple[int, ...]

# Every certified float interval is widened by this, relative to the size of
# the numbers it came from: about 2^13 times the rounding error of the few
# float64 operations that produce it, so the interval provably holds the
# exact value, and a draw needs exact arithmetic only about 2^-36 of the time.
_MARGIN = 2.0**-36
_ULP53 = 2.0**-53
_MAX_ARRAY_SCALE = 2**40  # keeps |values| and U + t·V well inside int64


# --------------------------------------------------------------------------
# Arguments and randomness
# --------------------------------------------------------------------------


def _as_fraction(name: str, value: Rational) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise ConfigError(f"{name} must be a positive int, float or Fraction, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    frac = Fraction(value)
    if frac <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return frac


def _numpy_generator(rng: Generator) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=rng))
        return np.random.default_rng(seed)
    raise ConfigError(
        "rng must be a numpy.random.Generator or a torch.Generator "
        f"(e.g. fedzip.seeding.numpy_rng(seed, round, client, 'noise')), got {type(rng).__name__}"
    )


def _shape(size: Size) -> tuple[int, ...]:
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ConfigError(f"size must be a non-negative int or a tuple of them, got {size!r}")
    return tuple(int(d) for d in shape)


def _uniform_below(rng: np.random.Generator, n: int) -> int:
    """Uniform on {0, ..., n − 1} for any positive int (exact: numpy's bounded
    integers below 2^62, rejection on whole random words above)."""
    if n <= 2**62:
        return int(rng.integers(0, n))
    bits = (n - 1).bit_length()
    words = -(-bits // 32)
    while True:
        r = 0
        for w in rng.integers(0, 2**32, size=words, dtype=np.uint64):
            r = (r << 32) | int(w)
        r >>= words * 32 - bits
        if r < n:
            return r


def _bernoulli(rng: np.random.Generator, p: Fraction) -> bool:
    """Bernoulli(p) for rational p in [0, 1], exactly."""
    return _uniform_below(rng, p.denominator) < p.numerator


# --------------------------------------------------------------------------
# Reference path: Algorithms 1-3, one draw at a time, rational arithmetic
# --------------------------------------------------------------------------


def _bernoulli_exp(gamma: Fraction, rng: np.random.Generator) -> bool:
    if gamma <= 1:
        # Algorithm 1 for γ in [0, 1]: the first k with Bernoulli(γ/k) = 0 is
        # odd with probability 1 − γ + γ²/2! − ... = exp(−γ)
        k = 1
        while _bernoulli(rng, gamma / k):
            k += 1
        return k % 2 == 1
    # γ > 1: exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))
    whole = math.floor(gamma)
    for _ in range(whole):
        if not _bernoulli_exp(Fraction(1), rng):
            return False
    return _bernoulli_exp(gamma - whole, rng)


def bernoulli_exp(gamma: Rational, rng: Generator) -> bool:
    """One Bernoulli(exp(−γ)) draw, γ >= 0 rational (CKS 2020, Algorithm 1)."""
    if isinstance(gamma, (int, float, Fraction)) and not isinstance(gamma, bool) and gamma == 0:
        return True  # exp(0) = 1: Algorithm 1's Bernoulli(0) never fires
    return _bernoulli_exp(_as_fraction("gamma (>= 0)", gamma), _numpy_generator(rng))


def _discrete_laplace(scale: Fraction, rng: np.random.Generator) -> int:
    t, s = scale.numerator, scale.denominator  # scale = t/s
    while True:
        u = _uniform_below(rng, t)
        if not _bernoulli_exp(Fraction(u, t), rng):
            continue
        v = 0  # whole periods: Geometric(1 − e^{-1}) by Bernoulli(e^{-1}) trials
        while _bernoulli_exp(Fraction(1), rng):
            v += 1
        y = (u + t * v) // s
        negative = _bernoulli(rng, Fraction(1, 2))
        if negative and y == 0:
            continue  # 0 would otherwise come up twice as often as it should
        return -y if negative else y


def discrete_laplace(scale: Rational, rng: Generator) -> int:
    """One draw of the discrete Laplace, P[x] ∝ exp(−|x|/scale) on the integers
    (CKS 2020, Algorithm 2). ``scale`` > 0 rational."""
    return _discrete_laplace(_as_fraction("scale", scale), _numpy_generator(rng))


def _gaussian_gamma(y: int, sigma2: Fraction, t: int) -> Fraction:
    return (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)


def _discrete_gaussian(sigma: Fraction, rng: np.random.Generator) -> int:
    sigma2 = sigma * sigma
    t = math.floor(sigma) + 1
    while True:
        y = _discrete_laplace(Fraction(t), rng)
        if _bernoulli_exp(_gaussian_gamma(y, sigma2, t), rng):
            return y


def discrete_gaussian(sigma: Rational, rng: Generator) -> int:
    """One draw of the discrete Gaussian N_Z(0, σ²), P[x] ∝ exp(−x²/(2σ²)) on the
    integers (CKS 2020, Algorithm 3). ``sigma`` > 0 rational (σ² is then
    rational, as the algorithm needs). Its variance is slightly below σ²
    (CKS 2020, Proposition 19), by a relative 1e-7 already at σ = 1."""
    return _discrete_gaussian(_as_fraction("sigma", sigma), _numpy_generator(rng))


# --------------------------------------------------------------------------
# Vectorised path: the same loops over numpy arrays
# --------------------------------------------------------------------------


def _bernoulli_exp_minus_one(rng: np.random.Generator, n: int) -> np.ndarray:
    """n independent Bernoulli(exp(−1)): Algorithm 1 with γ = 1, where every
    Bernoulli(1/k) is an exact bounded integer draw."""
    k = np.ones(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        go_on = rng.integers(0, k[active]) == 0  # Bernoulli(1/k)
        k[active[go_on]] += 1
        active = active[go_on]
    return k % 2 == 1


def _lazy_bernoulli(
    rng: np.random.Generator, p_lo: np.ndarray, p_hi: np.ndarray, exact_p: Callable[[int], Fraction]
) -> np.ndarray:
    """Bernoulli(p) per element, p ∈ [p_lo, p_hi] certified, p exact on demand.

    U = (W + V)/2^53 with W uniform on 53-bit integers and V uniform on [0, 1)
    drawn only when needed: U < p is decided by W alone unless p falls inside
    [W/2^53, (W + 1)/2^53]; then ``exact_p`` gives p and U < p ⟺ V < p·2^53 − W.
    """
    w = rng.integers(0, 2**53, size=p_lo.size, dtype=np.int64)
    u = w * _ULP53  # exact: a multiple of 2^-53 below 1
    below = u + _ULP53 <= p_lo  # U < (W + 1)/2^53 <= p
    above = u >= p_hi  # U >= W/2^53 >= p
    out = below
    for j in np.flatnonzero(~(below | above)):
        q = exact_p(int(j)) * 2**53 - int(w[j])
        out[j] = q >= 1 or (q > 0 and _bernoulli(rng, q))
    return out


def _bernoulli_exp_array(
    rng: np.random.Generator, gamma: np.ndarray, err: np.ndarray, exact_gamma: Callable[[int], Fraction]
) -> np.ndarray:
    """Bernoulli(exp(−γ_i)) per element: Algorithm 1 over arrays.

    ``gamma`` approximates the exact γ_i (``exact_gamma(i)``) within ``err``,
    which must be at least 2^13 times the true float error; ``err = inf``
    sends an element to the exact path.
    """
    n = gamma.size
    with np.errstate(invalid="ignore", over="ignore"):
        lo = np.maximum(gamma - err, 0.0)
        hi = gamma + err
        k_lo = np.floor(lo)
        k_hi = np.floor(hi)
    result = np.zeros(n, dtype=bool)
    alive = np.ones(n, dtype=bool)
    # ⌊γ⌋ >= k_lo, so the first k_lo Bernoulli(e^{-1}) trials happen whatever γ is
    active = np.flatnonzero(k_lo >= 1)
    done = 0
    while active.size:
        ok = _bernoulli_exp_minus_one(rng, active.size)
        alive[active[~ok]] = False
        done += 1
        active = active[ok & (k_lo[active] > done)]
    # the floor is not certain (γ near an integer, huge, or flagged): finish exactly
    for j in np.flatnonzero(alive & ~(k_lo == k_hi)):
        g = exact_gamma(int(j))
        whole = math.floor(g)
        ok = all(_bernoulli_exp(Fraction(1), rng) for _ in range(whole - int(k_lo[j])))
        result[j] = ok and _bernoulli_exp(g - whole, rng)
        alive[j] = False
    # the fractional part f = γ − ⌊γ⌋ in [0, 1): count k while Bernoulli(f/k) = 1
    idx = np.flatnonzero(alive)
    f = gamma[idx] - k_lo[idx]
    f_err = err[idx]
    k = np.ones(idx.size, dtype=np.int64)
    active = np.arange(idx.size)
    while active.size:
        kk = k[active]
        p = f[active] / kk
        slack = f_err[active] / kk + 4 * _ULP53  # the two roundings above, generously

        def exact_p(jj: int, active=active) -> Fraction:
            i = int(active[jj])
            return (exact_gamma(int(idx[i])) - int(k_lo[idx[i]])) / int(k[i])

        go_on = _lazy_bernoulli(rng, p - slack, p + slack, exact_p)
        k[active[go_on]] += 1
        active = active[go_on]
    result[idx] = k % 2 == 1
    return result


def _laplace_array(t: int, s: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of the discrete Laplace of scale t/s (Algorithm 2 over arrays)."""
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        m = pending.size
        u = rng.integers(0, t, size=m, dtype=np.int64)
        # γ = U/t < 1: float64 gets it within 3·2^-53 (t may exceed 2^53), far inside _MARGIN
        gamma = u / t
        accept = _bernoulli_exp_array(rng, gamma, np.full(m, _MARGIN), lambda j, u=u: Fraction(int(u[j]), t))
        u = u[accept]
        v = np.zeros(u.size, dtype=np.int64)
        active = np.arange(u.size)
        while active.size:
            go_on = _bernoulli_exp_minus_one(rng, active.size)
            v[active[go_on]] += 1
            active = active[go_on]
        if u.size and int(v.max()) + 1 > (2**62) // t:  # never in practice; stay exact anyway
            x = u.astype(object) + t * v.astype(object)
        else:
            x = u + t * v
        y = (x // s).astype(np.int64)
        negative = rng.integers(0, 2, size=y.size) == 1
        ok = ~(negative & (y == 0))
        z = np.where(negative, -y, y)[ok]
        slots = pending[accept]
        out[slots[ok]] = z
        taken = np.zeros(m, dtype=bool)
        taken[np.flatnonzero(accept)[ok]] = True
        pending = pending[~taken]
    return out


def _check_array_scale(name: str, frac: Fraction, value: Rational) -> None:
    if frac > _MAX_ARRAY_SCALE:
        raise ConfigError(f"{name} must be <= 2**40 for the array samplers, got {value!r}")
    if frac.numerator > 2**62 or frac.denominator > 2**62:
        raise ConfigError(
            f"{name}={value!r} as an exact rational has terms above 2**62; "
            f"pass a fractions.Fraction with smaller terms (e.g. Fraction({value!r}).limit_denominator(10**9))"
        )


def discrete_laplace_array(scale: Rational, size: Size, rng: Generator) -> np.ndarray:
    """``size`` independent discrete Laplace draws (int64), exact, vectorised.

    P[x] ∝ exp(−|x|/scale); ``scale`` rational in (0, 2^40] with numerator and
    denominator at most 2^62 (CKS 2020, Algorithm 2 over arrays).
    """
    frac = _as_fraction("scale", scale)
    _check_array_scale("scale", frac, scale)
    shape = _shape(size)
    n = math.prod(shape)
    return _laplace_array(frac.numerator, frac.denominator, n, _numpy_generator(rng)).reshape(shape)


def discrete_gaussian_array(sigma: Rational, size: Size, rng: Generator) -> np.ndarray:
    """``size`` independent draws of N_Z(0, σ²) (int64), exact, vectorised.

    CKS 2020, Algorithm 3 over arrays: discrete Laplace proposals of scale
    t = ⌊σ⌋ + 1, each accepted with Bernoulli(exp(−(|Y| − σ²/t)²/(2σ²))).
    ``sigma`` rational in [2^-100, 2^40]. About 2 million draws a second on
    one core for σ >= 3, 1 million for σ <= 1 (more rejections).
    """
    frac = _as_fraction("sigma", sigma)
    _check_array_scale("sigma", frac, sigma)
    if frac < Fraction(1, 2**100):
        raise ConfigError(f"sigma must be >= 2**-100 for the array sampler, got {sigma!r}")
    shape = _shape(size)
    n = math.prod(shape)
    g = _numpy_generator(rng)
    sigma2 = frac * frac
    t = math.floor(frac) + 1
    s2 = float(sigma2)
    a = s2 / t
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        y = _laplace_array(t, 1, pending.size, g)
        ay = np.abs(y).astype(np.float64)
        gamma = (ay - a) ** 2 / (2 * s2)
        # |float error| <= ~10·2^-53·(|Y| + σ²/t)²/(2σ²); |Y| >= 2^53 is not exact in float64
        err = _MARGIN * ((ay + a) ** 2 / (2 * s2) + 1.0)
        err[np.abs(y) >= 2**53] = np.inf
        accept = _bernoulli_exp_array(
            g, gamma, err, lambda j, y=y: _gaussian_gamma(int(y[j]), sigma2, t)
        )
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out.reshape(shape)


def skellam_array(mu: float, size: Size, rng: Generator) -> np.ndarray:
    """``size`` draws (int64) of the symmetric Skellam distribution of variance μ.

    Agarwal, Kairouz, Liu (NeurIPS 2021): Poisson(μ/2) − Poisson(μ/2), pmf
    e^{−μ} I_k(μ) (I_k the modified Bessel function), mean 0, variance μ.
    Sums of independent Skellams are Skellam (variances add), which is why
    distributed DP uses it: n clients adding Sk(μ/n) give the server Sk(μ).
    """
    if isinstance(mu, bool) or not isinstance(mu, (int, float, Fraction)) or not math.isfinite(mu) or mu <= 0:
        raise ConfigError(f"mu (the Skellam variance) must be a positive finite number, got {mu!r}")
    shape = _shape(size)
    g = _numpy_generator(rng)
    lam = float(mu) / 2.0
    return g.poisson(lam, size=shape).astype(np.int64) - g.poisson(lam, size=shape).astype(np.int64)
