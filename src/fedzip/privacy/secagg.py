"""Secure aggregation: the server learns the sum of the clients' codes, nothing else.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017, with the sparse neighbour graph of SecAgg+ (Bell, Bonawitz, Gascón,
Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020). It sums the integer codes of a
:class:`~fedzip.codecs.summable.SummableCodec` (``SharedScaleQuantization``:
codes that add), so compression composes with it: the server decodes the sum
of the codes once and never one client's update.

One round, for clients ``u, v`` of the cohort (indices ``1..n``), ``N(u)``
``u``'s neighbours, ``t`` the threshold, all arithmetic in ``Z_{2^m}``::

    0 advertise   u → S   two X25519 public keys: c_u (encrypting shares), s_u (masks)
                  S → u   its index, n, t, its neighbours' indices and public keys
    1 share keys  u       a self-mask seed b_u; Shamir t-of-(|N(u)|+1) shares of b_u
                          and of s_u's private key, one per neighbour and one kept
                  u → S → v   ChaCha20Poly1305(HKDF(X25519(c_u, c_v)); u, v, both shares)
    2 masked      u → S   y_u = x_u + PRG(b_u) + Σ_{v∈N(u), v>u} PRG(s_uv)
                                               − Σ_{v∈N(u), v<u} PRG(s_uv)
    3 unmask      S → v   which of its neighbours sent y (the survivors)
                  v → S   per neighbour u: its share of b_u if u survived, of s_u
                          if u dropped; never both for one client
                  S       b_u for every survivor, s_u for every dropout with a
                          surviving neighbour (t shares each); then
                          Σ y_u − Σ PRG(b_u) ∓ the dropouts' pairwise masks = Σ x_u

``s_uv = HKDF(X25519(s_u, s_v))`` is the same for ``u`` and ``v``, so pairwise
masks cancel in the sum; a dropout's are removed with its reconstructed key;
self masks keep ``y_u`` hiding ``x_u`` when ``u`` is slow rather than gone
(the server cannot hold both of ``u``'s secrets). PRG is the ChaCha20 key
stream, uniform over ``Z_{2^m}``, so ``y_u`` is uniform whatever ``x_u`` is.
The modulus ``m = b + ceil(log2 n)`` for ``b``-bit codes holds the sum of
``n`` codes without wrapping; it, the graph, the keys and the PRG are
:mod:`fedzip.privacy.masking`'s. Shamir sharing (:mod:`fedzip.privacy.shamir`)
is field arithmetic written here; every cryptographic primitive (X25519,
HKDF-SHA256, ChaCha20, ChaCha20Poly1305) is the ``cryptography`` package's.

**SecAgg+.** With ``neighbours = k`` (even) a client masks with and shares
with only its ``k`` neighbours in a random ``k``-regular graph: per-client
cost ``O(k)`` messages and ``O(k · model)`` PRG work instead of ``O(n)``
(SecAgg's complete graph, ``O(n²)`` work in all). Bell et al. show that
``k = O(log n)`` keeps the guarantees below with high probability over the
graph for a given fraction of corrupt and dropped clients; the threshold
then counts shares within a neighbourhood (``t`` of ``k + 1`` holders).

**Threat model.** The server is honest but curious: it follows the protocol
and tries to learn from what it sees. Up to ``t − 1`` holders of a client's
shares may collude with it, and clients may drop at any phase. Then the
server learns the sum of the codes of the clients whose masked input it
received, and nothing else about any one of them; a sum over fewer than
``t`` clients is refused (:class:`~fedzip.errors.RoundFailedError`, and the
round leaves the server state as it was), as is a sum whose secrets have
fewer than ``t`` shares from the clients still answering. Not covered: an
actively malicious server (Bonawitz's consistency-check round and signed
keys are not implemented), malicious clients (a client can send codes out
of range; the decoded sum is range-checked, not each input). In the clear,
as without secure aggregation: the update's scalars (example weight,
training sums, stage reports such as clipping's norm) and tensor groups of
algorithms such as SCAFFOLD. The mean is unweighted (codes add only with
equal weights).

**Clients that hold part of the model** (federated dropout, random-mask and
low-rank updates: :mod:`fedzip.algorithms.space`). Masks cancel only in a
position-by-position sum, so each client sends its update on the model's
coordinates (:class:`~fedzip.algorithms.space.ModelCoordinates`: zeros
where it held nothing, ``B·A`` for low rank), encoded and masked as any
update: its uplink is the whole model's, the price of hiding it in the sum
(its downlink and compute still shrink). The server divides each
coordinate's sum by the number of surviving clients that held it, which it
computes from the layouts alone (seed, round, client id), as it does
without secure aggregation: it learns nothing more than the sum. Two
consequences: a coordinate held by ``h`` surviving clients is the sum of
those ``h`` updates, so there it hides one client's value among ``h``, not
among the cohort (``secagg/fewest_per_coordinate`` reports the smallest ``h``
of a round); and a non-holder's zeros are encoded like any value (with
``SharedScaleQuantization`` a zero rounds to one of the two codes around it,
unbiased), so they add rounding noise to that coordinate's sum.

**What the simulation does on the clients' behalf.** Phases 0, 1 and 3 run
in the server's process: :class:`SecureSum` drives a :class:`SecAggClient`
per client, and only bytes cross between the two (each message is a
:mod:`fedzip.wire` message, counted: ``8 × len``, by phase and direction).
Phase 2 runs where the client trains (:class:`~fedzip.algorithms.client.ClientWork`
calls :func:`mask_update`). A client's secrets (X25519 keys, ``b_u``, the
Shamir coefficients) come from HKDF of the run's seed keyed by (round,
client, purpose), so the same client regenerates them in phase 2 and a run
repeats bit for bit; a deployment draws them from ``os.urandom`` and keeps
them on the device. The server's code never reads them, but in a simulation
whoever holds the seed could: the guarantees above are the protocol's, the
simulation measures its cost and checks its arithmetic.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedzip.aggregators import Accumulator, Aggregate, Aggregator, check_coverage, count_holders
from fedzip.bitpack import pack_bits, unpack_bits
from fedzip.codecs import Codec, CodecPolicy, as_policy
from fedzip.errors import ConfigError, PayloadError, RoundFailedError
from fedzip.privacy import shamir
from fedzip.privacy.masking import (
    LABEL,
    agree,
    check_policy,
    codec_bits,
    device_secret,
    expand_mask,
    kdf,
    modulus_bits,
    neighbour_graph,
    share_nonce,
)
from fedzip.seeding import numpy_rng
from fedzip.wire import Kind, TensorRecord, decode_message, encode_message

#: the codec tag of a masked tensor on the wire
MASKED_TAG = "secagg"
#: the protocol's phases, in order (metric names)
PHASES = ("advertise", "share_keys", "masked_input", "unmask")
#: an encrypted pair of shares: sender u32 | recipient u32 | two shares | AEAD tag
CIPHERTEXT_BYTES = 8 + 2 * shamir.SHARE_BYTES + 16


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation's settings (see the module doc).

    Args:
        threshold: shares that reconstruct a client's secrets, and the fewest
            masked inputs a sum may have: an integer, or a fraction in (0, 1]
            of a client's holders (itself and its neighbours), rounded up.
        neighbours: None for SecAgg's complete graph; an even ``k`` for
            SecAgg+'s ``k``-regular graph (complete when ``k >= n − 1``).
        unmask_dropout: simulation only: the probability that a client that
            sent its masked input is gone before unmasking (keyed by seed,
            round, client), to measure recovery.
    """

    threshold: int | float = 0.5
    neighbours: int | None = None
    unmask_dropout: float = 0.0

    def __post_init__(self) -> None:
        t = self.threshold
        ok = (isinstance(t, int) and not isinstance(t, bool) and t >= 1) or (
            isinstance(t, float) and 0 < t <= 1)
        if not ok:
            raise ConfigError(f"secure aggregation threshold must be an integer >= 1 or a fraction in "
                              f"(0, 1], got {t!r}")
        k = self.neighbours
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 2 or k % 2):
            raise ConfigError(f"SecAgg+ neighbours must be an even integer >= 2 (a Harary graph) or None, "
                              f"got {k!r}")
        d = self.unmask_dropout
        if not (isinstance(d, (int, float)) and 0 <= d < 1):
            raise ConfigError(f"unmask_dropout must be a probability in [0, 1), got {d!r}")

    def shares_needed(self, holders: int) -> int:
        """The threshold for a client whose shares go to ``holders`` clients (itself included)."""
        if isinstance(self.threshold, int):
            t = self.threshold
        else:  # round() first: 0.7 * 10 is 7.000000000000001 in floats
            t = max(1, math.ceil(round(self.threshold * holders, 9)))
        if t > holders:
            raise ConfigError(f"secure aggregation threshold {t} exceeds the {holders} holders of a client's "
                              "shares (the client and its neighbours): lower it or sample more clients")
        return t


def secure_mean(
    codec: Codec | CodecPolicy, threshold: int | float = 0.5, neighbours: int | None = None,
    unmask_dropout: float = 0.0,
) -> Aggregator:
    """The unweighted mean over a summable codec, summed by secure aggregation
    (SecAgg; SecAgg+ with ``neighbours``). Stages wrap it as any mean::

        clipping(secure_mean(SharedScaleQuantization(8, bound=0.1), threshold=0.5), 0.1)
    """
    policy = as_policy(codec)
    check_policy(policy)
    return Aggregator((), policy, weighted=False, secure=SecAggConfig(threshold, neighbours, unmask_dropout))


# --------------------------------------------------------------------------
# Protocol messages: wire messages of named records (bits = 8 × length)
# --------------------------------------------------------------------------

_U32 = ("u32", (), 4)
_KEYS = ("x25519", (2, 32), 1)
_CIPHERTEXTS = ("chacha20poly1305", (CIPHERTEXT_BYTES,), 1)
_SHARES = ("shamir", (shamir.SHARE_BYTES,), 1)


def _u32(values: Sequence[int]) -> bytes:
    return np.asarray(values, dtype="<u4").tobytes()


def _message(kind: Kind, records: Mapping[str, tuple[tuple[str, tuple[int, ...], int], Sequence]],
             scalars: Mapping[str, float] | None = None) -> bytes:
    """``records``: name → (layout, rows); u32 rows are ints, others bytes."""
    out = []
    for name, ((tag, row_shape, _), rows) in records.items():
        body = _u32(rows) if tag == "u32" else b"".join(rows)
        out.append(TensorRecord(name, tag, (len(rows), *row_shape), body))
    return encode_message(kind, scalars or {}, out)


def _read(data: bytes, kind: Kind, layout: Mapping[str, tuple[str, tuple[int, ...], int]],
          scalars: Sequence[str] = ()) -> tuple[dict[str, int], dict[str, list]]:
    """Parse a protocol message without trusting it: exactly ``layout``'s records
    (tag, shape of a row, bytes per element) and ``scalars`` (integers)."""
    msg = decode_message(data, expect=kind)
    got = {t.name: t for t in msg.tensors}
    if set(got) != set(layout) or set(msg.scalars) != set(scalars):
        raise PayloadError(f"secure aggregation: records {sorted(got)} and scalars {sorted(msg.scalars)}, "
                           f"expected {sorted(layout)} and {sorted(scalars)}")
    ints = {}
    for k in scalars:
        v = msg.scalars[k]
        if not (math.isfinite(v) and v == int(v) and 0 <= v < 2**32):
            raise PayloadError(f"secure aggregation: {k} = {v!r} is not an index")
        ints[k] = int(v)
    rows: dict[str, list] = {}
    for name, (tag, row_shape, itemsize) in layout.items():
        t = got[name]
        if t.codec != tag or len(t.shape) != 1 + len(row_shape) or tuple(t.shape[1:]) != row_shape:
            raise PayloadError(f"secure aggregation: record {name!r} is {t.codec} {t.shape}, expected "
                               f"{tag} (n, {', '.join(map(str, row_shape))})")
        width = math.prod(row_shape) * itemsize
        body = bytes(t.body)
        if len(body) != t.shape[0] * width:
            raise PayloadError(f"secure aggregation: record {name!r} has {len(body)} bytes for shape {t.shape}")
        if tag == "u32":
            rows[name] = [int(v) for v in np.frombuffer(body, dtype="<u4")]
        else:
            rows[name] = [body[i * width:(i + 1) * width] for i in range(t.shape[0])]
    return ints, rows


@dataclass(frozen=True)
class RoundView:
    """What a client learns when keys are advertised: its index, the cohort's
    size, its threshold and its neighbours' public keys (encryption, masking)."""

    round: int
    index: int
    cohort: int
    threshold: int
    keys: dict[int, tuple[bytes, bytes]]

    @property
    def neighbours(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    @property
    def holders(self) -> tuple[int, ...]:
        """Who holds a share of this client's secrets: its neighbours and itself."""
        return tuple(sorted((*self.keys, self.index)))

    def to_bytes(self) -> bytes:
        nb = self.neighbours
        return _message(Kind.BROADCAST, {
            "secagg/neighbours": (_U32, nb),
            "secagg/public_keys": (_KEYS, [self.keys[v][0] + self.keys[v][1] for v in nb]),
        }, {"secagg/index": self.index, "secagg/cohort": self.cohort, "secagg/threshold": self.threshold})

    @classmethod
    def from_bytes(cls, data: bytes, round_num: int) -> RoundView:
        ints, rows = _read(data, Kind.BROADCAST, {"secagg/neighbours": _U32, "secagg/public_keys": _KEYS},
                           ("secagg/index", "secagg/cohort", "secagg/threshold"))
        index, n, t = ints["secagg/index"], ints["secagg/cohort"], ints["secagg/threshold"]
        nb = rows["secagg/neighbours"]
        if not 1 <= index <= n or len(set(nb)) != len(nb) or any(not 1 <= v <= n or v == index for v in nb):
            raise PayloadError(f"secure aggregation: neighbours {nb[:5]} of client {index} of {n} are not valid")
        if not 1 <= t <= len(nb) + 1:
            raise PayloadError(f"secure aggregation: threshold {t} for {len(nb) + 1} holders")
        keys = {v: (k[:32], k[32:]) for v, k in zip(nb, rows["secagg/public_keys"], strict=True)}
        return cls(round_num, index, n, t, keys)


# --------------------------------------------------------------------------
# A client's side
# --------------------------------------------------------------------------


class SecAggClient:
    """One client's side of the protocol, and the only holder of its secrets.

    Bytes in, bytes out, in the order of the phases: :meth:`advertise`,
    :meth:`receive_keys`, :meth:`share_keys`, :meth:`receive_shares`,
    :meth:`mask`, :meth:`unmask`."""

    def __init__(self, seed: int, round_num: int, client_id: str) -> None:
        def secret(purpose: str) -> bytes:
            return device_secret(seed, round_num, client_id, purpose)

        self.round = round_num
        self._encryption = X25519PrivateKey.from_private_bytes(secret("encryption key"))
        self._masking = X25519PrivateKey.from_private_bytes(secret("masking key"))
        self._self_seed = secret("self-mask seed")
        self._coefficients = secret("shamir coefficients")
        self.view: RoundView | None = None
        self._inbox = b""

    # phase 0
    def advertise(self) -> bytes:
        keys = self._encryption.public_key().public_bytes_raw() + self._masking.public_key().public_bytes_raw()
        return _message(Kind.UPDATE, {"secagg/public_keys": (_KEYS, [keys])})

    def receive_keys(self, message: bytes) -> None:
        self.view = RoundView.from_bytes(message, self.round)

    # phase 1
    def _shares(self) -> tuple[dict[int, int], dict[int, int]]:
        """Shares of the masking key and of the self-mask seed, one per holder."""
        view = self._require_view()
        t = view.threshold
        coefficients = shamir.random_elements(self._coefficients, 2 * (t - 1))
        key = int.from_bytes(self._masking.private_bytes_raw(), "little")
        seed = int.from_bytes(self._self_seed, "little")
        return (shamir.split(key, view.holders, t, coefficients[: t - 1]),
                shamir.split(seed, view.holders, t, coefficients[t - 1:]))

    def _channel(self, other: int) -> ChaCha20Poly1305:
        view = self._require_view()
        return ChaCha20Poly1305(kdf(agree(self._encryption, view.keys[other][0]), "share encryption", self.round))

    def share_keys(self) -> bytes:
        view = self._require_view()
        key_shares, seed_shares = self._shares()
        ad = LABEL + struct.pack("<Q", self.round)
        cts = []
        for v in view.neighbours:
            plain = (struct.pack("<II", view.index, v) + shamir.to_bytes(key_shares[v])
                     + shamir.to_bytes(seed_shares[v]))
            cts.append(self._channel(v).encrypt(share_nonce(view.index, v), plain, ad))
        return _message(Kind.UPDATE, {"secagg/recipients": (_U32, view.neighbours),
                                      "secagg/shares": (_CIPHERTEXTS, cts)})

    def receive_shares(self, message: bytes) -> None:
        self._inbox = message  # kept, as a device keeps it, until unmasking

    # phase 2
    def mask(self, records: Sequence[TensorRecord], policy: CodecPolicy) -> list[TensorRecord]:
        """The masked input: each tensor's codes plus the self mask plus the
        pairwise masks (added toward larger indices, subtracted toward smaller),
        mod ``2^m``, packed at ``m`` bits. Tensors are ranked by name (the PRG
        nonce), as the server ranks them."""
        view = self._require_view()
        self_key = kdf(self._self_seed, "self mask", self.round)
        pair_keys = {v: kdf(agree(self._masking, view.keys[v][1]), "pairwise mask", self.round)
                     for v in view.neighbours}
        out = []
        for rank, t in enumerate(sorted(records, key=lambda r: r.name)):
            codec = policy.for_tensor(t.name, t.numel)
            m = modulus_bits(codec, view.cohort)
            codes = codec.parse_summand(t.body, t.shape).numpy().ravel()  # this client's own codes
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** codec_bits(codec)):
                raise PayloadError(f"tensor {t.name!r}: codes outside 0..2^{codec.bits} - 1 cannot be summed")
            total = codes.astype(np.uint64) + expand_mask(self_key, rank, t.numel, m)
            for v, key in pair_keys.items():
                p = expand_mask(key, rank, t.numel, m)
                # uint64 wraps mod 2^64, a multiple of 2^m: the final AND reduces correctly
                np.add(total, p, out=total) if v > view.index else np.subtract(total, p, out=total)
            total &= np.uint64((1 << m) - 1)
            out.append(TensorRecord(t.name, MASKED_TAG, t.shape, pack_bits(total, m)))
        return out

    # phase 3
    def unmask(self, request: bytes) -> bytes:
        """Answer the server's list of survivors: per holder ``u`` of a share,
        the share of ``b_u`` if ``u`` survived, of ``u``'s masking key if not."""
        view = self._require_view()
        _, rows = _read(request, Kind.BROADCAST, {"secagg/survivors": _U32})
        survivors = set(rows["secagg/survivors"])
        if not survivors <= set(view.holders):
            raise PayloadError("secure aggregation: survivors outside this client's neighbourhood")
        if len(survivors) < view.threshold:  # Bonawitz: a client aborts below the threshold too
            raise RoundFailedError(f"secure aggregation: {len(survivors)} survivors in client {view.index}'s "
                                   f"neighbourhood, {view.threshold} needed")
        _, inbox = _read(self._inbox, Kind.BROADCAST, {"secagg/senders": _U32, "secagg/shares": _CIPHERTEXTS})
        ad = LABEL + struct.pack("<Q", self.round)
        held: dict[int, tuple[bytes, bytes]] = {}
        for u, ct in zip(inbox["secagg/senders"], inbox["secagg/shares"], strict=True):
            if u not in view.keys or u in held:
                raise PayloadError(f"secure aggregation: a share from {u}, not a neighbour or sent twice")
            try:
                plain = self._channel(u).decrypt(share_nonce(u, view.index), ct, ad)
            except InvalidTag:
                raise PayloadError(f"secure aggregation: the shares from client {u} do not authenticate") from None
            if struct.unpack_from("<II", plain) != (u, view.index):
                raise PayloadError(f"secure aggregation: shares from {u} were addressed to another client")
            held[u] = (plain[8:8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES:])
        key_shares, seed_shares = self._shares()
        held[view.index] = (shamir.to_bytes(key_shares[view.index]), shamir.to_bytes(seed_shares[view.index]))
        seeds = [u for u in sorted(held) if u in survivors]
        keys = [u for u in sorted(held) if u not in survivors]  # disjoint: never both secrets of one client
        return _message(Kind.UPDATE, {
            "secagg/seed_owners": (_U32, seeds), "secagg/seed_shares": (_SHARES, [held[u][1] for u in seeds]),
            "secagg/key_owners": (_U32, keys), "secagg/key_shares": (_SHARES, [held[u][0] for u in keys]),
        })

    def _require_view(self) -> RoundView:
        if self.view is None:
            raise PayloadError("secure aggregation: the client has not received its neighbours' keys")
        return self.view


def mask_update(message: bytes, records: Sequence[TensorRecord], policy: CodecPolicy, seed: int,
                round_num: int, client_id: str) -> list[TensorRecord]:
    """The client's masking step (phase 2), run where it trains: its encoded
    ``records`` masked with the keys of ``message`` (what it received when
    keys were advertised). The client's secrets are regenerated, as a device
    would read them back from its storage."""
    client = SecAggClient(seed, round_num, client_id)
    client.receive_keys(message)
    return client.mask(records, policy)


# --------------------------------------------------------------------------
# The server's side: an accumulator of masked inputs
# --------------------------------------------------------------------------


class SecureSum(Accumulator):
    """The server's side of secure aggregation, as the round's accumulator.

    :meth:`setup` runs the key phases (clients simulated, see the module doc)
    and returns the round's tasks, each carrying that client's keys;
    :meth:`fold_masked` adds a masked input mod ``2^m`` (no codec is called:
    masked codes are uniform noise); :meth:`unmask` removes the masks;
    :meth:`result` decodes the sum once. ``messages`` lists every protocol
    message (phase, direction, client, bits); :meth:`measurements` reports
    them per client. ``decoded_individually`` counts individual updates
    decoded: it stays 0 (a test checks it).
    """

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]):
        super().__init__(aggregator, template)
        if aggregator.secure is None:
            raise ConfigError("SecureSum needs an aggregator with secure=SecAggConfig(...)")
        if aggregator.weighted:
            raise ConfigError("secure aggregation sums integer codes: it needs weighted=False")
        check_policy(aggregator.policy)
        self.config: SecAggConfig = aggregator.secure
        self.names = sorted(self.template)
        self.decoded_individually = 0
        self.messages: list[tuple[str, str, str, int]] = []
        self.survivors: set[int] = set()
        self.responders: list[int] = []
        #: per coordinate, how many surviving clients held it (float64); None while each held all
        self.per_coordinate: dict[str, torch.Tensor] | None = None
        self._ready = False
        self._unmasked = False

    def _codec(self, name: str) -> Codec:
        return self.aggregator.policy.for_tensor(name, math.prod(self.template[name][0]))

    def _count(self, phase: str, direction: str, index: int, data: bytes) -> bytes:
        self.messages.append((phase, direction, self.ids[index], 8 * len(data)))
        return data

    # -- phases 0 and 1 -----------------------------------------------------

    def setup(self, seed: int, round_num: int, tasks: Sequence[Any]) -> list[Any]:
        """Advertise and share keys for the round's clients; returns ``tasks``
        with each one's protocol message (``ClientTask.secagg``)."""
        ids = [t.client_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ConfigError("secure aggregation needs distinct client ids in a round")
        n = len(ids)
        self.seed, self.round = int(seed), int(round_num)
        self.ids = dict(enumerate(ids, 1))  # index (a Shamir x-coordinate, never 0) → client id
        self.index = {cid: i for i, cid in self.ids.items()}
        self.graph = neighbour_graph(n, self.config.neighbours, self.seed, self.round)
        self.thresholds = {i: self.config.shares_needed(len(nb) + 1) for i, nb in self.graph.items()}
        self.modulus = {name: modulus_bits(self._codec(name), n) for name in self.names}
        self.sums = {name: np.zeros(math.prod(self.template[name][0]), np.uint64) for name in self.names}

        # the simulation: these objects stand in for the clients' devices; only bytes pass
        self._devices = {i: SecAggClient(self.seed, self.round, cid) for i, cid in self.ids.items()}

        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        for i, device in self._devices.items():
            _, rows = _read(self._count("advertise", "up", i, device.advertise()), Kind.UPDATE,
                            {"secagg/public_keys": _KEYS})
            if len(rows["secagg/public_keys"]) != 1:
                raise PayloadError(f"client {self.ids[i]} advertised {len(rows['secagg/public_keys'])} key pairs")
            key = rows["secagg/public_keys"][0]
            self.public_keys[i] = (key[:32], key[32:])
        views = {}
        for i, device in self._devices.items():
            view = RoundView(self.round, i, n, self.thresholds[i], {v: self.public_keys[v] for v in self.graph[i]})
            views[i] = self._count("advertise", "down", i, view.to_bytes())
            device.receive_keys(views[i])

        inbox: dict[int, list[tuple[int, bytes]]] = {i: [] for i in self._devices}
        for i, device in self._devices.items():
            _, rows = _read(self._count("share_keys", "up", i, device.share_keys()), Kind.UPDATE,
                            {"secagg/recipients": _U32, "secagg/shares": _CIPHERTEXTS})
            if sorted(rows["secagg/recipients"]) != list(self.graph[i]):
                raise PayloadError(f"client {self.ids[i]} sent shares to {rows['secagg/recipients'][:5]}, "
                                   "not to its neighbours")
            for v, ct in zip(rows["secagg/recipients"], rows["secagg/shares"], strict=True):
                inbox[v].append((i, ct))
        for v, device in self._devices.items():
            forward = _message(Kind.BROADCAST, {"secagg/senders": (_U32, [u for u, _ in inbox[v]]),
                                                "secagg/shares": (_CIPHERTEXTS, [c for _, c in inbox[v]])})
            device.receive_shares(self._count("share_keys", "down", v, forward))
        self._ready = True
        return [replace(t, secagg=views[self.index[t.client_id]]) for t in tasks]

    # -- phase 2 --------------------------------------------------------------

    def fold(self, tensors, weight, coverage=None):
        raise ConfigError("a masked input is folded with fold_masked(client_id, tensors): the server "
                          "must know whose masks to remove")

    def fold_masked(self, client_id: str, tensors: Sequence[TensorRecord],
                    coverage: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one client's masked input mod ``2^m`` (validated first, then added whole).
        ``coverage``: the coordinates it held (bool masks by tensor, a tensor left
        out held whole; None: all), which the server derives from the client's
        layout, never from its input: the sum of each coordinate is then
        divided by the number of clients that held it (see the module doc)."""
        if not self._ready or self._unmasked:
            raise PayloadError("secure aggregation: a masked input outside the masked-input phase")
        i = self.index.get(client_id)
        if i is None or i in self.survivors:
            raise PayloadError(f"secure aggregation: a masked input from {client_id!r}, not in the cohort "
                               "or sent twice")
        by_name = {t.name: t for t in tensors}
        if sorted(by_name) != self.names or len(by_name) != len(tensors):
            raise PayloadError(f"masked input: tensors {sorted(by_name)[:5]} do not match the model")
        values = {}
        for name, t in by_name.items():
            shape = self.template[name][0]
            if t.shape != shape or t.codec != MASKED_TAG:
                raise PayloadError(f"tensor {name!r}: {t.codec} {t.shape}, expected {MASKED_TAG} {shape}")
            values[name] = unpack_bits(t.body, self.modulus[name], math.prod(shape))
        check_coverage(coverage, self.template)
        for name, v in values.items():
            self.sums[name] += v.astype(np.uint64)
            self.sums[name] &= np.uint64((1 << self.modulus[name]) - 1)
        self.per_coordinate = count_holders(self.per_coordinate, self.template, self.count, coverage)
        self.survivors.add(i)
        self.count += 1
        self.messages.append(("masked_input", "up", client_id, 8 * sum(len(t.body) for t in tensors)))

    # -- phase 3 --------------------------------------------------------------

    def _gone_before_unmask(self, i: int) -> bool:
        p = self.config.unmask_dropout
        return p > 0 and numpy_rng(self.seed, self.round, self.ids[i], "secagg/unmask dropout").random() < p

    def unmask(self, responding: Iterable[str] | None = None) -> None:
        """Ask every survivor for shares, reconstruct, remove the masks.

        ``responding``: the clients that answer (default: every survivor but
        the simulated ``unmask_dropout``). Raises :class:`RoundFailedError`
        below the threshold."""
        if self._unmasked:
            return
        if not self._ready:
            raise PayloadError("secure aggregation: unmasking before the keys were shared")
        survivors = self.survivors
        fewest = min(self.thresholds.values())
        if len(survivors) < fewest:
            raise RoundFailedError(f"secure aggregation: {len(survivors)} masked inputs, at least {fewest} "
                                   "needed: the server will not unmask a sum of so few clients")
        if responding is None:
            self.responders = [i for i in sorted(survivors) if not self._gone_before_unmask(i)]
        else:
            self.responders = sorted(self.index[c] for c in responding if c in self.index)
            if not set(self.responders) <= survivors:
                raise ConfigError("only clients that sent a masked input can answer the unmasking")
        requests = {}
        for v in sorted(survivors):  # sent to every survivor; those gone never answer
            mine = sorted((set(self.graph[v]) | {v}) & survivors)
            requests[v] = self._count("unmask", "down", v, _message(
                Kind.BROADCAST, {"secagg/survivors": (_U32, mine)}))
        seed_shares: dict[int, dict[int, int]] = {i: {} for i in self.ids}
        key_shares: dict[int, dict[int, int]] = {i: {} for i in self.ids}
        for v in self.responders:
            answer = self._count("unmask", "up", v, self._devices[v].unmask(requests[v]))
            _, rows = _read(answer, Kind.UPDATE, {
                "secagg/seed_owners": _U32, "secagg/seed_shares": _SHARES,
                "secagg/key_owners": _U32, "secagg/key_shares": _SHARES})
            holds = set(self.graph[v]) | {v}
            for owners, shares, store, alive in (("secagg/seed_owners", "secagg/seed_shares", seed_shares, True),
                                                 ("secagg/key_owners", "secagg/key_shares", key_shares, False)):
                for u, share in zip(rows[owners], rows[shares], strict=True):
                    if u not in holds or (u in survivors) != alive:
                        # a self-mask share of a dropout or a key share of a survivor would let
                        # the server unmask an individual input: refused
                        raise PayloadError(f"client {self.ids[v]} sent a share the server must not hold")
                    store[u][v] = shamir.from_bytes(share)

        for u in sorted(survivors):
            seed = self._reconstruct(u, seed_shares[u], "self-mask seed")
            key = kdf(seed, "self mask", self.round)
            for rank, name in enumerate(self.names):
                self.sums[name] -= expand_mask(key, rank, self.sums[name].size, self.modulus[name])
        for u in sorted(set(self.ids) - survivors):
            alive = [v for v in self.graph[u] if v in survivors]
            if not alive:
                continue
            private = X25519PrivateKey.from_private_bytes(self._reconstruct(u, key_shares[u], "masking key"))
            if private.public_key().public_bytes_raw() != self.public_keys[u][1]:
                raise PayloadError(f"secure aggregation: the shares of {self.ids[u]}'s masking key "
                                   "reconstruct a key it did not advertise")
            for v in alive:
                key = kdf(agree(private, self.public_keys[v][1]), "pairwise mask", self.round)
                for rank, name in enumerate(self.names):
                    p = expand_mask(key, rank, self.sums[name].size, self.modulus[name])
                    # v added p toward larger indices and subtracted it toward smaller: undo that
                    np.subtract(self.sums[name], p, out=self.sums[name]) if u > v else \
                        np.add(self.sums[name], p, out=self.sums[name])
        for name in self.names:
            self.sums[name] &= np.uint64((1 << self.modulus[name]) - 1)
        self._unmasked = True

    def _reconstruct(self, u: int, shares: Mapping[int, int], what: str) -> bytes:
        t = self.thresholds[u]
        if len(shares) < t:
            raise RoundFailedError(f"secure aggregation: {len(shares)} shares of client {self.ids[u]}'s {what}, "
                                   f"{t} needed: too many clients gone before unmasking")
        value = shamir.reconstruct(shares, t)
        if value >= 2**256:
            raise PayloadError(f"secure aggregation: the shares of {self.ids[u]}'s {what} are inconsistent")
        return value.to_bytes(32, "little")

    def result(self) -> Aggregate:
        self.unmask()
        sums = {}
        for name in self.names:
            shape = self.template[name][0]
            total = torch.from_numpy(self.sums[name].astype(np.int64))
            # every survivor's codes are in the sum (a non-holder's encode its zeros): decoded for all
            sums[name] = self._codec(name).decode_sum(total, self.count, shape).to(torch.float64)
        weights = dict(self.per_coordinate) if self.per_coordinate is not None else float(self.count)
        return Aggregate(sums, weights, self.count)

    def measurements(self) -> dict[str, float]:
        """Bits by phase (totals up and down; per client: protocol messages over
        the cohort, the masked input over the clients that sent one), the
        modulus, the threshold, the graph's degree and who dropped when."""
        if not self._ready:
            return {}
        n = len(self.ids)
        totals = {(p, d): 0 for p in PHASES for d in ("up", "down")}
        for phase, direction, _, bits in self.messages:
            totals[(phase, direction)] += bits
        out: dict[str, float] = {}
        for (phase, direction), bits in totals.items():
            if phase != "masked_input" or direction == "up":
                out[f"secagg/bits/{phase}/{direction}"] = bits
        for phase in ("advertise", "share_keys", "unmask"):
            out[f"secagg/bits_per_client/{phase}"] = (totals[(phase, "up")] + totals[(phase, "down")]) / n
        out["secagg/bits_per_client/protocol"] = sum(out[f"secagg/bits_per_client/{p}"]
                                                     for p in ("advertise", "share_keys", "unmask"))
        out["secagg/bits_per_client/masked_input"] = totals[("masked_input", "up")] / max(len(self.survivors), 1)
        out["secagg/modulus_bits"] = max(self.modulus.values())
        out["secagg/threshold"] = min(self.thresholds.values())
        out["secagg/neighbours"] = min(len(nb) for nb in self.graph.values())
        out["secagg/survivors"] = len(self.survivors)
        out["secagg/dropped_before_upload"] = n - len(self.survivors)
        out["secagg/dropped_before_unmask"] = len(self.survivors) - len(self.responders) if self._unmasked else 0
        if self.per_coordinate is not None:  # clients held part of the model: the fewest in a coordinate's sum
            held = [c[c > 0] for c in self.per_coordinate.values()]
            out["secagg/fewest_per_coordinate"] = min((float(c.min()) for c in held if c.numel()), default=0.0)
        return out


__all__ = ["MASKED_TAG", "PHASES", "RoundView", "SecAggClient", "SecAggConfig", "SecureSum", "mask_update",
           "modulus_bits", "neighbour_graph", "secure_mean"]
