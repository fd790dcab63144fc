"""Tight bit packing of unsigned integer codes: ``n`` codes of ``b`` bits take
``ceil(n * b / 8)`` bytes, nothing more (TFF packs into 28-bit words and
wastes the rest; here nothing is wasted)."""

from __future__ import annotations

import numpy as np

from fedzip.errors import PayloadError


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy."""
    return (n * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack codes (each ``< 2**bits``) little-endian, LSB first."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    codes = np.ascontiguousarray(codes).ravel()
    if bits == 8:
        return codes.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return codes.astype("<u2", copy=False).tobytes()
    if bits == 32:
        return codes.astype("<u4", copy=False).tobytes()
    if bits in (1, 2, 4):
        per = 8 // bits
        c = codes.astype(np.uint8, copy=False)
        pad = (-len(c)) % per
        if pad:
            c = np.concatenate([c, np.zeros(pad, np.uint8)])
        c = c.reshape(-1, per)
        out = np.zeros(len(c), np.uint8)
        for k in range(per):
            out |= c[:, k] << np.uint8(k * bits)
        return out.tobytes()
    # General width: expand each code to its bits, then pack 8 bits to a byte.
    c = codes.astype(np.uint32, copy=False)
    shifts = np.arange(bits, dtype=np.uint32)
    bitmat = ((c[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; checks that ``data`` has exactly the right length."""
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
    if bits in (1, 2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((len(buf), per), np.uint8)
        for k in range(per):
            out[:, k] = (buf >> np.uint8(k * bits)) & mask
        return out.ravel()[:n]
    bitvec = np.unpackbits(buf, bitorder="little")[: n * bits].reshape(n, bits).astype(np.uint32)
    return (bitvec << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
