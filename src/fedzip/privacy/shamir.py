"""Shamir secret sharing over a prime field (Shamir, "How to Share a Secret",
CACM 1979).

A secret ``s`` is the constant term of a random polynomial ``f`` of degree
``t − 1`` over GF(p); holder ``x`` (a non-zero field element) gets ``f(x)``.
Any ``t`` shares give ``f(0) = s`` by Lagrange interpolation at 0; any
``t − 1`` shares are uniformly distributed whatever ``s`` is (for every
value of ``s`` exactly one polynomial passes through them), so they reveal
nothing.

This is field arithmetic, not a cryptographic primitive, and is written here
by hand: the ``cryptography`` package has no secret sharing. Its only
randomness, the polynomial's coefficients, comes from a ChaCha20 key stream
(:func:`random_elements`), so that a simulated client's shares are a function
of its keyed secrets (see :mod:`fedzip.privacy.secagg`).

:data:`PRIME` is ``2^256 + 297``, the smallest prime above ``2^256``: every
32-byte secret (an X25519 private key, a mask seed) is a field element, and
a share is :data:`SHARE_BYTES` = 33 bytes on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedzip.errors import PayloadError

PRIME = 2**256 + 297
SHARE_BYTES = 33


def split(
    secret: int, holders: Sequence[int], threshold: int, coefficients: Sequence[int], prime: int = PRIME,
) -> dict[int, int]:
    """``holder -> f(holder)`` for ``f(0) = secret`` with the given ``threshold − 1``
    higher coefficients (uniform in GF(prime): :func:`random_elements`)."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in 1..{len(holders)} (the number of holders)")
    if len(coefficients) != threshold - 1:
        raise ValueError(f"a threshold of {threshold} needs {threshold - 1} coefficients, got {len(coefficients)}")
    if not 0 <= secret < prime or any(not 0 <= c < prime for c in coefficients):
        raise ValueError("the secret and the coefficients must be field elements")
    if len(set(holders)) != len(holders) or any(not 0 < x < prime for x in holders):
        raise ValueError("holders must be distinct non-zero field elements")
    poly = [secret, *coefficients]
    out = {}
    for x in holders:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % prime
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], threshold: int, prime: int = PRIME) -> int:
    """``f(0)`` from at least ``threshold`` shares (the first ``threshold`` by
    holder are used). Raises :class:`PayloadError` with fewer."""
    if len(shares) < threshold:
        raise PayloadError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    return secret


def random_elements(key: bytes, count: int, prime: int = PRIME) -> list[int]:
    """``count`` uniform elements of GF(prime) from the ChaCha20 key stream of
    the 32-byte ``key``, by rejection (no modulo bias)."""
    nbits = prime.bit_length()
    nbytes = (nbits + 7) // 8
    top = (1 << nbits) - 1
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    out: list[int] = []
    while len(out) < count:
        v = int.from_bytes(stream.update(bytes(nbytes)), "little") & top
        if v < prime:  # accepted with probability prime / 2^nbits > 1/2
            out.append(v)
    return out


def to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "little")


def from_bytes(data: bytes | memoryview) -> int:
    value = int.from_bytes(bytes(data), "little")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise PayloadError(f"a share is {SHARE_BYTES} bytes below the field's prime")
    return value
