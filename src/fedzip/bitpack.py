"""Tight bit packing of unsigned integer codes: ``n`` codes of ``b`` bits take
``ceil(n * b / 8)`` bytes, nothing more (TFF packs into 28-bit words and
wastes the rest; here nothing is wasted).

Three packings, all vectorized (no Python loop over elements):

* :func:`pack_bits` / :func:`unpack_bits`: fixed width ``b`` (1..32), code
  ``i`` at bits ``[i*b, (i+1)*b)`` of the little-endian stream, LSB first.
* :func:`pack_symbols` / :func:`unpack_symbols`: symbols of any alphabet
  size ``K``: a power of two packs at ``log2 K`` bits; otherwise groups of
  ``g`` symbols are written as one base-``K`` number (mixed radix), e.g. 20
  ternary symbols in 32 bits (1.6 bits each, log2 3 = 1.585).
* :func:`rice_encode` / :func:`rice_decode`: Golomb-Rice codes of
  non-negative integers (gaps between sorted indices, table deltas), with the
  unary parts and the fixed-width remainders in two separate streams so that
  both directions vectorize.

Decoders check lengths against the data before allocating and raise
:class:`~fedzip.errors.PayloadError`.
"""

from __future__ import annotations

import math

import numpy as np

from fedzip.errors import PayloadError


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy."""
    return (n * bits + 7) // 8


def _group(bits: int) -> int:
    """Codes per byte-aligned group: the smallest ``g`` with ``g * bits % 8 == 0``."""
    return 8 // math.gcd(bits, 8)


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack codes (each ``< 2**bits``) little-endian, LSB first."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    codes = np.ascontiguousarray(codes).ravel()
    n = len(codes)
    if bits == 8:
        return codes.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return codes.astype("<u2", copy=False).tobytes()
    if bits == 32:
        return codes.astype("<u4", copy=False).tobytes()
    if bits in (1, 2, 4):
        if bits == 1:
            return np.packbits(codes.astype(np.uint8, copy=False), bitorder="little").tobytes()
        per = 8 // bits
        c = codes.astype(np.uint8, copy=False)
        pad = (-n) % per
        if pad:
            c = np.concatenate([c, np.zeros(pad, np.uint8)])
        c = c.reshape(-1, per)
        out = c[:, 0].copy()
        for k in range(1, per):
            out |= c[:, k] << np.uint8(k * bits)
        return out.tobytes()
    return _pack_grouped(codes, bits)


def _pack_grouped(codes: np.ndarray, bits: int) -> bytes:
    """Any width 1..64: ``g`` codes make ``g*bits/8`` whole bytes, assembled in
    64-bit words (a code straddling a word boundary is split between two)."""
    n = len(codes)
    g = _group(bits)
    nbytes_group = g * bits // 8
    nwords = -(-nbytes_group // 8)
    pad = (-n) % g
    c = codes.astype(np.uint64, copy=False)
    if pad:
        c = np.concatenate([c, np.zeros(pad, np.uint64)])
    c = c.reshape(-1, g)
    words = np.zeros((len(c), nwords), np.uint64)
    for j in range(g):
        k, s = divmod(j * bits, 64)
        col = c[:, j]
        words[:, k] |= col << np.uint64(s)
        if s and s + bits > 64:
            words[:, k + 1] |= col >> np.uint64(64 - s)
    out = words.astype("<u8", copy=False).view(np.uint8).reshape(len(c), 8 * nwords)
    return np.ascontiguousarray(out[:, :nbytes_group]).ravel()[: packed_size(n, bits)].tobytes()


def _unpack_grouped(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    g = _group(bits)
    nbytes_group = g * bits // 8
    nwords = -(-nbytes_group // 8)
    groups = -(-n // g)
    raw = np.zeros((groups, 8 * nwords), np.uint8)
    flat = np.zeros(groups * nbytes_group, np.uint8)
    flat[: len(buf)] = buf
    raw[:, :nbytes_group] = flat.reshape(groups, nbytes_group)
    words = raw.view("<u8").astype(np.uint64, copy=False)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    dtype = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.uint64
    out = np.empty((groups, g), dtype)
    for j in range(g):
        k, s = divmod(j * bits, 64)
        col = words[:, k] >> np.uint64(s)
        if s and s + bits > 64:
            col |= words[:, k + 1] << np.uint64(64 - s)
        out[:, j] = col & mask
    return out.ravel()[:n]


def unpack_bits(data: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; checks that ``data`` has exactly the right length.

    Returns uint8 codes for ``bits <= 8``, uint16 up to 16 bits, uint32 above.
    """
    if not 1 <= bits <= 32:
        raise PayloadError(f"bit width {bits} out of range 1..32")
    expected = packed_size(n, bits)
    if len(data) != expected:
        raise PayloadError(f"packed codes: expected {expected} bytes for {n}×{bits} bits, got {len(data)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf.copy()
    if bits == 16:
        return np.frombuffer(data, dtype="<u2").astype(np.uint16)
    if bits == 32:
        return np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if bits == 1:
        return np.unpackbits(buf, bitorder="little", count=n)
    if bits in (2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((len(buf), per), np.uint8)
        for k in range(per):
            np.bitwise_and(buf >> np.uint8(k * bits), mask, out=out[:, k])
        return out.ravel()[:n]
    return _unpack_grouped(buf, bits, n)


# -- symbols of any alphabet size ------------------------------------------------


def symbol_bits(alphabet: int) -> int:
    """Bits per symbol when ``alphabet`` is a power of two (0 for an alphabet of 1)."""
    return (alphabet - 1).bit_length()


def _radix_group(alphabet: int) -> tuple[int, int]:
    """(symbols per group, bits per group) for mixed-radix packing: the most
    efficient group whose value fits in 64 bits."""
    best = (1, symbol_bits(alphabet))
    if alphabet < 3:
        return best
    g, value = 1, alphabet
    while value <= (1 << 64) // alphabet:
        g += 1
        value *= alphabet
        width = (value - 1).bit_length()
        if width * best[0] < best[1] * g:
            best = (g, width)
    return best


def packed_symbols_size(n: int, alphabet: int) -> int:
    """Bytes :func:`pack_symbols` writes for ``n`` symbols of ``alphabet``."""
    if alphabet < 1:
        raise ValueError("alphabet must be at least 1")
    if alphabet == 1 or n == 0:
        return 0
    if alphabet & (alphabet - 1) == 0:
        return packed_size(n, symbol_bits(alphabet))
    g, width = _radix_group(alphabet)
    return packed_size(-(-n // g) * width, 1)


def pack_symbols(symbols: np.ndarray, alphabet: int) -> bytes:
    """Pack symbols in ``[0, alphabet)`` as tightly as fixed-length codes allow."""
    if alphabet < 1 or alphabet > 1 << 32:
        raise ValueError(f"alphabet must be in 1..2^32, got {alphabet}")
    symbols = np.ascontiguousarray(symbols).ravel()
    if alphabet == 1 or len(symbols) == 0:
        return b""
    if alphabet & (alphabet - 1) == 0:
        return pack_bits(symbols, symbol_bits(alphabet))
    g, width = _radix_group(alphabet)
    n = len(symbols)
    pad = (-n) % g
    s = symbols.astype(np.uint64, copy=False)
    if pad:
        s = np.concatenate([s, np.zeros(pad, np.uint64)])
    s = s.reshape(-1, g)
    value = s[:, g - 1].copy()
    base = np.uint64(alphabet)
    for j in range(g - 2, -1, -1):
        value *= base
        value += s[:, j]
    return _pack_wide(value, width)


def unpack_symbols(data: bytes | memoryview, alphabet: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_symbols`; rejects a wrong length or a symbol out of range."""
    if alphabet < 1 or alphabet > 1 << 32:
        raise PayloadError(f"alphabet size {alphabet} out of range")
    expected = packed_symbols_size(n, alphabet)
    if len(data) != expected:
        raise PayloadError(f"packed symbols: expected {expected} bytes for {n} symbols of {alphabet}, got {len(data)}")
    if alphabet == 1 or n == 0:
        return np.zeros(n, np.uint8)
    if alphabet & (alphabet - 1) == 0:
        return unpack_bits(data, symbol_bits(alphabet), n)
    g, width = _radix_group(alphabet)
    groups = -(-n // g)
    value = _unpack_wide(np.frombuffer(data, np.uint8), width, groups)
    if g * math.log2(alphabet) < 64 and bool((value >= np.uint64(alphabet**g)).any()):
        raise PayloadError(f"packed symbols: a group exceeds {alphabet}^{g}")
    out = np.empty((groups, g), np.uint64)
    base = np.uint64(alphabet)
    for j in range(g):
        out[:, j] = value % base
        value //= base
    out = out.ravel()
    if bool(out[n:].any()):
        raise PayloadError("packed symbols: padding symbols are not zero")
    dtype = np.uint8 if alphabet <= 256 else np.uint16 if alphabet <= 65536 else np.uint32
    return out[:n].astype(dtype)


def _pack_wide(values: np.ndarray, width: int) -> bytes:
    """Fixed-width packing of uint64 values, width 1..64, :func:`pack_bits` layout."""
    return _pack_grouped(values, width)


def _unpack_wide(buf: np.ndarray, width: int, n: int) -> np.ndarray:
    if packed_size(n * width, 1) != len(buf):
        raise PayloadError(f"packed values: expected {packed_size(n * width, 1)} bytes, got {len(buf)}")
    if n * width % 8 and buf[-1] >> np.uint8(n * width % 8):
        raise PayloadError("packed values: padding bits are not zero")
    return _unpack_grouped(buf, width, n).astype(np.uint64, copy=False)


# -- Golomb-Rice codes --------------------------------------------------------


def rice_parameter(values: np.ndarray) -> int:
    """A good Rice parameter for geometric-like ``values`` (from their mean)."""
    if len(values) == 0:
        return 0
    mean = float(np.mean(values, dtype=np.float64))
    return max(0, min(62, int(math.floor(math.log2(mean * math.log(2) + 1e-12))) if mean >= 1 else 0))


def rice_size(values: np.ndarray, r: int) -> int:
    """Bytes :func:`rice_encode` writes."""
    q = (np.asarray(values, dtype=np.uint64) >> np.uint64(r)).sum(dtype=np.uint64)
    n = len(values)
    return packed_size(int(q) + n, 1) + packed_size(n * r, 1)


def rice_encode(values: np.ndarray, r: int) -> bytes:
    """Golomb-Rice code of non-negative integers with parameter ``r``: a unary
    stream (``v >> r`` ones then a zero per value, byte-padded) followed by the
    remainders (``r`` bits each, :func:`pack_bits` order, byte-padded)."""
    if not 0 <= r <= 62:
        raise ValueError(f"Rice parameter must be in 0..62, got {r}")
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    n = len(v)
    q = (v >> np.uint64(r)).astype(np.int64)
    ends = np.cumsum(q + 1)  # position after each terminating zero
    total = int(ends[-1]) if n else 0
    unary = np.ones(total, np.uint8)
    if n:
        unary[ends - 1] = 0
    out = np.packbits(unary, bitorder="little").tobytes()
    if r:
        rem = v & np.uint64((1 << r) - 1)
        out += _pack_wide(rem, r)
    return out


def rice_decode(data: bytes | memoryview, n: int, r: int, max_value: int) -> tuple[np.ndarray, int]:
    """Decode ``n`` Rice-coded values from the front of ``data``.

    Returns the values (int64) and the bytes consumed. Raises
    :class:`PayloadError` when the data ends early, a padding bit is set, or a
    value exceeds ``max_value``.
    """
    if not 0 <= r <= 62:
        raise PayloadError(f"Rice parameter {r} out of range 0..62")
    if n == 0:
        return np.zeros(0, np.int64), 0
    buf = np.frombuffer(data, np.uint8)
    bits = np.unpackbits(buf, bitorder="little")  # 8x the payload, never more
    zeros = np.flatnonzero(bits == 0)
    if len(zeros) < n:
        raise PayloadError(f"Rice code: {n} values expected, the data ends after {len(zeros)}")
    ends = zeros[:n]
    last = int(ends[-1])
    unary_bytes = last // 8 + 1
    if bool(bits[last + 1 : 8 * unary_bytes].any()):
        raise PayloadError("Rice code: padding bits after the unary stream are not zero")
    q = np.diff(ends, prepend=-1) - 1
    if int(q.max()) > (max_value >> r):
        raise PayloadError(f"Rice code: a value exceeds {max_value}")
    rem_bytes = packed_size(n * r, 1)
    if unary_bytes + rem_bytes > len(buf):
        raise PayloadError(
            f"Rice code: remainders need {rem_bytes} bytes after {unary_bytes}, {len(buf) - unary_bytes} left"
        )
    values = q.astype(np.int64)
    if r:
        raw = data[unary_bytes : unary_bytes + rem_bytes]
        rem = _unpack_wide(np.frombuffer(raw, np.uint8), r, n).astype(np.int64)
        values = (values << r) | rem
        if int(values.max()) > max_value:
            raise PayloadError(f"Rice code: a value exceeds {max_value}")
    return values, unary_bytes + rem_bytes
