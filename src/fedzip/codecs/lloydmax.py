"""Non-uniform scalar quantization with Lloyd-Max levels.

* :class:`GaussianLloydMax`: the fixed MSE-optimal levels of N(0, 1),
  scaled per row by the row's RMS; meant for rotated input, where every
  coordinate is close to Gaussian (EDEN and DRIVE are this after a
  :class:`~fedzip.codecs.rotation.RandomRotation`). Sends one float32 scale
  per row.
* :class:`LloydMax`: ``2^b`` levels fitted to the tensor itself by Lloyd's
  iteration (k-means in 1-D) and sent as float32, with nearest-level
  (biased, lowest MSE) or stochastic rounding between neighbouring levels
  (unbiased).

References: S. Lloyd, "Least squares quantization in PCM", 1957 (IEEE
Trans. IT 1982); J. Max, "Quantizing for minimum distortion", IRE Trans.
IT 1960; Vargaftik et al., "EDEN", ICML 2022 (Lloyd-Max levels after
rotation, with the unbiased scale).
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np
import torch

from fedzip.codecs.base import Reader, flat_input, norm64, numel_of, numpy_generator
from fedzip.codecs.gaussian import lloyd_max, lloyd_max_probabilities
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols
from fedzip.errors import ConfigError, PayloadError


class Bucketizer:
    """Maps values to the index of their cell among sorted ``boundaries``
    (the count of boundaries strictly below the value).

    Symmetric boundaries, at most 15 of them (4 bits), are counted with a
    comparison per positive boundary on ``|z|``; more use two table lookups
    (bins narrower than half the smallest gap hold at most one boundary
    between two neighbours). Both are several times faster than a binary
    search (``torch.bucketize``).
    """

    def __init__(self, boundaries: np.ndarray) -> None:
        b = np.asarray(boundaries, np.float64)
        self.boundaries = b.astype(np.float32)
        self.k = len(b) + 1
        mid = len(b) // 2
        symmetric = len(b) % 2 == 1 and bool(np.allclose(b, -b[::-1])) and b[mid] == 0
        self.positive: list[float] | None = None
        if symmetric and len(b) <= 15:
            self.positive = [float(v) for v in self.boundaries[mid + 1 :]]
            return
        gap = float(np.diff(b).min()) if len(b) > 1 else 1.0
        lo, hi = float(b[0]) - 1.0, float(b[-1]) + 1.0
        nb = int(min(1 << 20, math.ceil((hi - lo) / (gap / 2.5)) + 1))
        self.lo, self.inv, self.nb = lo, nb / (hi - lo), nb
        starts = lo + np.arange(nb) / self.inv
        self.lut = np.searchsorted(self.boundaries, starts.astype(np.float32), side="left").astype(np.int32)
        self.ext = np.append(self.boundaries, np.float32(np.inf))

    def __call__(self, z: torch.Tensor) -> np.ndarray:
        """Cell indices of the float32 values ``z`` (uint8 up to 256 cells, else int32)."""
        if self.positive is not None:  # numpy: its comparisons are ~6x faster than torch's
            zn = z.numpy()
            sign = (zn > 0).view(np.uint8)
            if not self.positive:  # one bit: the sign
                return sign.copy()
            a = np.abs(zn)
            m = (a > self.positive[0]).view(np.uint8).copy()
            for bnd in self.positive[1:]:
                m += (a > bnd).view(np.uint8)
            # z > 0: cell half + m; otherwise half - 1 - m; as half - 1 - m + sign * (2m + 1)
            out = m * np.uint8(2)
            out += np.uint8(1)
            out *= sign
            out += np.uint8(self.k // 2 - 1)
            out -= m
            return out
        t = z.sub(self.lo).mul_(self.inv).sub_(0.5).clamp_(0, self.nb - 1).to(torch.int32).numpy()
        s = self.lut[t]
        s += z.numpy() > self.ext[s]
        return s.astype(np.uint8) if self.k <= 256 else s


@functools.cache
def _gaussian_tables(bits: int) -> tuple[np.ndarray, Bucketizer]:
    c, bnd, _ = lloyd_max(bits)
    return c.astype(np.float32), Bucketizer(bnd)


def _as_rows(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 2:
        return v.view(shape[0], shape[1])
    return v.view(1, -1)


class GaussianLloydMax(SymbolCodec):
    """Fixed Lloyd-Max levels of N(0, 1), ``bits`` per value (1..8), scaled per row.

    Each row ``y`` (a 1-D input is one row) is normalized by its RMS
    ``sigma = ||y|| / sqrt(n)``, mapped to the nearest of the ``2^b`` levels
    ``c``, and rebuilt as ``S * c[symbol]`` with

    * ``unbiased=True``: ``S = ||y||^2 / <y, c>`` (EDEN's scale; unbiased
      over a uniformly random rotation, NMSE ``eps / (1 - eps)``);
    * ``unbiased=False``: ``S = <y, c> / ||c||^2`` (least squares; lower
      MSE, biased).

    Bytes: one float32 ``S`` per row | ``bits``-bit codes. The symbols'
    Gaussian probabilities are a free prior for entropy coding.
    """

    tag = "lmg"

    def __init__(self, bits: int = 2, unbiased: bool = True) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ConfigError(f"GaussianLloydMax.bits must be an integer in 1..8, got {bits!r}")
        self.bits = bits
        self.unbiased_scale = bool(unbiased)

    unbiased = False  # deterministic on its own: unbiased over a rotation only

    @property
    def unbiased_when_rotated(self) -> bool:  # type: ignore[override]
        return self.unbiased_scale

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        shape = tuple(x.shape)
        rows = _as_rows(flat_input(x), shape)
        cent, bucket = _gaussian_tables(self.bits)
        r, n = rows.shape
        sigma = norm64(rows, dim=1) / math.sqrt(max(n, 1))
        inv = torch.where(sigma > 0, 1.0 / sigma, torch.zeros_like(sigma)).to(torch.float32)
        z = rows * inv[:, None]
        sym = bucket(z.reshape(-1))
        q = torch.from_numpy(cent[sym]).view(r, n)
        zq = (z * q).sum(1).double()  # <z, c>: O(1) terms, float32 is exact enough
        if self.unbiased_scale:
            scale = torch.where(zq > 0, sigma * n / zq, torch.zeros_like(zq))
        else:
            qq = (q * q).sum(1).double()
            scale = torch.where(qq > 0, sigma * zq / qq, torch.zeros_like(zq))
        s32 = scale.numpy().astype("<f4")
        symbols = sym.astype(np.uint8, copy=False)
        side = Side(r * n, 1 << self.bits, s32.astype(np.float32), lloyd_max_probabilities(self.bits))
        return Symbols(symbols, s32.tobytes(), side)

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        rows = shape[0] if len(shape) == 2 else 1
        scales = reader.f32_array(rows, "row scales")
        return Side(numel_of(shape), 1 << self.bits, scales, lloyd_max_probabilities(self.bits))

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        cent, _ = _gaussian_tables(self.bits)
        q = torch.from_numpy(cent[symbols])
        rows = side.info.shape[0]
        return (q.view(rows, -1) * torch.from_numpy(side.info)[:, None]).reshape(shape)


_FIT_ITERATIONS = 12
_LEVEL = struct.Struct("<f")


class LloydMax(SymbolCodec):
    """``bits``-bit quantization with ``2^b`` levels fitted to the tensor.

    Lloyd's iteration (a few vectorized passes) from quantile-spaced levels;
    the levels go first in the bytes as ``2^b`` float32, then the packed codes.

    Args:
        bits: 1..8.
        stochastic: round to one of the two neighbouring levels with the
            probabilities that make it unbiased (the outer levels are pinned
            to the tensor's min and max so nothing is clipped); False rounds
            to the nearest level (lowest MSE, biased).
    """

    tag = "lm"

    def __init__(self, bits: int = 3, stochastic: bool = False) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ConfigError(f"LloydMax.bits must be an integer in 1..8, got {bits!r}")
        self.bits = bits
        self.stochastic = bool(stochastic)

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return self.stochastic

    def _fit(self, v: np.ndarray) -> np.ndarray:
        k = 1 << self.bits
        if len(v) == 0:
            return np.zeros(k, np.float32)
        sample = v if len(v) <= 65536 else v[:: len(v) // 65536 + 1]
        levels = np.quantile(sample.astype(np.float64), (np.arange(k) + 0.5) / k)
        for _ in range(_FIT_ITERATIONS):
            bnd = (levels[1:] + levels[:-1]) / 2
            idx = np.searchsorted(bnd, sample)
            sums = np.bincount(idx, weights=sample, minlength=k)
            counts = np.bincount(idx, minlength=k)
            levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
            levels = np.maximum.accumulate(levels)
        if self.stochastic:
            levels[0], levels[-1] = float(v.min()), float(v.max())
            levels = np.clip(levels, levels[0], levels[-1])
            levels = np.maximum.accumulate(levels)
        return levels.astype(np.float32)

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        v = flat_input(x).numpy()
        k = 1 << self.bits
        levels = self._fit(v)
        if self.stochastic:
            # the cell [levels[i], levels[i+1]) holding v, then up with probability (v - lo) / width
            i = np.clip(np.searchsorted(levels, v, side="right") - 1, 0, k - 2) if k > 1 else np.zeros(len(v), np.int64)
            lo = levels[i].astype(np.float64)
            hi = levels[np.minimum(i + 1, k - 1)].astype(np.float64)
            width = hi - lo
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(width > 0, (v - lo) / width, 0.0)
            u = numpy_generator(rng).random(len(v))
            sym = (i + (u < frac)).astype(np.uint8)
        else:
            bnd = ((levels[1:].astype(np.float64) + levels[:-1]) / 2).astype(np.float32)
            sym = np.searchsorted(bnd, v, side="left").astype(np.uint8)
        head = levels.astype("<f4").tobytes()
        return Symbols(sym, head, Side(len(v), k, levels))

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        levels = reader.f32_array(1 << self.bits, "levels")
        return Side(numel_of(shape), 1 << self.bits, levels)

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        if len(symbols) and int(symbols.max()) >= len(side.info):
            raise PayloadError("Lloyd-Max symbols out of range")
        return torch.from_numpy(side.info[symbols]).reshape(shape)
