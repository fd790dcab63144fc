"""Integer encodings whose sum decodes to the sum of the inputs.

Secure aggregation (Bonawitz et al., CCS 2017) lets the server learn only the
sum of the clients' vectors, as integers modulo some ``2^m``. A codec
survives it when its encodings *add*: the sum of the clients' integer codes
must decode to the sum of their inputs without decoding any one of them.
Per-client min/max ranges (TFF's compression) do not add; a scale shared by
every client does.

:class:`SharedScaleQuantization` is stochastic uniform quantization on a
range ``[-bound, bound]`` fixed for all clients (from the clipping bound, as
in Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021, §4, without the noise).
Client ``i`` sends ``q_i = floor((x_i + bound) / step + u)`` with ``step =
2·bound / (2^b − 1)`` and ``u`` uniform: unbiased for inputs in range. The
sum of ``n`` codes decodes as ``Σ q_i · step − n · bound``. The sum needs
``b + ceil(log2 n)`` bits per coordinate (:func:`sum_bits`); the
:class:`~fedzip.aggregators.EncodedSum` accumulator adds in int64 and checks
that bound, so nothing wraps silently.
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch

from fedzip.bitpack import pack_bits, packed_size, unpack_bits
from fedzip.codecs.base import Codec, flat_input, numel_of, numpy_generator
from fedzip.errors import ConfigError, PayloadError


class SummableCodec(Codec):
    """A codec whose encodings can be added before decoding (see the module doc)."""

    @abc.abstractmethod
    def parse_summand(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """One client's bytes as its integer codes (validated, not decoded)."""

    def add_summands(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @abc.abstractmethod
    def decode_sum(self, total: torch.Tensor, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The sum of ``count`` clients' inputs from the sum of their codes."""


def sum_bits(bits: int, clients: int) -> int:
    """Bits per coordinate a sum of ``clients`` codes of ``bits`` bits needs."""
    return bits + max(0, math.ceil(math.log2(max(clients, 1))))


class SharedScaleQuantization(SummableCodec):
    """``bits``-bit stochastic quantization on ``[-bound, bound]``, the same for all clients.

    Values outside the range are clamped to it (pair the codec with L2
    clipping to ``bound``: every coordinate of a clipped update is within it).
    Bytes: the ``bits``-bit codes, packed; nothing else (the scale is known).
    """

    tag = "ssq"
    unbiased = True

    def __init__(self, bits: int = 8, bound: float = 1.0) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ConfigError(f"SharedScaleQuantization.bits must be an integer in 1..16, got {bits!r}")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ConfigError(f"SharedScaleQuantization.bound must be a positive number, got {bound!r}")
        self.bits = bits
        self.bound = float(bound)

    @property
    def step(self) -> float:
        return 2.0 * self.bound / (2**self.bits - 1)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        v = flat_input(x).numpy().astype(np.float64)
        levels = 2**self.bits - 1
        scaled = (np.clip(v, -self.bound, self.bound) + self.bound) / self.step
        u = numpy_generator(rng).random(scaled.shape)
        codes = np.clip(np.floor(scaled + u), 0, levels).astype(np.int64)
        return pack_bits(codes, self.bits)

    def parse_summand(self, data, shape):
        n = numel_of(shape)
        if len(data) != packed_size(n, self.bits):
            raise PayloadError(f"ssq: {len(data)} bytes for {n} codes of {self.bits} bits, "
                               f"expected {packed_size(n, self.bits)}")
        return torch.from_numpy(unpack_bits(data, self.bits, n).astype(np.int64))

    def decode_sum(self, total, count, shape):
        if total.dtype != torch.int64 or int(total.min()) < 0 or int(total.max()) > count * (2**self.bits - 1):
            raise PayloadError("ssq: the sum of codes is outside what the clients could have sent")
        out = total.to(torch.float64) * self.step - count * self.bound
        return out.reshape(shape).to(torch.float32)

    def decode(self, data, shape):
        return self.decode_sum(self.parse_summand(data, shape), 1, shape)

    def max_encoded_size(self, shape):
        return packed_size(numel_of(shape), self.bits)
