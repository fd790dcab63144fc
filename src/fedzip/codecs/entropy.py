"""Entropy coding of quantized symbols with asymmetric numeral systems (ANS).

:class:`EntropyCoded` wraps any :class:`~fedzip.codecs.symbols.SymbolCodec`
(a quantizer exposing integer symbols) and codes its symbols with
``constriction``'s ANS coder and a categorical model, chosen per tensor as
the cheapest of

* ``PRIOR``: the probabilities the quantizer announces from its side
  information (Gaussian cell probabilities after a rotation): nothing sent;
* ``TABLE``: the empirical frequencies, quantized and sent compactly (first
  symbol, length, Rice-coded zigzag deltas of the frequencies);
* ``CONST``: every symbol equal (one number, no stream);
* ``PACKED``: the plain packed symbols (never worse than the quantizer alone
  plus one byte).

Bytes: inner side info | mode (u8) | model | ANS words (u32, little-endian).
The decoder bounds everything by the shape: the symbol count comes from the
quantizer's side information, the table length from the alphabet, and a
stream that is not a whole number of words, ends in a zero word or is not
consumed exactly is rejected.

References: J. Duda, "Asymmetric numeral systems", arXiv:0902.0271, 2009;
R. Bamler, "Understanding Entropy Coding With Asymmetric Numeral Systems
(ANS): a Statistician's Perspective", 2022 (``constriction``).
"""

from __future__ import annotations

import math
import struct

import constriction
import numpy as np
import torch

from fedzip.bitpack import (
    pack_symbols,
    packed_symbols_size,
    rice_decode,
    rice_encode,
    rice_parameter,
    rice_size,
    unpack_symbols,
)
from fedzip.codecs.base import Reader, finite_output
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols
from fedzip.errors import ConfigError, PayloadError

PRIOR, TABLE, CONST, PACKED = 0, 1, 2, 3
MAX_ALPHABET = 1 << 16  # largest alphabet given an ANS model
_MIN_P = 2.0**-24  # constriction's smallest probability (24-bit fixed point)
_TABLE_HEAD = struct.Struct("<HHB")  # first symbol, length - 1, Rice parameter
_MAX_FREQ = 1 << 20


def _model(probabilities: np.ndarray):
    return constriction.stream.model.Categorical(np.asarray(probabilities, np.float64), perfect=False)


def _cross_entropy_bits(counts: np.ndarray, probs: np.ndarray) -> float:
    p = np.asarray(probs, np.float64)
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        return math.inf
    p = np.maximum(p / total, _MIN_P)
    nz = counts > 0
    return float(-(counts[nz] * np.log2(p[nz])).sum())


def _zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d >= 0, 2 * d, -2 * d - 1).astype(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def _table_bytes(freqs: np.ndarray, first: int) -> bytes:
    deltas = _zigzag(np.diff(freqs.astype(np.int64), prepend=0))
    r = rice_parameter(deltas)
    r = min((r, r + 1, max(r - 1, 0)), key=lambda c: rice_size(deltas, c))
    return _TABLE_HEAD.pack(first, len(freqs) - 1, r) + rice_encode(deltas, r)


def _best_table(counts: np.ndarray) -> tuple[bytes, np.ndarray, int, float]:
    """The cheapest quantized frequency table: (bytes, freqs, first, estimated total bits)."""
    nz = np.flatnonzero(counts)
    first, last = int(nz[0]), int(nz[-1])
    c = counts[first : last + 1].astype(np.float64)
    n = c.sum()
    best: tuple[bytes, np.ndarray, int, float] | None = None
    for log_total in range(6, 21, 2):
        total = 2.0**log_total
        if total > 4 * n and best is not None:
            break
        f = np.where(c > 0, np.maximum(1, np.round(c * (total / n))), 0).astype(np.int64)
        raw = _table_bytes(f, first)
        bits = 8 * len(raw) + _cross_entropy_bits(c, f.astype(np.float64))
        if best is None or bits < best[3]:
            best = (raw, f, first, bits)
    assert best is not None
    return best


def _ans_encode(symbols: np.ndarray, probs: np.ndarray) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(symbols, np.int32), _model(probs))
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decode(data: memoryview, count: int, probs: np.ndarray) -> np.ndarray:
    if len(data) % 4:
        raise PayloadError(f"ANS stream: {len(data)} bytes is not a whole number of 32-bit words")
    if len(data) > 4 * count + 64:
        raise PayloadError(f"ANS stream: {len(data)} bytes for {count} symbols")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_model(probs), count)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, AssertionError) as e:
        raise PayloadError(f"ANS stream: {e}") from None
    if not empty:
        raise PayloadError("ANS stream: data left over after the last symbol")
    return np.asarray(out)


class EntropyCoded(SymbolCodec):
    """ANS coding of an inner quantizer's symbols (see module doc).

    Args:
        inner: a :class:`~fedzip.codecs.symbols.SymbolCodec`, e.g.
            ``RandomRotation(GaussianECSQ(4))``, ``EDEN(4)``, ``QSGD()``,
            ``UniformQuantization(8)``.
    """

    def __init__(self, inner: SymbolCodec) -> None:
        if not isinstance(inner, SymbolCodec) or not inner.symbolic:
            raise ConfigError(f"EntropyCoded needs a quantizer exposing symbols (a SymbolCodec), got {inner!r}")
        self.inner = inner
        self.tag = f"ans+{inner.tag}"

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return bool(self.inner.unbiased)

    # -- still a SymbolCodec: the symbols are the inner codec's --

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        return self.inner.quantize(x, rng)

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        return self.inner.read_side(reader, shape)

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        return self.inner.dequantize(symbols, side, shape)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        s = self.inner.quantize(x, rng)
        return s.side_bytes + self.code(s.symbols, s.side)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        r = Reader(data, self.tag)
        side = self.inner.read_side(r, shape)
        symbols = self.uncode(r, side)
        return finite_output(self.inner.dequantize(symbols, side, shape), shape, self.tag)

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        # the mode byte, a frequency table (at most ~3 bytes a symbol) and the ANS stream's end
        return self.inner.max_encoded_size(shape) + 3 * MAX_ALPHABET + 64

    # -- the symbol stream ---------------------------------------------------

    @staticmethod
    def code(symbols: np.ndarray, side: Side) -> bytes:
        """Mode byte, model and ANS stream for ``symbols`` (cheapest mode)."""
        n, k = side.count, side.alphabet
        packed = 8 * packed_symbols_size(n, k)
        if n == 0 or k == 1 or k > MAX_ALPHABET:
            return bytes([PACKED]) + pack_symbols(symbols, k)
        counts = np.bincount(symbols.astype(np.int64), minlength=k)
        nz = np.flatnonzero(counts)
        if len(nz) == 1:
            return bytes([CONST]) + struct.pack("<I", int(nz[0]))
        options: list[tuple[float, int]] = [(packed, PACKED)]
        if side.prior is not None and len(side.prior) == k:
            options.append((_cross_entropy_bits(counts, side.prior) + 64, PRIOR))
        table = _best_table(counts)
        options.append((table[3] + 64, TABLE))
        _, mode = min(options)
        if mode == PRIOR:
            return bytes([PRIOR]) + _ans_encode(symbols, side.prior)  # type: ignore[arg-type]
        if mode == TABLE:
            raw, freqs, first, _ = table
            return bytes([TABLE]) + raw + _ans_encode(symbols.astype(np.int64) - first, freqs)
        return bytes([PACKED]) + pack_symbols(symbols, k)

    @staticmethod
    def uncode(r: Reader, side: Side) -> np.ndarray:
        """Read the mode byte, model and stream for ``side.count`` symbols (all of the rest)."""
        n, k = side.count, side.alphabet
        mode = r.u8("entropy coding mode")
        if mode == PACKED:
            return unpack_symbols(r.rest(), k, n)
        if k > MAX_ALPHABET or n == 0 or k == 1:
            raise PayloadError(f"entropy coding mode {mode} is not valid for {n} symbols of {k}")
        if mode == CONST:
            (sym,) = r.unpack("I", "constant symbol")
            r.done()
            if sym >= k:
                raise PayloadError(f"constant symbol {sym} out of range for alphabet {k}")
            return np.full(n, sym, np.int64)
        if mode == PRIOR:
            if side.prior is None or len(side.prior) != k:
                raise PayloadError("entropy coding mode PRIOR, but the quantizer has no prior")
            return _ans_decode(r.rest(), n, side.prior)
        if mode == TABLE:
            first, length_1, rice = r.unpack("HHB", "frequency table header")
            length = length_1 + 1
            if length < 2 or first + length > k:
                raise PayloadError(f"frequency table: symbols {first}..{first + length - 1} for an alphabet of {k}")
            deltas, used = rice_decode(r.view[r.pos :], length, rice, 2 * _MAX_FREQ + 1)
            r.take(used, "frequency table")
            freqs = np.cumsum(_unzigzag(deltas.astype(np.int64)))
            if (freqs < 0).any() or (freqs > _MAX_FREQ).any() or freqs.sum() == 0:
                raise PayloadError("frequency table: frequencies out of range")
            return _ans_decode(r.rest(), n, freqs.astype(np.float64)).astype(np.int64) + first
        raise PayloadError(f"unknown entropy coding mode {mode}")
