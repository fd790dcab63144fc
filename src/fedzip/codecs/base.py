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
import sys
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from fedzip.bytereader import Reader  # noqa: F401 - codecs read their bytes with it (fedzip.bytereader)
from fedzip.errors import NonFiniteUpdateError, PayloadError
from fedzip.tree import is_finite  # noqa: F401 - re-exported: codecs check their input with it


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

    def encode_view(self, x: torch.Tensor, rng: torch.Generator) -> bytes | memoryview:
        """``encode``'s bytes, possibly as a read-only view of ``x``'s memory (valid
        while ``x`` is unchanged): the client's path, which copies the bytes once
        into its message, uses it to skip a copy. Same bytes, same randomness;
        the caller has checked ``x`` finite (codecs may skip their own check)."""
        return self.encode(x, rng)

    def decode_view(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        """``decode``, possibly as a read-only view of ``data`` that the caller
        reads and drops before ``data`` goes (the server's fold). The caller
        checks the values are finite. Same values as :meth:`decode`."""
        return self.decode(data, shape)

    # -- per-client state (error feedback, warm starts); stateless by default --

    def init_client_state(self, shape: tuple[int, ...]) -> Any:
        """The state a client starts with for a tensor of ``shape`` (None: stateless)."""
        return None

    def encode_stateful(
        self, x: torch.Tensor, rng: torch.Generator, state: Any
    ) -> tuple[bytes, Any]:
        """Encode with the client's state; returns the bytes and the new state."""
        return self.encode(x, rng), state

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        """An upper bound on ``len(encode(x))`` for ``x`` of ``shape``: what a
        lossless stage after this codec may decompress to at most. Generous by
        default (twice float64); codecs may tighten it."""
        return 16 * numel_of(shape) + 4096

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "tag")
        return f"{type(self).__name__}({fields})"


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise :class:`NonFiniteUpdateError` if ``x`` holds NaN or Inf."""
    if not is_finite(x):
        raise NonFiniteUpdateError(f"{what} holds NaN or Inf values; codecs encode finite values")


def numpy_generator(rng: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (one draw): numpy's PCG64 makes
    float32 uniforms about twice as fast as torch's CPU Mersenne twister."""
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    return np.random.default_rng(seed)


def uniforms_float32(rng: torch.Generator, n: int) -> np.ndarray:
    """``numpy_generator(rng).random(n, dtype=np.float32)``: the same floats in
    about 70% of the time (see :class:`UniformStream`)."""
    return UniformStream(rng).fill(np.empty(n, np.float32))


class UniformStream:
    """The float32 uniforms of ``numpy_generator(rng).random(n, dtype=np.float32)``,
    drawn piece by piece into the caller's buffers: the pieces, concatenated,
    are those ``n`` floats. A codec can then quantize a large tensor in blocks
    that stay in the core's cache (a block's uniforms made and used at once)
    instead of one pass over memory per operation.

    numpy makes each float32 as ``(u >> 8) * 2^-24`` from a 32-bit draw, and
    PCG64 gives two 32-bit draws per 64-bit output, low half first; this draws
    the 64-bit outputs in one call and does the rest with array operations
    (2.1 against 1.5 ms for 1.6 M floats), falling back to numpy's own method
    where that layout does not hold (checked once against numpy itself). So
    every piece but the last must have an even length (a raw output is never
    split between pieces)."""

    def __init__(self, rng: torch.Generator) -> None:
        self._g = numpy_generator(rng)
        self._odd = False

    def fill(self, out: np.ndarray) -> np.ndarray:
        """Write the next ``len(out)`` uniforms into ``out`` (1-D float32); returns it."""
        if self._odd:
            raise RuntimeError("UniformStream: only the last piece may have an odd length")
        n = len(out)
        if _RAW_UNIFORMS_MATCH:
            _raw_fill(self._g, out)
        else:
            self._g.random(dtype=np.float32, out=out)
        self._odd = n % 2 == 1
        return out


def _raw_fill(g: np.random.Generator, out: np.ndarray) -> None:
    n = len(out)
    halves = g.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    np.right_shift(halves, 8, out=halves)
    out[...] = halves  # below 2^24: exact in float32
    out *= np.float32(2.0**-24)


def _raw_uniforms_match() -> bool:
    if sys.byteorder != "little":
        return False
    try:
        for seed, pieces in ((0, (1,)), (1, (2,)), (2, (7,)), (3, (64,)), (4, (2, 6, 3))):
            g, out = np.random.default_rng(seed), np.empty(sum(pieces), np.float32)
            start = 0
            for n in pieces:  # a stream drawn in pieces, as UniformStream does
                _raw_fill(g, out[start:start + n])
                start += n
            if not np.array_equal(out, np.random.default_rng(seed).random(len(out), dtype=np.float32)):
                return False
        return True
    except (AttributeError, TypeError, ValueError):  # another bit generator, another numpy
        return False


_RAW_UNIFORMS_MATCH = _raw_uniforms_match()


def to_numpy_f32(x: torch.Tensor) -> np.ndarray:
    """A contiguous little-endian float32 numpy view of ``x`` (copied to CPU if needed)."""
    return x.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()


def flat_input(x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """``x`` checked finite, as a contiguous 1-D float32 CPU tensor (CUDA input is moved)."""
    check_finite(x, what)
    return x.detach().to("cpu", torch.float32).contiguous().reshape(-1)


def draw_seed(rng: torch.Generator) -> int:
    """A 32-bit seed drawn from ``rng``: what travels in the bytes for the
    decoder to regenerate the same randomness."""
    return int(torch.randint(0, 2**32, (1,), generator=rng, dtype=torch.int64))


def norm64(v: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norm (as float64) without overflow or underflow for any finite
    float32 input: computed in float32 (fast), again in float64 where that
    overflowed (values above ~1e19) or came out zero."""
    n32 = torch.linalg.vector_norm(v) if dim is None else torch.linalg.vector_norm(v, dim=dim)
    if bool(torch.isfinite(n32).all()) and bool((n32 > 0).all()):
        return n32.double()
    if dim is None:
        return torch.linalg.vector_norm(v, dtype=torch.float64)
    return torch.linalg.vector_norm(v, dim=dim, dtype=torch.float64)


def f32_at_least(values: np.ndarray | float) -> np.ndarray:
    """float32 values rounded up (away from zero for positives): a norm sent as
    float32 never ends up below the true norm."""
    v64 = np.asarray(values, np.float64)
    v32 = v64.astype(np.float32)
    low = v32.astype(np.float64) < v64
    if low.any():
        v32 = np.where(low, np.nextafter(v32, np.float32(np.inf)), v32).astype(np.float32)
    return v32


def finite_output(t: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The decoded tensor as float32 of ``shape``; a PayloadError if the bytes
    decoded to NaN or Inf (finite inputs never do: only forged side info can)."""
    t = t.to(torch.float32).reshape(shape)
    if not is_finite(t):
        raise PayloadError(f"{what}: decoded values are not finite (forged scale or levels)")
    return t


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
    """No compression: the tensor's float32 values, little-endian (32 bits each).

    The baseline of every paper in this package. NaN or Inf in the bytes is
    rejected (no finite input encodes to it)."""

    tag = "f32"
    unbiased = True

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        check_finite(x)
        return to_numpy_f32(x).astype("<f4", copy=False).tobytes()

    def encode_view(self, x: torch.Tensor, rng: torch.Generator) -> memoryview:
        # no finite check: the client's path checked the update just before
        view = memoryview(to_numpy_f32(x).astype("<f4", copy=False)).cast("B")
        return view.toreadonly()

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        n = numel_of(shape)
        expect_length(data, 4 * n, "float32 tensor")
        arr = np.frombuffer(data, dtype="<f4").astype(np.float32)
        return finite_output(torch.from_numpy(arr), shape, "float32 tensor")

    def decode_view(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        if sys.byteorder != "little":
            return self.decode(data, shape)
        n = numel_of(shape)
        expect_length(data, 4 * n, "float32 tensor")
        if n == 0:
            return torch.zeros(shape)
        with warnings.catch_warnings():
            # the bytes are immutable and the view is only read (a copy per tensor saved)
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=torch.float32).reshape(shape)

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return 4 * numel_of(shape)
