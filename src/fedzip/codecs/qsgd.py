"""QSGD: stochastic quantization of each bucket against its L2 norm.

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD
via Gradient Quantization and Encoding", NeurIPS 2017. Each bucket ``v`` of
``bucket_size`` consecutive values sends its norm ``||v||`` and, per value,
a sign and a level ``l`` in ``0..s`` drawn so that
``E[sign * ||v|| * l / s] = v_i``: ``l = floor(s |v_i| / ||v|| + u)``. The
variance is at most ``min(n/s^2, sqrt(n)/s)`` times ``||v||^2`` (Lemma 3.1).

The paper codes (sign, level) with Elias codes; here a value is the symbol
``sign * l + s`` of an alphabet of ``2s + 1``, packed in mixed radix
(``log2(2s + 1)`` bits each: 1.6 bits for ``s = 1``), and
``EntropyCoded(QSGD(...))`` codes them with ANS instead.
"""

from __future__ import annotations

import numpy as np
import torch

from fedzip.codecs.base import Reader, f32_at_least, flat_input, norm64, numel_of, uniforms_float32
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols
from fedzip.errors import ConfigError, PayloadError


class QSGD(SymbolCodec):
    """QSGD with ``levels`` (``s``) quantization levels per sign and a norm per bucket.

    Args:
        levels: ``s`` >= 1; ``2s + 1`` symbols per value (s = 7: 15 symbols, 3.9 bits).
        bucket_size: values per norm (the paper uses 512).

    Bytes: one float32 norm per bucket | mixed-radix packed symbols. Unbiased.
    """

    tag = "qsgd"
    unbiased = True

    def __init__(self, levels: int = 7, bucket_size: int = 512) -> None:
        if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 32767:
            raise ConfigError(f"QSGD.levels must be an integer in 1..32767, got {levels!r}")
        if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 1:
            raise ConfigError(f"QSGD.bucket_size must be a positive integer, got {bucket_size!r}")
        self.levels = levels
        self.bucket_size = bucket_size

    def _buckets(self, d: int) -> int:
        return -(-d // self.bucket_size)

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        v = flat_input(x)
        d = v.numel()
        nb, b, s = self._buckets(d), self.bucket_size, self.levels
        padded = torch.zeros(nb * b, dtype=torch.float32)
        padded[:d] = v
        rows = padded.view(nb, b)
        norms = f32_at_least(norm64(rows, dim=1).numpy())  # never below the true norm: level <= s
        inv = np.divide(s, norms.astype(np.float64), out=np.zeros(nb), where=norms > 0).astype(np.float32)
        scaled = rows.abs().mul_(torch.from_numpy(inv)[:, None]).reshape(-1)[:d]
        u = torch.from_numpy(uniforms_float32(rng, d))
        level = scaled.add_(u).floor_().clamp_(0, s)
        sym = torch.where(v < 0, -level, level).add_(s).to(torch.int32).numpy()
        dtype = np.uint8 if 2 * s + 1 <= 256 else np.uint16
        side = Side(d, 2 * s + 1, norms.astype(np.float32))
        return Symbols(sym.astype(dtype), norms.astype("<f4").tobytes(), side)

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        d = numel_of(shape)
        norms = reader.f32_array(self._buckets(d), "bucket norms")
        if (norms < 0).any():
            raise PayloadError("QSGD: a bucket norm is negative")
        return Side(d, 2 * self.levels + 1, norms)

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        d = numel_of(shape)
        s, b = self.levels, self.bucket_size
        per = torch.from_numpy(side.info / np.float32(s)).repeat_interleave(b)[:d]
        lev = torch.from_numpy(symbols.astype(np.float32)).sub_(s)
        return lev.mul_(per).reshape(shape)

