"""A cursor over untrusted bytes: the one reader the wire format and every codec use.

Every read names its field, and the reader names what it reads (``"message"``,
``"top-k"``, a codec's tag), so a malformed payload fails with one
:class:`~fedzip.errors.PayloadError` that says what was cut short where::

    r = Reader(data, "top-k")
    k = r.u32("k")                 # PayloadError: top-k truncated: k needs 4 bytes at offset 0, 2 left
    values = r.f32_array(k, "values")
    r.done()                       # PayloadError: top-k: 3 unexpected trailing bytes

Lengths are checked against the bytes present before anything is sliced, and
slices are zero-copy views of the input.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from fedzip.errors import PayloadError

__all__ = ["Reader"]


@functools.lru_cache(maxsize=256)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct("<" + fmt)


class Reader:
    """A cursor over untrusted bytes that checks every length before slicing.

    ``what`` names the thing being read; it starts every error message.
    """

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self.view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> memoryview:
        """The next ``n`` bytes, as a view."""
        if n < 0 or self.pos + n > len(self.view):
            raise PayloadError(
                f"{self.what} truncated: {field} needs {n} bytes at offset {self.pos}, "
                f"{len(self.view) - self.pos} left"
            )
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str | struct.Struct, field: str) -> tuple:
        """Little-endian values: ``fmt`` is a :mod:`struct` format without the
        byte order (``"fH"``), or a ready ``struct.Struct``."""
        s = fmt if isinstance(fmt, struct.Struct) else _struct(fmt)
        return s.unpack(self.take(s.size, field))

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return self.unpack("I", field)[0]

    def f32(self, field: str, positive: bool = False) -> float:
        """A finite float32 (and > 0 when ``positive``)."""
        v = self.unpack("f", field)[0]
        if not np.isfinite(v) or (positive and v <= 0):
            raise PayloadError(f"{self.what}: {field} is {v}, expected a finite{' positive' if positive else ''} value")
        return v

    def f32_array(self, n: int, field: str) -> np.ndarray:
        """``n`` finite float32 values."""
        arr = np.frombuffer(self.take(4 * n, field), dtype="<f4").astype(np.float32)
        if not np.isfinite(arr).all():
            raise PayloadError(f"{self.what}: {field} holds non-finite values")
        return arr

    def utf8(self, n: int, field: str) -> str:
        """``n`` bytes of UTF-8 text."""
        try:
            return bytes(self.take(n, field)).decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(f"{self.what}: {field} is not valid UTF-8") from None

    @property
    def left(self) -> int:
        return len(self.view) - self.pos

    def rest(self) -> memoryview:
        """Everything not read yet."""
        return self.take(self.left, "rest")

    def done(self) -> None:
        """Raise unless every byte was read."""
        if self.pos != len(self.view):
            raise PayloadError(f"{self.what}: {len(self.view) - self.pos} unexpected trailing bytes")
