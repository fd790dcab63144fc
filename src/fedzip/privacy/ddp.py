"""Distributed DP through secure aggregation: the distributed discrete Gaussian
and the distributed Skellam mechanisms, as codecs whose sum the server decodes.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021 (KLS21, arXiv
2102.06387), and Agarwal, Kairouz, Liu, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS 2021 (AKL21, arXiv
2110.04995). Theorem numbers below are the arXiv versions', as the authors'
own accounting code (google-research/federated, ``distributed_dp``) cites them.

**A client** (KLS21 Algorithm 1; AKL21 Algorithm 1), per tensor of ``d`` values:

1. clip: the update is L2-clipped to ``C`` over the whole model (the
   :func:`~fedzip.aggregators.clipping` stage :func:`distributed_dp` puts in
   front); the codec clips each tensor to ``C`` again, which changes nothing
   after that stage and keeps the bound if the codec is used alone;
2. flatten: ``y = R x`` with a randomized Hadamard rotation whose signs every
   client and the server derive from the codec's public ``seed``
   (:func:`rotate`; :mod:`fedzip.codecs.rotation`'s ``fwht`` and ``signs``);
3. scale by ``γ`` (``gamma``; the quantization step is ``1/γ``: KLS21 write
   the step as their γ, AKL21 write our γ as their scale ``s``);
4. round *conditionally*: randomized rounding (each value to the integer
   below or above, unbiased), repeated until ``||z̃||₂ <= Δ₂`` with
   ``Δ₂ = min(cγ + √d, sqrt(c²γ² + d/4 + √(2 ln(1/β))·(cγ + √d/2)))``, ``c``
   the tensor's norm (<= C): KLS21 Algorithm 1's conditional rounding, the
   bound of their Theorem 1; one draw passes with probability >= 1 − β;
5. noise: its share of integer noise per coordinate, for a sum over the
   ``clients`` of a round: discrete Gaussian ``N_Z(0, σ_c²)`` with
   ``σ_c = σγ/√n`` (KLS21: each client adds ``N_Z(0, σ_c²)``, the sum has
   variance ``nσ_c² = (σγ)²``; :func:`~fedzip.privacy.samplers.discrete_gaussian_array`,
   exact), or Skellam ``Sk(μ/n)`` with ``μ = (σγ)²`` (AKL21: the sum of
   ``n`` is ``Sk(μ)`` exactly; :func:`~fedzip.privacy.samplers.skellam_array`);
   ``σ = z·C`` is the noise on the sum in the update's units, ``z`` the
   noise multiplier, as in central DP-FedAvg;
6. reduce mod ``2^m`` (modular clipping; ``m = bits``, 12–18 in the papers)
   and send the ``m``-bit codes, packed: exactly ``m·d`` bits, nothing else.

**The server** sees only the sum mod ``2^m`` (secure aggregation sums mod the
codec's own ``2^m``: ``modular = True`` tells :func:`fedzip.privacy.masking.modulus_bits`),
maps it to ``[−2^(m−1), 2^(m−1))``, divides by ``γ`` and rotates back.
Modular clipping *wraps*: a coordinate of the true integer sum outside that
range comes back off by a multiple of ``2^m/γ``, silently, as in the papers;
γ is chosen so that ``k`` standard deviations of the sum fit
(:func:`scale_for_bits`). The server cannot count wraps; it estimates the
spread of the sum from the modular values (the wrapped-Gaussian estimate
``E cos(2πv/2^m) = exp(−2π²s²/4^m)``, as TFF's modular clipping does) and
reports the expected number of wrapped coordinates under it
(:meth:`DistributedDP.drain_measurements`, ``ddp/expected_wrapped``); a
simulation that has the clients' integers counts them exactly
(:meth:`DistributedDP.integers`, :func:`count_wrapped`).

**Rotation without padding.** The papers pad ``d`` to a power of two (up to
twice the bits). Here a tensor of ``d`` values is rotated by two randomized
Hadamard transforms of size ``P`` (the largest power of two <= d): one on
the first ``P`` coordinates, then one on the last ``P`` (they overlap, and
cover everything since ``P > d/2``). Both are orthogonal, so the product is;
every output coordinate is sub-Gaussian with variance proxy at most
``||x||²/P <= 2||x||²/d`` (the papers' padded one: ``||x||²/d``). Nothing is
padded: the codes are exactly the tensor's ``d`` coordinates, so secure
aggregation masks them as any summable codec's, and the accounting's ``d`` is
the model's size.

**Privacy accounting.** Per round (neighbouring sums differ by one client's
rounded vector: ``Δ₂`` under add/remove, ``2Δ₂`` under replace-one), the
Rényi DP curve of the summed noise (:func:`round_rdp`):

* distributed discrete Gaussian, KLS21 Proposition 14 (the Rényi form of their
  Theorem 1): for ``n`` clients each adding ``N_Z(0, σ_c²)``, ``σ_c >= 1/2``,
  ``τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ_c²·k/(k+1))``, sensitivities ``Δ₂, Δ₁``
  in integer units and ``a = Δ₂/(√n σ_c)``, ``b = Δ₁/(√n σ_c)``:
  ``ε(α) = min(α a²/2 + τd, (α/2)(a² + 2bτ + τ²d), (α/2)(a + τ√d)²)``;
  with ``n = 1`` this is the discrete Gaussian's ``α a²/2`` (Canonne, Kamath,
  Steinke, NeurIPS 2020);
* Skellam, AKL21 Theorem 3.5 (multi-dimensional Skellam RDP), for ``Sk(μ)``:
  ``ε(α) = αΔ₂²/(2μ) + min(((2α − 1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ))``;

with ``Δ₂`` KLS21 Theorem 1's bound on the conditionally rounded vector and
``Δ₁ <= min(Δ₂², √d Δ₂)`` (integer vectors). Sampling amplifies each round,
as the papers' accounting does, by a bound that holds for any RDP curve at
integer orders: Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy",
ICML 2019, Theorem 5 (general upper bound) for ``sampling="poisson"``
(add/remove one client); Wang, Balle, Kasiviswanathan, "Subsampled Rényi
Differential Privacy and Analytical Moments Accountant", AISTATS 2019,
Theorem 9 (sampling without replacement, replace-one, with ``ε(∞) = ∞``) for
``sampling="fixed"`` (fedzip's fixed cohort); each the smaller of that and
the unsampled curve. Rounds add up (RDP composition), and ``dp_accounting``'s
conversion turns the curve into (ε, δ) (``compute_epsilon``: Canonne, Kamath,
Steinke 2020, Proposition 12; Asoodeh et al. 2021). ``dp_accounting`` has no
event for an arbitrary curve under sampling, so the amplification bound is
written here; the continuous Gaussian through the same bound is
``mechanism="gaussian"``, for comparison. Central DP's
:func:`fedzip.privacy.accounting.epsilon` uses Gaussian-specific bounds
(Mironov et al. 2019 for Poisson; WBK19 Theorem 27 for fixed cohorts), which
are slightly tighter than these general ones. Orders are the integers 2..128
and 256 (the sampling bounds need integers): where the best order is below 2
(ε in the hundreds) dp_accounting's fractional orders give the Gaussian less.

Several tensors: each is rotated and rounded on its own, with ``c_t`` its own
norm (``Σ c_t² <= C²``), so the model's ``||z̃||² <= Σ_t Δ₂(c_t)²`` and
``Δ₂² <= min((γC + √d)², γ²C² + d/4 + √(2 ln(1/β))·(γC√T + Σ_t √d_t / 2))``
for ``T`` tensors of sizes ``d_t`` (Cauchy–Schwarz on ``Σ c_t``, Minkowski on
the first); one tensor gives KLS21's bound exactly (:func:`rounded_norm_bound`).

**Deviations from the papers**, said plainly: the rotation's seed is the
codec's (fixed across rounds, public) rather than drawn afresh each round: a
:class:`~fedzip.codecs.summable.SummableCodec` does not know the round. The
guarantee does not depend on the rotation (the norm bound is enforced after
it); only how evenly the values spread, and so how often they wrap, does.
Noise is calibrated for ``clients`` per round; a round where fewer report
has less noise than accounted (the stage reports ``ddp/noise_stddev`` as
summed). The mean divides by the number of clients summed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedzip.aggregators import Aggregate, Aggregator, Stage, clipping
from fedzip.bitpack import pack_bits, packed_size, unpack_bits
from fedzip.codecs.base import flat_input, numel_of, numpy_generator
from fedzip.codecs.policy import as_policy
from fedzip.codecs.rotation import fwht, signs
from fedzip.codecs.summable import SummableCodec
from fedzip.errors import ConfigError, PayloadError
from fedzip.privacy.samplers import discrete_gaussian_array, skellam_array
from fedzip.seeding import derive_seed

Mechanism = Literal["ddg", "skellam"]
Sampling = Literal["fixed", "poisson"]

#: KLS21's β in their experiments (and TFF's default): one rounding passes with probability >= 1 − e^-0.5
DEFAULT_BETA = math.exp(-0.5)
#: integer Rényi orders (the sampling bounds expand binomially in the order)
RDP_ORDERS: tuple[int, ...] = (*range(2, 129), 256)
#: conditional rounding gives up after this many draws (each passes with probability >= 1 − β)
MAX_ROUNDING_TRIES = 1000
#: the papers' k (standard deviations of the sum that fit in 2^m): 4 in KLS21's code, 3 in AKL21's
DEFAULT_K_STDDEVS = {"ddg": 4.0, "skellam": 3.0}

# the rounding check compares a float64 sum of squares; shrink the bound by more than its rounding error
_SAFETY = 1.0 - 1e-12
# the discrete Gaussian's σ is passed as a rational k/2^30 at or above the σ asked for
_SIGMA_DENOMINATOR = 2**30


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ConfigError(f"beta (conditional rounding) must be in [0, 1), got {beta!r}")
    return float(beta)


def _mechanism(mechanism: object, allow_gaussian: bool = False) -> str:
    allowed = ("ddg", "skellam", "gaussian") if allow_gaussian else ("ddg", "skellam")
    if mechanism not in allowed:
        raise ConfigError(f"mechanism must be one of {', '.join(map(repr, allowed))}, got {mechanism!r}")
    return str(mechanism)


def _dims(dims: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(dims, (int, np.integer)) and not isinstance(dims, bool):
        return (_count("dims", dims),)
    try:
        out = tuple(_count("dims", d) for d in dims)  # type: ignore[union-attr]
    except TypeError:
        raise ConfigError(f"dims must be a positive integer or a sequence of them, got {dims!r}") from None
    if not out:
        raise ConfigError("dims must name at least one tensor size")
    return out


def _sampling(sampling: object) -> str:
    if sampling not in ("fixed", "poisson"):
        raise ConfigError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")
    return str(sampling)


# --------------------------------------------------------------------------
# Flattening: two overlapping randomized Hadamard rotations, no padding
# --------------------------------------------------------------------------


def _window(d: int) -> int:
    return 1 << (d.bit_length() - 1)  # the largest power of two <= d


def _window_signs(seed: int, d: int, which: int) -> torch.Tensor:
    p = _window(d)
    return signs(derive_seed(seed, "ddp/rotation", d, which), p, 1.0 / math.sqrt(p))


def rotate(v: torch.Tensor, seed: int) -> torch.Tensor:
    """``R v`` for a flat float tensor of ``d`` values (float32, ``d`` values):
    ``H D₁/√P`` on the first ``P`` coordinates, then ``H D₂/√P`` on the last
    ``P`` (``P`` the largest power of two <= d; one rotation when ``d = P``).
    Orthogonal; the signs are derived from ``seed`` and ``d``."""
    y = v.detach().to("cpu", torch.float32).reshape(-1).clone()
    d = y.numel()
    if d == 0:
        return y
    p = _window(d)
    y[:p] = fwht((y[:p] * _window_signs(seed, d, 1)).view(1, p)).view(-1)
    if p < d:
        y[d - p:] = fwht((y[d - p:] * _window_signs(seed, d, 2)).view(1, p)).view(-1)
    return y


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``Rᵀ y``: :func:`rotate` undone (float32, flat)."""
    x = y.detach().to("cpu", torch.float32).reshape(-1).clone()
    d = x.numel()
    if d == 0:
        return x
    p = _window(d)
    if p < d:
        x[d - p:] = fwht(x[d - p:].contiguous().view(1, p)).view(-1) * _window_signs(seed, d, 2)
    x[:p] = fwht(x[:p].contiguous().view(1, p)).view(-1) * _window_signs(seed, d, 1)
    return x


# --------------------------------------------------------------------------
# Conditional rounding (KLS21 Algorithm 1, the bound of Theorem 1)
# --------------------------------------------------------------------------


def rounding_bound(norm_scaled: float, d: int, beta: float) -> float:
    """KLS21 Theorem 1's ``Δ₂`` for one vector of ``d`` values and scaled norm
    ``c·γ``: ``min(cγ + √d, sqrt(c²γ² + d/4 + √(2 ln(1/β))·(cγ + √d/2)))``;
    ``β = 0``: the first term only (always met: no retries)."""
    c = float(norm_scaled)
    b1 = c + math.sqrt(d)
    if beta == 0:
        return b1
    b2 = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    return min(b1, b2)


def rounded_norm_bound(clip_scaled: float, dims: int | Sequence[int], beta: float = DEFAULT_BETA) -> float:
    """``Δ₂``: the L2 norm bound of one client's rounded integer vector over the
    model, tensors of sizes ``dims`` rounded each on its own, ``clip_scaled =
    γC`` (see the module doc; one tensor: KLS21 Theorem 1's bound exactly)."""
    ds = _dims(dims)
    beta = _beta(beta)
    c = _non_negative("clip_scaled", clip_scaled)
    d = sum(ds)
    b1 = (c + math.sqrt(d)) ** 2
    if beta == 0:
        return math.sqrt(b1)
    a = math.sqrt(2 * math.log(1 / beta))
    b2 = c * c + d / 4 + a * (c * math.sqrt(len(ds)) + sum(math.sqrt(t) for t in ds) / 2)
    return math.sqrt(min(b1, b2))


def l1_bound(l2: float, d: int) -> float:
    """An integer vector of ``d`` values and L2 norm <= l2 has L1 norm <= min(l2², √d·l2)."""
    return l2 * min(l2, math.sqrt(d))


# --------------------------------------------------------------------------
# The codecs
# --------------------------------------------------------------------------


class DistributedDP(SummableCodec):
    """Clip, rotate, scale by ``γ``, round conditionally, add this client's
    share of integer noise, reduce mod ``2^bits`` (see the module doc).

    Args:
        bits: ``m``, bits per coordinate of every message and of the sum (2..32).
        gamma: ``γ``, the scale (the quantization step is ``1/γ``).
        clip: ``C``, the L2 bound of a client's update (the codec clips each
            tensor to it; :func:`distributed_dp` clips the whole update).
        noise_multiplier: ``z``: the noise on the sum of ``clients`` messages
            has standard deviation ``z·C`` per coordinate, in the update's
            units (0: no noise).
        clients: ``n``, how many clients' shares make up the noise.
        beta: conditional rounding's β (0: plain randomized rounding).
        seed: the public seed of the rotation.

    Bytes: the ``d`` codes of ``bits`` bits, packed (``ceil(d·bits/8)``).
    """

    mechanism: ClassVar[str] = ""
    #: the codes are in Z_{2^bits} and their sum is meant mod 2^bits (secure aggregation's modulus)
    modular: ClassVar[bool] = True
    unbiased = False  # conditional rounding and wrapping bias it, slightly

    def __init__(self, bits: int = 16, gamma: float = 1.0, clip: float = 1.0, noise_multiplier: float = 0.0,
                 clients: int = 1, beta: float = DEFAULT_BETA, seed: int = 0) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
            raise ConfigError(f"{type(self).__name__}.bits must be an integer in 2..32, got {bits!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{type(self).__name__}.seed must be a non-negative integer, got {seed!r}")
        self.bits = bits
        self.gamma = _positive("gamma", gamma)
        self.clip = _positive("clip", clip)
        self.noise_multiplier = _non_negative("noise_multiplier", noise_multiplier)
        self.clients = _count("clients", clients)
        self.beta = _beta(beta)
        self.seed = seed
        self._pending: list[tuple[int, float, float]] = []  # (coordinates, spread, expected wraps) per decode

    # -- the noise ----------------------------------------------------------

    @property
    def noise_stddev(self) -> float:
        """σ = z·C: the noise on the sum of ``clients`` messages, per coordinate, in the update's units."""
        return self.noise_multiplier * self.clip

    @property
    def sum_stddev_scaled(self) -> float:
        """σγ: the same in integer units."""
        return self.noise_stddev * self.gamma

    def _noise(self, d: int, g: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    # -- a client -----------------------------------------------------------

    def integers(self, x: torch.Tensor, rng: torch.Generator) -> np.ndarray:
        """This client's integer vector (int64, ``d`` values) before the modular
        reduction: the conditionally rounded scaled rotation plus the noise
        share. :meth:`encode` sends it mod ``2^bits``."""
        v = flat_input(x).double()
        d = v.numel()
        g = numpy_generator(rng)
        norm = float(torch.linalg.vector_norm(v))
        if norm > self.clip:
            v = v * (self.clip / norm)
        y = rotate(v, self.seed).double().numpy()
        c = min(float(np.linalg.norm(y)), self.clip)  # the bound is about what is rounded, and <= C
        z = y * self.gamma
        bound2 = rounding_bound(c * self.gamma, d, self.beta) ** 2 * _SAFETY
        low = np.floor(z)
        frac = z - low
        for _ in range(MAX_ROUNDING_TRIES):
            r = low + (g.random(d) < frac)
            if float(np.dot(r, r)) <= bound2:
                break
        else:
            raise ConfigError(f"conditional rounding failed {MAX_ROUNDING_TRIES} times (beta={self.beta}): "
                              "use a smaller beta")
        out = r.astype(np.int64)
        if self.noise_multiplier > 0 and d:
            out += self._noise(d, g)
        return out

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return pack_bits(np.mod(self.integers(x, rng), 1 << self.bits), self.bits)

    # -- the server ---------------------------------------------------------

    def parse_summand(self, data, shape):
        n = numel_of(shape)
        if len(data) != packed_size(n, self.bits):
            raise PayloadError(f"{self.tag}: {len(data)} bytes for {n} codes of {self.bits} bits, "
                               f"expected {packed_size(n, self.bits)}")
        return torch.from_numpy(unpack_bits(data, self.bits, n).astype(np.int64))

    def add_summands(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) & ((1 << self.bits) - 1)

    def decode_sum(self, total, count, shape):
        n = numel_of(shape)
        if not isinstance(total, torch.Tensor) or total.dtype != torch.int64 or total.numel() != n:
            raise PayloadError(f"{self.tag}: the sum must be {n} int64 codes")
        modulus = 1 << self.bits
        v = total.reshape(-1).numpy() & (modulus - 1)
        self._pending.append((n, *_wrap_estimate(v, self.bits)))
        centered = np.where(v >= modulus // 2, v - modulus, v).astype(np.float64) / self.gamma
        return unrotate(torch.from_numpy(centered), self.seed).reshape(shape)

    def decode(self, data, shape):
        return self.decode_sum(self.parse_summand(data, shape), 1, shape)

    def max_encoded_size(self, shape):
        return packed_size(numel_of(shape), self.bits)

    def drain_measurements(self) -> dict[str, float]:
        """What the server's decodes since the last call saw, then forgotten:
        ``sum_stddev_steps``, the spread of the sum's coordinates in integer
        units (root mean square over tensors of the wrapped-Gaussian estimate);
        ``headroom``: ``2^(m−1)`` over it (the papers' ``k``); ``expected_wrapped``:
        the coordinates expected outside the range under that estimate."""
        pending, self._pending = self._pending, []
        if not pending:
            return {}
        coords = sum(n for n, _, _ in pending)
        spread = math.sqrt(sum(n * s * s for n, s, _ in pending) / max(coords, 1))
        half = float(1 << (self.bits - 1))
        return {"sum_stddev_steps": spread, "headroom": half / spread if spread > 0 else math.inf,
                "expected_wrapped": sum(w for _, _, w in pending), "coordinates": float(coords)}


class DistributedDiscreteGaussian(DistributedDP):
    """KLS21's distributed discrete Gaussian: each client adds ``N_Z(0, (zCγ)²/n)``
    (exact sampler, :func:`~fedzip.privacy.samplers.discrete_gaussian_array`)."""

    tag = "ddg"
    mechanism = "ddg"

    @property
    def local_sigma(self) -> Fraction:
        """σ_c in integer units, as the sampler gets it: a rational ``k/2^30`` >= σγ/√n."""
        s = self.sum_stddev_scaled / math.sqrt(self.clients)
        return Fraction(math.ceil(s * _SIGMA_DENOMINATOR), _SIGMA_DENOMINATOR)

    def _noise(self, d: int, g: np.random.Generator) -> np.ndarray:
        return discrete_gaussian_array(self.local_sigma, d, g)


class DistributedSkellam(DistributedDP):
    """AKL21's distributed Skellam: each client adds ``Sk((zCγ)²/n)`` (variance
    ``μ/n``), so the sum is ``Sk(μ)``, ``μ = (zCγ)²``."""

    tag = "dskellam"
    mechanism = "skellam"

    @property
    def local_mu(self) -> float:
        """μ/n: the variance of one client's share, in integer units."""
        return self.sum_stddev_scaled**2 / self.clients

    def _noise(self, d: int, g: np.random.Generator) -> np.ndarray:
        return skellam_array(self.local_mu, d, g)


def ddp_codec(mechanism: Mechanism = "ddg", **kw: Any) -> DistributedDP:
    """The codec of ``mechanism`` (``"ddg"`` or ``"skellam"``) with ``kw``."""
    cls = {"ddg": DistributedDiscreteGaussian, "skellam": DistributedSkellam}[_mechanism(mechanism)]
    return cls(**kw)


def _wrap_estimate(v: np.ndarray, bits: int) -> tuple[float, float]:
    """(spread, expected wrapped coordinates) of a sum known only mod 2^bits.

    For a wrapped N(0, s²) on Z_M, ``E cos(2πV/M) = exp(−2π²s²/M²)``, so
    ``s = (M/2π)·sqrt(−2 ln mean cos)``; a coordinate wraps when ``|N(0, s²)| >= M/2``."""
    if v.size == 0:
        return 0.0, 0.0
    modulus = float(1 << bits)
    c = float(np.cos(2 * np.pi * (v.astype(np.float64) / modulus)).mean())
    if c <= 0:
        return math.inf, float(v.size) / 2  # spread out over the whole ring: as good as uniform
    s = modulus / (2 * math.pi) * math.sqrt(max(-2 * math.log(min(c, 1.0)), 0.0))
    wrapped = v.size * math.erfc(modulus / (2 * math.sqrt(2) * s)) if s > 0 else 0.0
    return s, wrapped


def count_wrapped(integer_sum: np.ndarray, bits: int) -> int:
    """How many coordinates of a true integer sum (a simulation's: the clients'
    :meth:`DistributedDP.integers` added up) lie outside ``[−2^(m−1), 2^(m−1))``
    and so wrap when reduced mod ``2^m``."""
    half = 1 << (bits - 1)
    s = np.asarray(integer_sum)
    return int(np.count_nonzero((s < -half) | (s >= half)))


# --------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------


def ddg_tau(local_sigma: float, clients: int) -> float:
    """KLS21 Theorem 1 / Proposition 14's ``τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ_c²·k/(k+1))``."""
    k = np.arange(1, clients, dtype=np.float64)
    return float(10 * np.exp(-2 * math.pi**2 * local_sigma**2 * k / (k + 1)).sum())


def _base_rdp(mechanism: str, orders: np.ndarray, l2: float, l1: float, sigma: float, clients: int,
              d: int) -> np.ndarray:
    """One round's RDP at integer ``orders`` without sampling: sensitivities
    ``l2, l1`` and the sum's noise std ``sigma``, all in integer units."""
    a = orders.astype(np.float64)
    if mechanism == "gaussian":
        return a * l2**2 / (2 * sigma**2)
    if mechanism == "ddg":
        # KLS21 Proposition 14: the sum of n discrete Gaussians N_Z(0, σ_c²), σ_c = σ/√n
        local = sigma / math.sqrt(clients)
        if clients > 1 and local < 0.5:
            raise ConfigError(f"the distributed discrete Gaussian's bound needs each client's sigma >= 1/2 in "
                              f"integer units, got {local:.4g} (= z·C·γ/√n): raise gamma or the noise")
        tau = ddg_tau(local, clients)
        x2, x1 = l2 / sigma, l1 / sigma
        t1 = a * x2**2 / 2 + tau * d
        t2 = a / 2 * (x2**2 + 2 * x1 * tau + tau**2 * d)
        t3 = a / 2 * (x2 + math.sqrt(d) * tau) ** 2
        return np.minimum(np.minimum(t1, t2), t3)
    # AKL21 Theorem 3.5: Sk(μ), μ = σ²
    mu = sigma**2
    return a * l2**2 / (2 * mu) + np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln  # scipy comes with dp_accounting

    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _log_expm1(x: float) -> float:
    """log(e^x − 1) for x > 0 without overflow."""
    return x + math.log(-math.expm1(-x)) if x > 1 else math.log(math.expm1(x))


def subsampled_rdp(orders: Sequence[int], base: Mapping[int, float] | np.ndarray, q: float,
                   sampling: Sampling) -> np.ndarray:
    """The RDP of a sampled round at integer ``orders`` from the unsampled
    curve ``base`` (``base[l]`` for every integer ``l`` in 2..max order).

    * ``"poisson"``: Zhu & Wang (ICML 2019), Theorem 5 (any mechanism, add/remove):
      ``(1/(α−1)) log[(1−q)^{α−1}(αq − q + 1) + C(α,2) q² (1−q)^{α−2} e^{ε(2)}
      + 3 Σ_{l=3}^α C(α,l) q^l (1−q)^{α−l} e^{(l−1)ε(l)}]``;
    * ``"fixed"``: Wang, Balle, Kasiviswanathan (AISTATS 2019), Theorem 9 (any
      mechanism, replace-one, ``ε(∞) = ∞``): ``(1/(α−1)) log[1 + q² C(α,2)
      min(4(e^{ε(2)} − 1), 2e^{ε(2)}) + 2 Σ_{j=3}^α q^j C(α,j) e^{(j−1)ε(j)}]``;

    each the smaller of that and ``ε(α)`` unsampled."""
    _sampling(sampling)
    if not 0 < q <= 1:
        raise ConfigError(f"the sampling rate must be in (0, 1], got {q!r}")
    eps = np.asarray([base[i] if i >= 2 else 0.0 for i in range(max(orders) + 1)], dtype=np.float64)
    out = []
    for alpha in orders:
        alpha = int(alpha)
        if alpha < 2:
            raise ConfigError(f"orders must be integers >= 2, got {alpha}")
        if q == 1:
            out.append(eps[alpha])
            continue
        ls = np.arange(2, alpha + 1)
        lc = _log_comb(alpha, ls)
        with np.errstate(over="ignore", invalid="ignore"):
            if sampling == "poisson":
                log1q = math.log1p(-q)
                terms = lc + ls * math.log(q) + (alpha - ls) * log1q + (ls - 1) * eps[ls]
                terms[1:] += math.log(3)
                first = (alpha - 1) * log1q + math.log(alpha * q - q + 1)
                total = np.logaddexp.reduce(np.concatenate([[first], terms]))
            else:
                e2 = eps[2]
                two = min(math.log(4) + (_log_expm1(e2) if e2 > 0 else -math.inf), math.log(2) + e2)
                terms = lc + ls * math.log(q) + (ls - 1) * eps[ls] + math.log(2)
                terms[0] = lc[0] + 2 * math.log(q) + two
                total = np.logaddexp.reduce(np.concatenate([[0.0], terms]))
        out.append(min(total / (alpha - 1), eps[alpha]))
    return np.asarray(out, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _round_rdp_cached(mechanism: str, noise_multiplier: float, gamma: float, clip: float, dims: tuple[int, ...],
                      cohort: int, population: int, beta: float, sampling: str,
                      orders: tuple[int, ...]) -> tuple[float, ...]:
    d = sum(dims)
    sigma = noise_multiplier * clip * gamma  # the sum's noise std, integer units
    if mechanism == "gaussian":
        l2 = clip * gamma  # no rounding: the continuous Gaussian on the clipped sum
    else:
        l2 = rounded_norm_bound(clip * gamma, dims, beta)
    if sampling == "fixed":  # replace one client: the sum moves by up to twice one client's vector
        l2 *= 2
    l1 = l1_bound(l2, d)
    top = max(orders)
    base = _base_rdp(mechanism, np.arange(0, top + 1), l2, l1, sigma, cohort, d)
    rdp = subsampled_rdp(orders, base, cohort / population, sampling)  # type: ignore[arg-type]
    return tuple(float(r) for r in rdp)


def round_rdp(mechanism: str, noise_multiplier: float, gamma: float, clip: float, dims: int | Sequence[int],
              cohort: int, population: int, *, beta: float = DEFAULT_BETA, sampling: Sampling = "fixed",
              orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """One round's RDP at ``orders`` (see the module doc): ``mechanism`` ``"ddg"``,
    ``"skellam"`` or ``"gaussian"`` (the continuous Gaussian on the clipped
    sum, through the same sampling bound), noise ``z = noise_multiplier`` on
    clip ``C``, scale ``γ``, a model of tensors of sizes ``dims``, ``cohort``
    clients a round (the noise's ``n``) out of ``population``."""
    mechanism = _mechanism(mechanism, allow_gaussian=True)
    z = _positive("noise_multiplier", noise_multiplier)
    orders_t = tuple(int(o) for o in orders)
    if not orders_t or any(o < 2 for o in orders_t):
        raise ConfigError("orders must be integers >= 2")
    cohort, population = _count("cohort", cohort), _count("population", population)
    if cohort > population:
        raise ConfigError(f"cohort={cohort} is larger than population={population}")
    return np.asarray(_round_rdp_cached(
        mechanism, z, _positive("gamma", gamma), _positive("clip", clip), _dims(dims), cohort, population,
        _beta(beta), _sampling(sampling), orders_t))


def ddp_epsilon(mechanism: str, noise_multiplier: float, gamma: float, dims: int | Sequence[int], rounds: int,
                cohort: int, population: int, delta: float, *, clip: float = 1.0, beta: float = DEFAULT_BETA,
                sampling: Sampling = "fixed", orders: Sequence[int] = RDP_ORDERS) -> float:
    """ε after ``rounds`` rounds at ``delta``, per client (see :func:`round_rdp`).

    Rounds compose by adding RDP curves; ``dp_accounting``'s ``compute_epsilon``
    converts the total to (ε, δ). ``noise_multiplier = 0``: ε = inf. ``γ`` is
    the same scale as the codec's; the accounting depends on ``γ`` and ``C``
    through ``γC`` only."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    rounds = _count("rounds", rounds)
    if noise_multiplier == 0:
        return math.inf
    per_round = round_rdp(mechanism, noise_multiplier, gamma, clip, dims, cohort, population, beta=beta,
                          sampling=sampling, orders=orders)
    eps, _ = compute_epsilon(list(orders), list(per_round * rounds), float(delta))
    return float(eps)


# --------------------------------------------------------------------------
# Parameter selection (KLS21 §4, AKL21 §4: γ from the bits, then the noise)
# --------------------------------------------------------------------------


def scale_for_bits(bits: int, clip: float, noise_multiplier: float, cohort: int, dim: int,
                   k_stddevs: float = 4.0, rho: float = 1.0, sqrt_n_growth: bool = False) -> float:
    """``γ`` such that ``k`` standard deviations of a coordinate of the sum fit
    in ``2^m``, the sum modelled as sub-Gaussian (KLS21 §4.2 and §4.4; the
    heuristic of the authors' code):
    ``2^m = 2k·sqrt(ρ·C²·n_f/d·γ² + n/4 + (zCγ)²)``, i.e.
    ``γ = sqrt(4^m/(4k²) − n/4) / sqrt(ρC²n_f/d + (zC)²)``, with
    ``n_f = n²`` (the clients' vectors may all point the same way) or ``n``
    (``sqrt_n_growth``), ``ρ`` the rotation's flatness (1: the papers'; this
    module's two-window rotation bounds it by 2), ``n/4`` the rounding variance."""
    bits = _count("bits", bits)
    clip = _positive("clip", clip)
    z = _non_negative("noise_multiplier", noise_multiplier)
    n, dim = _count("cohort", cohort), _count("dim", dim)
    k = _positive("k_stddevs", k_stddevs)
    rho = _positive("rho", rho)
    room = 4.0**bits / (4 * k * k) - n / 4
    if room <= 0:
        raise ConfigError(f"{bits} bits cannot hold {k} standard deviations of the rounding of {n} clients: "
                          "more bits, fewer clients or a smaller k")
    n_f = n if sqrt_n_growth else n * n
    return math.sqrt(room) / math.sqrt(rho * clip**2 * n_f / dim + (z * clip) ** 2)


@dataclass(frozen=True)
class DDPParameters:
    """What :func:`ddp_parameters` picked: the scale, the noise multiplier, the ε they give."""

    gamma: float
    noise_multiplier: float
    epsilon: float


def ddp_parameters(target_epsilon: float, delta: float, rounds: int, cohort: int, population: int, bits: int,
                   dims: int | Sequence[int], *, mechanism: Mechanism = "ddg", clip: float = 1.0,
                   beta: float = DEFAULT_BETA, sampling: Sampling = "fixed", k_stddevs: float | None = None,
                   rho: float = 1.0, sqrt_n_growth: bool = False, tol: float = 1e-3) -> DDPParameters:
    """``γ`` and the smallest noise multiplier ``z`` (within ``tol``, relative)
    for which ``rounds`` rounds cost at most ``target_epsilon`` at ``delta``,
    with ``γ = scale_for_bits(bits, …, z, …)`` (the papers' selection, simplified:
    for each ``z`` the scale that fits ``k`` standard deviations in ``m`` bits,
    then bisection on ``z``; ε falls as ``z`` grows because ``zγ`` grows).

    Few bits put a floor under ε (as ``z`` grows, ``zγC`` tends to
    ``2^m/(2k)`` while the rounding's ``d/4`` stays): a target below it is a
    :class:`ConfigError`."""
    target = _positive("target_epsilon", target_epsilon)
    mechanism = _mechanism(mechanism)  # type: ignore[assignment]
    ds = _dims(dims)
    k = DEFAULT_K_STDDEVS[mechanism] if k_stddevs is None else _positive("k_stddevs", k_stddevs)
    d = sum(ds)

    def gamma_for(z: float) -> float:
        return scale_for_bits(bits, clip, z, cohort, d, k, rho, sqrt_n_growth)

    @functools.cache
    def eps(z: float) -> float:
        try:
            return ddp_epsilon(mechanism, z, gamma_for(z), ds, rounds, cohort, population, delta, clip=clip,
                               beta=beta, sampling=sampling)
        except ConfigError as e:
            if "sigma >= 1/2" in str(e):
                return math.inf  # too little noise per client for KLS21's bound: more noise
            raise

    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 2.0**20:
            raise ConfigError(f"no noise reaches epsilon={target_epsilon!r} with {bits} bits for {d} coordinates "
                              f"(epsilon cannot go below about {eps(hi):.3g}): use more bits")
    lo = hi / 2
    while eps(lo) <= target:
        hi, lo = lo, lo / 2
        if lo < 1e-6:
            break
    while (hi - lo) > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return DDPParameters(gamma_for(hi), hi, eps(hi))


# --------------------------------------------------------------------------
# The aggregator: clipping, the codec, secure aggregation, measurements
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedDPStage(Stage):
    """The server's view of distributed DP each round: it moves nothing (the
    clients' codec does the work) and reports the mechanism's measurements:
    ``bits``, ``gamma``, ``noise_stddev`` (the std of the noise in the sum
    this round, update units: ``zC·sqrt(count/clients)``), the codec's
    wrap estimate (:meth:`DistributedDP.drain_measurements`) and, given
    ``population`` and ``delta``, ``epsilon`` after the rounds run so far."""

    codec: DistributedDP
    population: int | None = None
    delta: float | None = None
    sampling: str = "fixed"
    key: str = "ddp"

    def init(self) -> dict[str, Any]:
        return {"rounds": 0}

    def broadcast(self, state: Mapping[str, Any]) -> dict[str, float]:
        return {}

    def client(self, scalars, update):
        return update, {}

    def server(self, state, aggregate: Aggregate, reports, rng):
        c = self.codec
        rounds = int(state.get("rounds", 0)) + 1
        meas: dict[str, float] = {
            "bits": float(c.bits), "gamma": c.gamma,
            "noise_stddev": c.noise_stddev * math.sqrt(aggregate.count / c.clients),
        }
        meas.update(c.drain_measurements())
        if self.population is not None and self.delta is not None:
            dims = tuple(int(v.numel()) for v in aggregate.sums.values())
            meas["epsilon"] = ddp_epsilon(c.mechanism, c.noise_multiplier, c.gamma, dims, rounds, c.clients,
                                          self.population, self.delta, clip=c.clip, beta=c.beta,
                                          sampling=self.sampling)  # type: ignore[arg-type]
        return aggregate, {"rounds": rounds}, meas


def distributed_dp(noise_multiplier: float, clip: float, cohort: int, *, bits: int = 16,
                   gamma: float | None = None, dim: int | None = None, mechanism: Mechanism = "ddg",
                   beta: float = DEFAULT_BETA, k_stddevs: float | None = None, seed: int = 0,
                   threshold: int | float = 0.5, neighbours: int | None = None, secure: bool = True,
                   population: int | None = None, delta: float | None = None,
                   sampling: Sampling = "fixed") -> Aggregator:
    """The mean of the clients' updates under distributed DP: L2 clipping to
    ``clip``, the :class:`DistributedDP` codec of ``mechanism`` on every
    tensor, summed by secure aggregation (:func:`~fedzip.privacy.secagg.secure_mean`'s
    protocol, mod ``2^bits``; ``secure=False``: the same sum without the
    protocol, for fast simulation), and a :class:`DistributedDPStage`
    reporting the noise, the wrap estimate and ε (given ``population`` and
    ``delta``). ``gamma`` defaults to :func:`scale_for_bits` for a model of
    ``dim`` values::

        distributed_dp(1.0, clip=0.1, cohort=10, bits=16, dim=n_params, population=284, delta=1/284)
    """
    mechanism = _mechanism(mechanism)  # type: ignore[assignment]
    cohort = _count("cohort", cohort)
    if gamma is None:
        if dim is None:
            raise ConfigError("distributed_dp needs gamma, or dim (the model's size) to choose it")
        k = DEFAULT_K_STDDEVS[mechanism] if k_stddevs is None else k_stddevs
        gamma = scale_for_bits(bits, clip, noise_multiplier, cohort, dim, k)
    codec = ddp_codec(mechanism, bits=bits, gamma=gamma, clip=clip, noise_multiplier=noise_multiplier,
                      clients=cohort, beta=beta, seed=seed)
    if population is not None:
        _count("population", population)
    _sampling(sampling)
    stage = DistributedDPStage(codec, population, delta, sampling)
    secure_config = None
    if secure:
        from fedzip.privacy.secagg import SecAggConfig  # cryptography loads only when asked for

        secure_config = SecAggConfig(threshold, neighbours)
    inner = Aggregator((stage,), as_policy(codec), weighted=False, secure=secure_config)
    return clipping(inner, clip)


__all__ = [
    "DEFAULT_BETA", "DDPParameters", "DistributedDP", "DistributedDPStage", "DistributedDiscreteGaussian",
    "DistributedSkellam", "count_wrapped", "ddg_tau", "ddp_codec", "ddp_epsilon", "ddp_parameters",
    "distributed_dp", "l1_bound", "rotate", "round_rdp", "rounded_norm_bound", "rounding_bound",
    "scale_for_bits", "subsampled_rdp", "unrotate",
]
