"""What a mask is: the modulus, who masks with whom, the keys and the PRG.

Secure aggregation (:mod:`fedzip.privacy.secagg`) hides a client's integer
codes ``x`` as ``y = x + masks mod 2^m``. This module holds the pieces both
sides compute alike.

**Modulus.** A tensor whose codec sends ``b``-bit codes is summed in
``Z_{2^m}`` with ``m = sum_bits(b, n) = b + ceil(log2 n)`` for the round's
cohort ``n``: the sum of up to ``n`` codes, each ``<= 2^b − 1``, is below
``2^m`` (checked, :func:`modulus_bits`), so reducing mod ``2^m`` loses
nothing; a masked input costs ``m`` bits per coordinate instead of ``b``.
``m <= 32`` (masks are 32-bit words): ``b = 8`` allows cohorts up to ``2^24``.

**Graph.** SecAgg masks every pair of clients; SecAgg+ (Bell et al., CCS
2020, §3) only the edges of a sparse random graph, here the Harary graph
``H(k, n)`` (a ring where each client is joined to the ``k/2`` nearest on
either side) with positions assigned by public randomness keyed by (seed,
round): :func:`neighbour_graph`.

**PRG.** A mask is the ChaCha20 key stream of a 32-byte key (nonce: the
tensor's rank by name), read as 32-bit words mod ``2^m``; ``2^m`` divides
``2^32``, so masks are exactly uniform (:func:`expand_mask`). Keys come from
HKDF-SHA256 over an X25519 agreement (pairwise masks, share encryption) or
over a client's seed (self masks): :func:`kdf`. Every primitive is the
``cryptography`` package's.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedzip.codecs import Codec, CodecPolicy
from fedzip.codecs.summable import SummableCodec, sum_bits
from fedzip.errors import ConfigError, PayloadError
from fedzip.seeding import numpy_rng

#: masks are read from the PRG as 32-bit words, so the modulus is at most 2^32
MAX_MODULUS_BITS = 32
#: domain separation for every key derived here
LABEL = b"fedzip/secagg/v1/"


def check_policy(policy: CodecPolicy) -> None:
    """Every codec the policy may pick must send integer codes that add, of a known width."""
    for c in policy.codecs():
        if not isinstance(c, SummableCodec):
            raise ConfigError(f"secure aggregation sums integer codes: codec {type(c).__name__} is not a "
                              "SummableCodec (use SharedScaleQuantization for every tensor, threshold 0)")
        codec_bits(c)


def codec_bits(codec: Codec) -> int:
    bits = getattr(codec, "bits", None)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_MODULUS_BITS:
        raise ConfigError(f"secure aggregation needs the code width: {type(codec).__name__}.bits must be an "
                          f"integer in 1..{MAX_MODULUS_BITS}")
    return bits


def modulus_bits(codec: Codec, cohort: int) -> int:
    """``m``: the sum of ``cohort`` codes of the codec's ``b`` bits is summed mod ``2^m``.

    ``m = sum_bits(b, n)``; the largest possible sum, ``n · (2^b − 1)``, must be
    below ``2^m``, so nothing wraps. A codec with ``modular = True`` codes in
    ``Z_{2^b}`` and means its sum mod ``2^b`` (distributed DP's modular
    clipping, :mod:`fedzip.privacy.ddp`): then ``m = b``."""
    b = codec_bits(codec)
    if getattr(codec, "modular", False) is True:
        return b
    m = sum_bits(b, cohort)
    if cohort * (2**b - 1) >= 2**m:  # never, by sum_bits' construction: the guard says why m suffices
        raise ConfigError(f"{cohort} codes of {b} bits overflow Z_2^{m}")
    if m > MAX_MODULUS_BITS:
        raise ConfigError(f"secure aggregation of {cohort} clients' {b}-bit codes needs {m}-bit sums, at most "
                          f"{MAX_MODULUS_BITS}: at most {2 ** (MAX_MODULUS_BITS - b)} clients per round")
    return m


def neighbour_graph(
    cohort: int, neighbours: int | None, seed: int, round_num: int,
) -> dict[int, tuple[int, ...]]:
    """Each client index (``1..cohort``) → its neighbours' indices.

    SecAgg: everyone else. SecAgg+: the Harary graph ``H(k, n)`` (ring
    positions joined to the ``k/2`` nearest on either side, so every degree is
    exactly ``k`` when ``k < n − 1``) with its positions assigned to clients
    by a permutation keyed by (seed, round): public randomness, the server's
    to draw in the honest-but-curious model."""
    everyone = range(1, cohort + 1)
    if neighbours is None or neighbours >= cohort - 1:
        return {i: tuple(j for j in everyone if j != i) for i in everyone}
    at = [int(i) + 1 for i in numpy_rng(seed, round_num, "secagg/graph").permutation(cohort)]
    half = neighbours // 2
    return {at[p]: tuple(sorted(at[(p + d) % cohort] for d in range(-half, half + 1) if d))
            for p in range(cohort)}


def kdf(secret: bytes, purpose: str, round_num: int) -> bytes:
    """A 32-byte key for ``purpose`` in this round from key-agreement output or a seed."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=LABEL + f"{purpose}/{round_num}".encode()).derive(secret)


def device_secret(seed: int, round_num: int, client_id: str, purpose: str) -> bytes:
    """32 bytes that only the client would hold (``os.urandom`` on a device):
    here keyed by (seed, round, client, purpose), so the client regenerates
    them between phases and a run repeats (see "what the simulation does")."""
    info = repr((round_num, client_id, purpose)).encode()
    hkdf = HKDF(hashes.SHA256(), 32, salt=LABEL + b"simulated-device", info=info)
    return hkdf.derive(str(int(seed)).encode())


def expand_mask(key: bytes, tensor: int, numel: int, bits: int) -> np.ndarray:
    """``numel`` uniform elements of ``Z_{2^bits}`` (uint64): the ChaCha20 key
    stream of ``key`` (nonce: the tensor's rank) as little-endian 32-bit
    words mod ``2^bits``; ``2^bits`` divides ``2^32``, so there is no bias."""
    nonce = struct.pack("<IQI", 0, tensor, 0)  # cryptography's ChaCha20: counter u32 | 96-bit nonce
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(4 * numel))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint64) & np.uint64((1 << bits) - 1)


def public_key(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise PayloadError(f"secure aggregation: not an X25519 public key: {e}") from None


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(public_key(public))
    except ValueError as e:  # a low-order point: an all-zero shared secret
        raise PayloadError(f"secure aggregation: key agreement failed: {e}") from None


def share_nonce(sender: int, recipient: int) -> bytes:
    # the channel key is the same both ways (X25519 is symmetric): the ordered pair keeps nonces unique
    return struct.pack("<II4x", sender, recipient)
