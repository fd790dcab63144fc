"""Uniform scalar quantization, TFF's ``uniform_quantization`` encoding stage
with tight packing.

Values are mapped linearly from ``[lo, hi]`` onto the integers ``0 .. 2^b - 1``
and rounded, stochastically (unbiased: round up with probability equal to the
fractional part) or to the nearest level. With ``range=None`` the range is the
tensor's own min and max, sent as two float32 (64 bits per tensor), which is
what TFF's ``compression_aggregator`` does with 8 bits. Codes are bit-packed:
``ceil(n * b / 8)`` bytes.

It is a :class:`~fedzip.codecs.symbols.SymbolCodec`: the codes are its
symbols and ``(lo, hi)`` its side information, so
``EntropyCoded(UniformQuantization(8))`` codes them with ANS, and
``RandomRotation(UniformQuantization(b))`` is the rotated variant of Suresh
et al.

Reference: Suresh, Yu, Kumar, McMahan, "Distributed Mean Estimation with
Limited Communication", ICML 2017 (stochastic uniform quantization); Konečný
et al., "Federated Learning: Strategies for Improving Communication
Efficiency", 2016.
"""

from __future__ import annotations

import struct
import sys
import warnings

import numpy as np
import torch

from fedzip.bitpack import pack_bits, packed_size, unpack_bits
from fedzip.codecs.base import Reader, UniformStream, check_finite, finite_output, numel_of
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols
from fedzip.errors import ConfigError, PayloadError

_RANGE = struct.Struct("<ff")


class UniformQuantization(SymbolCodec):
    """``bits``-bit uniform quantization (1 to 16 bits).

    Args:
        bits: bits per element, 1..16.
        stochastic: unbiased stochastic rounding (True) or round to nearest.
        range: a fixed ``(lo, hi)`` known to both sides (values are clipped to
            it and no range is sent), or None for the tensor's min/max.

    Bytes: ``lo, hi`` (2 x f32, unless ``range`` is fixed) | ``bits``-bit codes.
    """

    tag = "uq"

    def __init__(self, bits: int = 8, stochastic: bool = True, range: tuple[float, float] | None = None):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ConfigError(f"UniformQuantization.bits must be an integer in 1..16, got {bits!r}")
        if range is not None:
            lo, hi = (float(v) for v in range)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ConfigError(f"UniformQuantization.range must be finite with lo < hi, got {range!r}")
            range = (lo, hi)
        self.bits = bits
        self.stochastic = bool(stochastic)
        self.range = range

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        # Unbiased only with stochastic rounding and a range that never clips.
        return self.stochastic and self.range is None

    #: values quantized per block: a block's values, uniforms and levels (3 MiB)
    #: are made and used while in cache. Measured on the FedAvg CNN's 1.6 M
    #: weights with the caches flushed before each call: 2.5 ms against 5.5 ms
    #: in one pass per operation over the whole tensor; 2^16 gave 2.8 ms. (In a
    #: round on a CPU with 32 MiB of L3 the update is mostly still cached: there
    #: the difference is within the noise.)
    BLOCK = 1 << 18

    def _quantize_into(self, x: torch.Tensor, rng: torch.Generator, codes: np.ndarray,
                       checked: bool = False) -> tuple[bytes, float, float]:
        """Write each value's code into ``codes`` (integers, one per value of
        ``x``); returns the range header and the range. ``checked``: the caller
        has checked ``x`` finite (the client's path)."""
        v = x.detach().to("cpu", torch.float32).reshape(-1)
        levels = (1 << self.bits) - 1
        if self.range is None:
            # NaN and Inf reach the min or the max: no separate finite pass
            lo, hi = (float(t) for t in torch.aminmax(v)) if v.numel() else (0.0, 0.0)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                check_finite(v)  # raises the codecs' NonFiniteUpdateError
            header = _RANGE.pack(lo, hi)
            lo, hi = _RANGE.unpack(header)  # quantize against exactly what is sent
        else:
            if not checked:
                check_finite(x)
            lo, hi = self.range
            header = b""
        if not hi > lo:
            codes[:] = 0
            return header, lo, hi
        n, scale = v.numel(), levels / (hi - lo)
        y = torch.empty(min(n, self.BLOCK))
        y_np = y.numpy()
        if self.stochastic:
            dither = UniformStream(rng)
            u = np.empty(len(y), np.float32)
            u_t = torch.from_numpy(u)
        for start in range(0, n, self.BLOCK):  # BLOCK is even: only the last block may be odd
            stop = min(n, start + self.BLOCK)
            m = stop - start
            level = y[:m]
            if self.range is None:
                torch.sub(v[start:stop], lo, out=level)
            else:
                torch.clamp(v[start:stop], lo, hi, out=level).sub_(lo)
            level.mul_(scale)
            if self.stochastic:
                # level + u >= 0, so truncating (the integer cast below) is the floor
                dither.fill(u[:m])
                level.add_(u_t[:m])
            else:
                level.round_()
            level.clamp_(0, levels)
            np.copyto(codes[start:stop], y_np[:m], casting="unsafe")  # numpy's cast truncates
        return header, lo, hi

    def _codes(self, x: torch.Tensor, rng: torch.Generator) -> tuple[bytes, np.ndarray, float, float]:
        codes = np.empty(x.numel(), np.uint8 if self.bits <= 8 else np.int32)
        header, lo, hi = self._quantize_into(x, rng, codes)
        return header, codes, lo, hi

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        header, codes, _, _ = self._codes(x, rng)
        return header + pack_bits(codes, self.bits)

    def encode_view(self, x: torch.Tensor, rng: torch.Generator) -> bytes | memoryview:
        # 8 and 16 bits: the codes are written straight into the body (no packing
        # copy, no concatenation); the same bytes as ``encode``
        if self.bits not in (8, 16) or sys.byteorder != "little":
            return self.encode(x, rng)
        head = 0 if self.range is not None else _RANGE.size
        body = np.empty(head + packed_size(x.numel(), self.bits), np.uint8)
        codes = body[head:].view(np.uint8 if self.bits == 8 else np.uint16)
        header, _, _ = self._quantize_into(x, rng, codes, checked=True)
        body[:head] = np.frombuffer(header, np.uint8)
        return memoryview(body).toreadonly()

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        header, codes, lo, hi = self._codes(x, rng)
        return Symbols(codes, header, Side(len(codes), 1 << self.bits, (lo, hi)))

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        if self.range is None:
            lo, hi = reader.unpack("ff", "range")
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise PayloadError(f"quantized tensor: invalid range ({lo}, {hi})")
        else:
            lo, hi = self.range
        return Side(numel_of(shape), 1 << self.bits, (lo, hi))

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        lo, hi = side.info
        levels = (1 << self.bits) - 1
        # in place on one float32 buffer: the same float32 products and sums as
        # numpy's ``codes * step + lo``, half the memory traffic
        with warnings.catch_warnings():
            # codes read in place from the message are read-only: only read here (cast to a new tensor)
            warnings.simplefilter("ignore", UserWarning)
            codes = torch.from_numpy(np.ascontiguousarray(symbols)).to(torch.float32)
        return codes.mul_(float(np.float32((hi - lo) / levels))).add_(float(np.float32(lo))).reshape(shape)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        return finite_output(self._decode(data, shape, view=False), shape, "quantized tensor")

    def decode_view(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        # the caller checks the values finite; 8 and 16-bit codes are read in place
        return self._decode(data, shape, view=True)

    def _decode(self, data: bytes | memoryview, shape: tuple[int, ...], view: bool) -> torch.Tensor:
        n = numel_of(shape)
        head = _RANGE.size if self.range is None else 0
        expected = head + packed_size(n, self.bits)
        if len(data) != expected:
            raise PayloadError(f"{self.bits}-bit quantized tensor: expected {expected} bytes, got {len(data)}")
        side = self.read_side(Reader(data[:head], self.tag), shape)
        if view and self.bits in (8, 16) and sys.byteorder == "little":
            codes = np.frombuffer(data, np.uint8 if self.bits == 8 else np.uint16, count=n, offset=head)
        else:
            codes = unpack_bits(data[head:], self.bits, n)
        return self.dequantize(codes, side, shape)

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return _RANGE.size + packed_size(numel_of(shape), self.bits)
