"""One bit per coordinate: the sign.

* :class:`SignSGD` — Bernstein, Wang, Azizzadenesheli, Anandkumar,
  "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018:
  the server receives ``+-scale`` (a fixed step known to both sides, 1 by
  default); zeros go as ``+``.
* :class:`ScaledSign` — Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback
  Fixes SignSGD and other Gradient Compression Schemes", ICML 2019
  (EF-signSGD): ``(||x||_1 / d) * sign(x)``, the least-squares scale, one
  float32 per tensor. Biased: meant for
  :class:`~fedzip.codecs.feedback.ErrorFeedback`.
"""

from __future__ import annotations

import numpy as np
import torch

from fedzip.codecs.base import Reader, flat_input, numel_of
from fedzip.codecs.symbols import Side, SymbolCodec, Symbols
from fedzip.errors import ConfigError


def _bits(v: torch.Tensor) -> np.ndarray:
    return (v < 0).to(torch.uint8).numpy()  # 1 = negative


def _signs(symbols: np.ndarray, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    s = torch.from_numpy(symbols.astype(np.float32))
    return s.mul_(-2.0 * scale).add_(scale).reshape(shape)


class SignSGD(SymbolCodec):
    """``scale * sign(x)``, one bit per value, nothing else sent. Biased."""

    tag = "sign"
    unbiased = False

    def __init__(self, scale: float = 1.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (0 < scale < float("inf")):
            raise ConfigError(f"SignSGD.scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        bits = _bits(flat_input(x))
        return Symbols(bits, b"", Side(len(bits), 2))

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        return Side(numel_of(shape), 2)

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        return _signs(symbols, self.scale, shape)


class ScaledSign(SymbolCodec):
    """``(||x||_1 / d) * sign(x)``: one float32 and one bit per value. Biased."""

    tag = "ssign"
    unbiased = False

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        v = flat_input(x)
        d = v.numel()
        scale = float(v.abs().sum(dtype=torch.float64)) / d if d else 0.0
        head = np.float32(scale).astype("<f4").tobytes()
        bits = _bits(v)
        return Symbols(bits, head, Side(d, 2, float(np.float32(scale))))

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        return Side(numel_of(shape), 2, reader.f32("scale"))

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        return _signs(symbols, side.info, shape)
