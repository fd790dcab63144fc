"""The codec contract: a tensor goes in, wire bytes come out, and back.

A codec defines two methods (GRACE's encode/decode split, with the bytes made
real):

* ``encode(x, rng) -> bytes``: ``x`` is a float tensor of any shape (on any
  device); ``rng`` is a seeded ``torch.Generator`` for anything random. What
  is returned *is* the tensor data on the wire: its bits are ``8 * len``.
* ``decode(data, shape) -> Tensor``: rebuild a float32 CPU tensor of ``shape``
  from untrusted bytes. It must check lengths before it allocates and raise
  :class:`~fedzip.errors.PayloadError` on anything malformed.

A codec that needs a seed on both sides (a rotation, rand-k indices) writes
the seed into its bytes: the seed travels, not the matrix, and it is counted.

Codecs that remember something per client across rounds (error feedback,
PowerSGD's warm start) override :meth:`Codec.encode_stateful`; the aggregator
keeps that state in its own state keyed by client id, never in globals.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from fedzip.errors import NonFiniteUpdateError, PayloadError


class Codec(abc.ABC):
    """Base class of every codec. Subclasses set ``tag`` and define encode/decode."""

    #: Short ASCII id written in front of every tensor this codec encodes.
    tag: ClassVar[str] = ""
    #: True when E[decode(encode(x))] == x; checked statistically by the contract test.
    unbiased: ClassVar[bool] = False

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        """Encode ``x`` to the bytes that go on the wire."""

    @abc.abstractmethod
    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """Decode untrusted bytes into a float32 CPU tensor of ``shape``."""

    # -- per-client state (error feedback, warm starts); stateless by default --

    def init_client_state(self, shape: tuple[int, ...]) -> Any:
        """The state a client starts with for a tensor of ``shape`` (None: stateless)."""
        return None

    def encode_stateful(
        self, x: torch.Tensor, rng: torch.Generator, state: Any
    ) -> tuple[bytes, Any]:
        """Encode with the client's state; returns the bytes and the new state."""
        return self.encode(x, rng), state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def is_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN or Inf.

    Fast path: NaN and Inf propagate through a sum, so a finite sum proves
    every element finite; only a non-finite sum (which finite values can
    reach by overflow) needs the element-wise check.
    """
    if x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum(dtype=torch.float64) if x.is_floating_point() else x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise :class:`NonFiniteUpdateError` if ``x`` holds NaN or Inf."""
    if not is_finite(x):
        raise NonFiniteUpdateError(f"{what} holds NaN or Inf values; codecs encode finite values")


def numpy_generator(rng: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (one draw): numpy's PCG64 makes
    float32 uniforms about twice as fast as torch's CPU Mersenne twister."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return np.random.default_rng(seed)


def to_numpy_f32(x: torch.Tensor) -> np.ndarray:
    """A contiguous little-endian float32 numpy view of ``x`` (copied to CPU if needed)."""
    return x.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def expect_length(data: bytes | memoryview, expected: int, what: str) -> None:
    """Fail with a clear message unless ``data`` holds exactly ``expected`` bytes."""
    if len(data) != expected:
        raise PayloadError(f"{what}: expected {expected} bytes, got {len(data)}")


class Float32(Codec):
    """No compression: the tensor's float32 values, little-endian (32 bits each)."""

    tag = "f32"
    unbiased = True

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        check_finite(x)
        return to_numpy_f32(x).astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        n = numel_of(shape)
        expect_length(data, 4 * n, "float32 tensor")
        arr = np.frombuffer(data, dtype="<f4").astype(np.float32)
        return torch.from_numpy(arr).reshape(shape)
