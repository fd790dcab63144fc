"""Quantizers that expose their integer symbols, so that an entropy coder can
code them: the seam between *quantization* and *lossless coding*.

A :class:`SymbolCodec` turns a tensor into integer symbols in
``[0, alphabet)`` plus side information (scales, seeds, levels), and back.
Its plain bytes are ``side | packed symbols`` (:func:`~fedzip.bitpack.pack_symbols`:
``log2 K`` bits each for a power-of-two alphabet, mixed radix otherwise);
:class:`~fedzip.codecs.entropy.EntropyCoded` replaces the packed symbols by
an ANS stream. Wrappers (:class:`Transform`: a rotation, a random subset)
pass the symbols of their inner codec through and prepend their own side
information, so rotation -> quantization -> entropy coding composes.

Side information is read back through a :class:`~fedzip.codecs.base.Reader`
cursor, so nested codecs each take their part of the bytes in turn.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedzip.bitpack import pack_symbols, unpack_symbols
from fedzip.codecs.base import Codec, Reader, finite_output, flat_input, numel_of


@dataclass(frozen=True)
class Side:
    """Parsed side information: how many symbols follow, from which alphabet,
    what the dequantizer needs (``info``, codec-specific), and optionally a
    ``prior``: symbol probabilities both ends know without sending them (an
    entropy coder's model for free)."""

    count: int
    alphabet: int
    info: Any = None
    prior: np.ndarray | None = None


@dataclass(frozen=True)
class Symbols:
    """What :meth:`SymbolCodec.quantize` returns: the symbols (1-D integers,
    ``len == side.count``), the side information as bytes, and parsed."""

    symbols: np.ndarray
    side_bytes: bytes
    side: Side


class SymbolCodec(Codec):
    """A quantizer with integer symbols + side information (see module doc).

    Subclasses define :meth:`quantize`, :meth:`read_side` and
    :meth:`dequantize`; :meth:`encode` and :meth:`decode` follow.
    """

    #: True for a deterministic quantizer whose scale makes it unbiased over a
    #: uniformly random rotation of its input (EDEN), though not on its own.
    unbiased_when_rotated: bool = False

    @property
    def symbolic(self) -> bool:
        """Whether :meth:`quantize` and friends work (wrappers forward their inner codec's)."""
        return True

    @abc.abstractmethod
    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        """Symbols and side information for ``x`` (checks ``x`` is finite)."""

    @abc.abstractmethod
    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        """Read and validate this codec's side information at the reader's position."""

    @abc.abstractmethod
    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild the tensor from symbols in ``[0, side.alphabet)``."""

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        s = self.quantize(x, rng)
        return s.side_bytes + pack_symbols(s.symbols, s.side.alphabet)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        r = Reader(data, self.tag)
        side = self.read_side(r, shape)
        symbols = unpack_symbols(r.rest(), side.alphabet, side.count)
        return finite_output(self.dequantize(symbols, side, shape), shape, self.tag)




class Transform(SymbolCodec):
    """A codec that transforms the tensor, lets ``inner`` code the result and
    inverts the transform after decoding (a rotation, a random subset).

    Subclasses define :meth:`forward` (returns header bytes, the transformed
    tensor and a context), :meth:`read_header` (the context back from the
    bytes), :meth:`inner_shape` and :meth:`backward`. Symbols pass through
    when ``inner`` is a :class:`SymbolCodec`.
    """

    def __init__(self, inner: Codec) -> None:
        if not isinstance(inner, Codec):
            raise TypeError(f"{type(self).__name__} wraps a Codec, got {type(inner).__name__}")
        self.inner = inner

    @property
    def symbolic(self) -> bool:
        return isinstance(self.inner, SymbolCodec) and self.inner.symbolic

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        if self.rotates and getattr(self.inner, "unbiased_when_rotated", False):
            return True
        return bool(self.inner.unbiased)

    #: Set by a transform that randomizes like a uniform rotation: an inner
    #: quantizer that is unbiased only over such a rotation (EDEN's scale) is then unbiased.
    rotates: bool = False

    # -- what subclasses define ---------------------------------------------

    @abc.abstractmethod
    def forward(
        self, v: torch.Tensor, shape: tuple[int, ...], rng: torch.Generator
    ) -> tuple[bytes, torch.Tensor, Any]:
        """Transform the flat finite float32 ``v``: header bytes, tensor for ``inner``, context."""

    @abc.abstractmethod
    def read_header(self, reader: Reader, shape: tuple[int, ...]) -> Any:
        """The context back from the header bytes (validated)."""

    @abc.abstractmethod
    def inner_shape(self, shape: tuple[int, ...], ctx: Any) -> tuple[int, ...]:
        """The shape ``inner`` codes."""

    @abc.abstractmethod
    def backward(self, y: torch.Tensor, ctx: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """Invert the transform: a flat tensor of ``numel(shape)`` values."""

    # -- codec ----------------------------------------------------------------

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        shape = tuple(x.shape)
        header, y, _ = self.forward(flat_input(x), shape, rng)
        return header + self.inner.encode(y, rng)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        r = Reader(data, self.tag)
        ctx = self.read_header(r, shape)
        y = self.inner.decode(r.rest(), self.inner_shape(shape, ctx))
        return finite_output(self.backward(y, ctx, shape), shape, self.tag)

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        inner = self._symbolic_inner()
        shape = tuple(x.shape)
        header, y, ctx = self.forward(flat_input(x), shape, rng)
        s = inner.quantize(y, rng)
        side = Side(s.side.count, s.side.alphabet, (ctx, s.side), s.side.prior)
        return Symbols(s.symbols, header + s.side_bytes, side)

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        inner = self._symbolic_inner()
        ctx = self.read_header(reader, shape)
        s = inner.read_side(reader, self.inner_shape(shape, ctx))
        return Side(s.count, s.alphabet, (ctx, s), s.prior)

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        inner = self._symbolic_inner()
        ctx, inner_side = side.info
        y = inner.dequantize(symbols, inner_side, self.inner_shape(shape, ctx))
        return self.backward(y, ctx, shape).reshape(shape)

    def _symbolic_inner(self) -> SymbolCodec:
        if not self.symbolic:
            raise TypeError(f"{self.inner!r} exposes no symbols to entropy-code")
        return self.inner  # type: ignore[return-value]

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return 64 + self.inner.max_encoded_size((2 * numel_of(shape) + 1,))


class Delegate(SymbolCodec):
    """A named codec implemented by a composition (``self._impl``): EDEN is a
    rotation around Lloyd-Max levels, DRIVE the same at one bit."""

    _impl: Codec

    @property
    def symbolic(self) -> bool:
        return isinstance(self._impl, SymbolCodec) and self._impl.symbolic

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return self._impl.encode(x, rng)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        return self._impl.decode(data, shape)

    def quantize(self, x: torch.Tensor, rng: torch.Generator) -> Symbols:
        return self._impl.quantize(x, rng)  # type: ignore[attr-defined]

    def read_side(self, reader: Reader, shape: tuple[int, ...]) -> Side:
        return self._impl.read_side(reader, shape)  # type: ignore[attr-defined]

    def dequantize(self, symbols: np.ndarray, side: Side, shape: tuple[int, ...]) -> torch.Tensor:
        return self._impl.dequantize(symbols, side, shape)  # type: ignore[attr-defined]

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return self._impl.max_encoded_size(shape)
