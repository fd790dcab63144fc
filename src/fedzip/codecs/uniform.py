"""Uniform scalar quantization, TFF's ``uniform_quantization`` encoding stage
with tight packing.

Values are mapped linearly from ``[lo, hi]`` onto the integers ``0 .. 2^b - 1``
and rounded, stochastically (unbiased: round up with probability equal to the
fractional part) or to the nearest level. With ``range=None`` the range is the
tensor's own min and max, sent as two float32 (64 bits per tensor), which is
what TFF's ``compression_aggregator`` does with 8 bits. Codes are bit-packed:
``ceil(n * b / 8)`` bytes.

Reference: Suresh, Yu, Kumar, McMahan, "Distributed Mean Estimation with
Limited Communication", ICML 2017 (stochastic uniform quantization); Konečný
et al., "Federated Learning: Strategies for Improving Communication
Efficiency", 2016.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from fedzip.bitpack import pack_bits, packed_size, unpack_bits
from fedzip.codecs.base import Codec, check_finite, numel_of, numpy_generator
from fedzip.errors import ConfigError, PayloadError

_RANGE = struct.Struct("<ff")


class UniformQuantization(Codec):
    """``bits``-bit uniform quantization (1 to 16 bits).

    Args:
        bits: bits per element, 1..16.
        stochastic: unbiased stochastic rounding (True) or round to nearest.
        range: a fixed ``(lo, hi)`` known to both sides (values are clipped to
            it and no range is sent), or None for the tensor's min/max.
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

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        check_finite(x)
        v = x.detach().to("cpu", torch.float32).reshape(-1)
        levels = (1 << self.bits) - 1
        if self.range is None:
            lo, hi = (float(t) for t in torch.aminmax(v)) if v.numel() else (0.0, 0.0)
            header = _RANGE.pack(lo, hi)
            lo, hi = _RANGE.unpack(header)  # quantize against exactly what is sent
        else:
            lo, hi = self.range
            header = b""
            v = v.clamp(lo, hi)
        if hi > lo:
            # in place on one fresh buffer: this loop is the hot path of every round
            y = v.sub(lo).mul_(levels / (hi - lo))
            if self.stochastic:
                u = numpy_generator(rng).random(y.numel(), dtype=np.float32)
                y.add_(torch.from_numpy(u)).floor_()
            else:
                y.round_()
            y.clamp_(0, levels)
            codes = y.to(torch.uint8 if self.bits <= 8 else torch.int32).numpy()
        else:
            codes = np.zeros(v.numel(), np.uint8)
        return header + pack_bits(codes, self.bits)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        n = numel_of(shape)
        head = _RANGE.size if self.range is None else 0
        expected = head + packed_size(n, self.bits)
        if len(data) != expected:
            raise PayloadError(f"{self.bits}-bit quantized tensor: expected {expected} bytes, got {len(data)}")
        if self.range is None:
            lo, hi = _RANGE.unpack(data[:head])
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise PayloadError(f"quantized tensor: invalid range ({lo}, {hi})")
        else:
            lo, hi = self.range
        codes = torch.from_numpy(unpack_bits(data[head:], self.bits, n).astype(np.float32))
        levels = (1 << self.bits) - 1
        return (codes * np.float32((hi - lo) / levels) + np.float32(lo)).reshape(shape)
