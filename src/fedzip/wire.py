"""The wire format: what a client sends and what the server broadcasts.

Every message is bytes; bits on the wire are 8 × ``len(message)``, never a
formula. The layout (version 1, all integers little-endian) is::

    header   magic b"FZIP" | version u8 | kind u8 | n_scalars u16 | n_tensors u16
    scalars  n_scalars × ( name_len u8 | name utf-8 | value f64 )
    tensors  n_tensors × ( name_len u16 | name utf-8 | codec_len u8 | codec tag ascii
                           | ndim u8 | dims u32 × ndim | body_len u32 | body )

``body`` is what a codec produced for that tensor; its bytes are the *tensor
data*. Everything else is *framing* (header, names, tags, shapes, lengths) or
*scalars* (the example weight, training metrics, the aggregation stages'
reports). :func:`bit_account` itemizes the three.

Decoding trusts nothing: lengths are checked against the bytes present before
anything is sliced or allocated, shapes are bounded, names are UTF-8 and
unique, and no pickle is involved anywhere.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from fedzip.bytereader import Reader
from fedzip.errors import PayloadError

MAGIC = b"FZIP"
VERSION = 1
MAX_NDIM = 8
MAX_NAME_BYTES = 1024
# A single tensor may not claim more elements than this; the template check in
# the aggregator then pins the exact shape. It bounds what any decoder allocates.
MAX_ELEMENTS = 1 << 31

_HEADER = struct.Struct("<4sBBHH")
_F64 = struct.Struct("<d")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class Kind(IntEnum):
    """Which way a message travels."""

    UPDATE = 1  # client -> server
    BROADCAST = 2  # server -> client


@dataclass(frozen=True)
class TensorRecord:
    """One tensor on the wire: its name, the codec that made ``body``, its shape."""

    name: str
    codec: str
    shape: tuple[int, ...]
    body: bytes | memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Message:
    """A decoded (still codec-encoded) message."""

    kind: Kind
    scalars: dict[str, float]
    tensors: list[TensorRecord]
    nbytes: int = 0


@dataclass(frozen=True)
class BitAccount:
    """The bits of one message, itemized. ``total == framing + scalars + tensors``."""

    total: int
    framing: int
    scalars: int
    tensors: int
    per_tensor: dict[str, int] = field(default_factory=dict)


def encode_message(
    kind: Kind, scalars: Mapping[str, float], tensors: list[TensorRecord]
) -> bytes:
    """Serialize a message. Raises :class:`PayloadError` on names or shapes out of bounds."""
    if len(scalars) > 0xFFFF or len(tensors) > 0xFFFF:
        raise PayloadError("too many scalars or tensors for one message (at most 65,535 each)")
    parts = [_HEADER.pack(MAGIC, VERSION, int(kind), len(scalars), len(tensors))]
    for name, value in scalars.items():
        raw = _name_bytes(name, 0xFF)
        parts += [bytes([len(raw)]), raw, _F64.pack(float(value))]
    for t in tensors:
        # a body may be a view (Codec.encode_view): joined as it is, copied once
        body = t.body if isinstance(t.body, bytes) else memoryview(t.body).cast("B")
        raw = _name_bytes(t.name, 0xFFFF)
        tag = t.codec.encode("ascii")
        if not 0 < len(tag) <= 0xFF:
            raise PayloadError(f"codec tag {t.codec!r} must be 1 to 255 ASCII characters")
        if len(t.shape) > MAX_NDIM:
            raise PayloadError(f"tensor {t.name!r}: {len(t.shape)} dimensions, at most {MAX_NDIM}")
        if any(d < 0 or d > 0xFFFFFFFF for d in t.shape):
            raise PayloadError(f"tensor {t.name!r}: shape {t.shape} out of range")
        if math.prod(t.shape) > MAX_ELEMENTS:  # what decode_message would refuse
            raise PayloadError(f"tensor {t.name!r}: shape {t.shape} exceeds {MAX_ELEMENTS} elements")
        if len(body) > 0xFFFFFFFF:
            raise PayloadError(f"tensor {t.name!r}: body of {len(body)} bytes, at most 2^32 - 1")
        parts += [
            _U16.pack(len(raw)),
            raw,
            bytes([len(tag)]),
            tag,
            bytes([len(t.shape)]),
            struct.pack(f"<{len(t.shape)}I", *t.shape),
            _U32.pack(len(body)),
            body,
        ]
    return b"".join(parts)


def decode_message(data: bytes | bytearray | memoryview, expect: Kind | None = None) -> Message:
    """Parse a message without trusting it. Tensor bodies are zero-copy views."""
    reader = Reader(data, "message")
    magic, version, kind, n_scalars, n_tensors = reader.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise PayloadError(f"not a fedzip message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise PayloadError(f"unsupported wire version {version} (this build reads {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise PayloadError(f"unknown message kind {kind}") from None
    if expect is not None and kind != expect:
        raise PayloadError(f"expected a {expect.name} message, got {kind.name}")
    scalars: dict[str, float] = {}
    for _ in range(n_scalars):
        name = _read_name(reader, reader.u8("scalar name length"), "scalar name")
        if name in scalars:
            raise PayloadError(f"scalar {name!r} appears twice")
        scalars[name] = reader.unpack(_F64, f"scalar {name!r}")[0]
    tensors: list[TensorRecord] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = _read_name(reader, reader.unpack(_U16, "tensor name length")[0], "tensor name")
        if name in seen:
            raise PayloadError(f"tensor {name!r} appears twice")
        seen.add(name)
        tag_len = reader.u8(f"tensor {name!r} codec length")
        if tag_len == 0:
            raise PayloadError(f"tensor {name!r}: empty codec tag")
        try:
            codec = bytes(reader.take(tag_len, f"tensor {name!r} codec")).decode("ascii")
        except UnicodeDecodeError:
            raise PayloadError(f"tensor {name!r}: codec tag is not ASCII") from None
        ndim = reader.u8(f"tensor {name!r} ndim")
        if ndim > MAX_NDIM:
            raise PayloadError(f"tensor {name!r}: {ndim} dimensions, at most {MAX_NDIM}")
        shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim, f"tensor {name!r} shape"))
        if math.prod(shape) > MAX_ELEMENTS:
            raise PayloadError(f"tensor {name!r}: shape {shape} exceeds {MAX_ELEMENTS} elements")
        body_len = reader.unpack(_U32, f"tensor {name!r} body length")[0]
        body = reader.take(body_len, f"tensor {name!r} body")
        tensors.append(TensorRecord(name, codec, tuple(shape), body))
    reader.done()
    return Message(kind, scalars, tensors, nbytes=len(reader.view))


def bit_account(message: Message) -> BitAccount:
    """Itemize a message's bits: framing, scalar values, tensor bodies."""
    scalar_bits = 64 * len(message.scalars)
    per_tensor = {t.name: 8 * len(t.body) for t in message.tensors}
    tensor_bits = sum(per_tensor.values())
    total = 8 * message.nbytes
    return BitAccount(total, total - scalar_bits - tensor_bits, scalar_bits, tensor_bits, per_tensor)


def integer_fields(data: bytes) -> list[tuple[int, int]]:
    """``(offset, size)`` of every integer field of a *valid* message (version,
    kind, counts, name and tag lengths, dims, body lengths): where a lie does
    the most damage, so where fuzzers mutate."""
    out = [(4, 1), (5, 1), (6, 2), (8, 2)]
    n_scalars, n_tensors = struct.unpack_from("<HH", data, 6)
    pos = _HEADER.size
    for _ in range(n_scalars):
        out.append((pos, 1))
        pos += 1 + data[pos] + 8
    for _ in range(n_tensors):
        out.append((pos, 2))
        pos += 2 + struct.unpack_from("<H", data, pos)[0]
        out.append((pos, 1))
        pos += 1 + data[pos]
        out.append((pos, 1))
        ndim = data[pos]
        pos += 1
        out += [(pos + 4 * i, 4) for i in range(ndim)]
        pos += 4 * ndim
        out.append((pos, 4))
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
    return out


def _read_name(reader: Reader, n: int, what: str) -> str:
    if n == 0 or n > MAX_NAME_BYTES:
        raise PayloadError(f"{what}: length {n} out of range 1..{MAX_NAME_BYTES}")
    return reader.utf8(n, what)


def _name_bytes(name: str, limit: int) -> bytes:
    raw = name.encode("utf-8")
    if not 0 < len(raw) <= min(limit, MAX_NAME_BYTES):
        raise PayloadError(f"name {name[:40]!r} must be 1 to {min(limit, MAX_NAME_BYTES)} bytes")
    return raw
