"""Property tests of everything that decodes bytes from the other side.

Random bytes, and valid messages mutated (bit flips, truncation, splices,
length and count fields set to extremes, wrong shapes, codec tags and kinds),
must either raise :class:`PayloadError` or decode to what the receiver
expects: the template's names and shapes, float, finite. Never another
exception type, never a codec asked to decode a shape the model does not have.
Every codec in :mod:`fedzip.codecs` (``registry()`` where it exists, else the
exported classes) is covered. ``benchmarks/fuzz.py`` runs the same mutations
for as long as it is given.
"""

from __future__ import annotations

import inspect
import math
import struct
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedzip
from fedzip.codecs import Codec, CodecPolicy, UniformQuantization
from fedzip.errors import PayloadError
from fedzip.payload import decode_params, encode_params
from fedzip.wire import (
    MAGIC,
    MAX_ELEMENTS,
    VERSION,
    Kind,
    TensorRecord,
    bit_account,
    decode_message,
    encode_message,
    integer_fields,
)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PER_CODEC = settings(FUZZ, max_examples=40)  # x every codec; benchmarks/fuzz.py goes on for longer

TEMPLATE = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "scalar": (1,)}


# --------------------------------------------------------------------------
# The codecs under test
# --------------------------------------------------------------------------


@cache
def codecs() -> dict[str, Codec]:
    """Every codec fedzip ships, at its defaults (``benchmarks/fuzz.py`` also
    tries other bit widths and the wrappers around several inner codecs)."""
    from fedzip import codecs as mod

    reg = getattr(mod, "registry", None)
    factories = dict(reg()) if callable(reg) else {}
    for name in getattr(mod, "__all__", dir(mod)):
        obj = getattr(mod, name, None)
        if isinstance(obj, type) and issubclass(obj, Codec) and not inspect.isabstract(obj) \
                and obj not in factories.values() and obj.tag:
            factories.setdefault(obj.tag, obj)
    out: dict[str, Codec] = {}
    for name, factory in factories.items():
        for kw in ({}, {"fraction": 0.25}, {"inner": UniformQuantization(bits=4)}):
            try:
                out[name] = factory(**kw)
                break
            except (TypeError, ValueError):
                continue  # needs other arguments
    out["uq:bits=3"] = UniformQuantization(bits=3)  # codes that straddle bytes
    out["uq:range"] = UniformQuantization(bits=4, range=(-0.5, 0.5))
    return out


CODEC_NAMES = sorted(codecs())


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = {k: torch.randn(s, generator=g) * 0.1 for k, s in TEMPLATE.items()}
    u["conv.bias"] = torch.full((4,), 0.25)  # constant: min == max
    return u


@cache
def valid_update(name: str) -> bytes:
    """A client's real UPDATE message for ``codec`` through the aggregator's client side."""
    agg = fedzip.mean(codecs()[name])
    records, reports, _ = agg.client_encode(agg.broadcast_scalars(agg.init()), _update(1),
                                            torch.Generator().manual_seed(0))
    return encode_message(Kind.UPDATE, {"weight": 12.0, "train/loss_sum": 3.0, **reports}, records)


@cache
def valid_broadcast(name: str) -> bytes:
    records = encode_params(_update(2), fedzip.codecs.as_policy(codecs()[name]), torch.Generator().manual_seed(0))
    return encode_message(Kind.BROADCAST, {"zeroing/threshold": 3.0}, records)


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------




@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with one to three mutations."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "byte", "field", "truncate", "extend", "delete", "duplicate"]))
        n = len(buf)
        if kind == "flip" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and n:
            buf[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif kind == "field":
            try:
                spots = integer_fields(bytes(buf))
            except (struct.error, IndexError, AssertionError):
                spots = []
            if spots:
                off, size = draw(st.sampled_from(spots))
                top = (1 << (8 * size)) - 1
                value = draw(st.sampled_from([0, 1, 2, top, top - 1, top // 2 + 1]) | st.integers(0, top))
                buf[off : off + size] = value.to_bytes(size, "little")
        elif kind == "truncate":
            del buf[draw(st.integers(0, n)) :]
        elif kind == "extend":
            buf += draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i : i + draw(st.integers(1, 16))]
        elif kind == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            buf[i:i] = buf[i : i + draw(st.integers(1, 64))]
    return bytes(buf)


class Spy(Codec):
    """Wraps a codec and records every shape it is asked to decode."""

    def __init__(self, inner: Codec):
        self.inner = inner
        self.tag = inner.tag
        self.shapes: list[tuple[int, ...]] = []

    def encode(self, x, rng):
        return self.inner.encode(x, rng)

    def decode(self, data, shape):
        self.shapes.append(tuple(shape))
        return self.inner.decode(data, shape)


def _own_payload_error(e: PayloadError) -> None:
    """payload.decode_params turns any exception of a codec into PayloadError, so the
    server is safe either way; the codec contract still wants the codec to raise it."""
    cause = e.__cause__
    assert cause is None or isinstance(cause, PayloadError), f"the codec raised {cause!r}"


def _check_decoded(params):
    assert sorted(params) == sorted(TEMPLATE)
    for k, v in params.items():
        assert tuple(v.shape) == TEMPLATE[k], k
        assert v.is_floating_point() and bool(torch.isfinite(v).all()), k


# --------------------------------------------------------------------------
# The wire format alone
# --------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    try:
        m = decode_message(data)
    except PayloadError:
        return
    assert encode_message(m.kind, m.scalars, m.tensors) == data


@FUZZ
@given(kind=st.integers(0, 255), n_scalars=st.integers(0, 0xFFFF), n_tensors=st.integers(0, 0xFFFF),
       tail=st.binary(max_size=400))
def test_random_bytes_behind_a_valid_header(kind, n_scalars, n_tensors, tail):
    data = struct.pack("<4sBBHH", MAGIC, VERSION, kind, n_scalars, n_tensors) + tail
    try:
        m = decode_message(data)
    except PayloadError:
        return
    assert encode_message(m.kind, m.scalars, m.tensors) == data


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


@FUZZ
@given(
    kind=st.sampled_from(Kind),
    scalars=st.dictionaries(_names, st.floats(allow_nan=True, allow_infinity=True), max_size=6),
    tensors=st.lists(
        st.tuples(_names, st.text(st.characters(max_codepoint=127), min_size=1, max_size=8),
                  st.lists(st.integers(0, 0xFFFFFFFF), max_size=8), st.binary(max_size=64)),
        max_size=5, unique_by=lambda t: t[0]),
)
def test_valid_messages_round_trip_and_account_every_bit(kind, scalars, tensors):
    records = [TensorRecord(n, c, tuple(s), b) for n, c, s, b in tensors]
    try:
        data = encode_message(kind, scalars, records)
    except PayloadError:  # only over-long scalar names, or more elements than a tensor may have
        assert any(len(n.encode()) > 255 for n in scalars) or any(
            math.prod(r.shape) > MAX_ELEMENTS for r in records)
        return
    m = decode_message(data, expect=kind)
    assert encode_message(m.kind, m.scalars, m.tensors) == data
    acc = bit_account(m)
    assert acc.total == 8 * len(data) == acc.framing + acc.scalars + acc.tensors
    assert acc.tensors == 8 * sum(len(b) for *_, b in tensors)


@pytest.mark.parametrize("name", CODEC_NAMES[:1])
@FUZZ
@given(data=st.data())
def test_mutated_messages_at_the_wire(name, data):
    msg = data.draw(mutated(valid_update(name)))
    try:
        m = decode_message(msg)
    except PayloadError:
        return
    assert encode_message(m.kind, m.scalars, m.tensors) == msg


def _raw(shape, body_len, body=b"", n_scalars=0, n_tensors=1):
    """An UPDATE message with one tensor "w", written by hand (encode_message would refuse)."""
    head = struct.pack("<4sBBHH", MAGIC, VERSION, 1, n_scalars, n_tensors)
    return head + struct.pack("<H", 1) + b"w" + b"\x03f32" + bytes([len(shape)]) + \
        struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<I", body_len) + body


def test_declared_sizes_are_checked_before_anything_is_allocated():
    with pytest.raises(PayloadError, match="truncated"):  # claims 4 GiB of body in a few bytes
        decode_message(_raw((4,), 0xFFFFFFFF))
    with pytest.raises(PayloadError, match="exceeds"):  # 2^32 elements
        decode_message(_raw((1 << 16, 1 << 16), 0))
    with pytest.raises(PayloadError, match="truncated"):  # 65,535 scalars and tensors announced
        decode_message(struct.pack("<4sBBHH", MAGIC, VERSION, 1, 0xFFFF, 0xFFFF))
    with pytest.raises(PayloadError, match="exceeds"):
        encode_message(Kind.UPDATE, {}, [TensorRecord("w", "f32", (1 << 16, 1 << 16), b"")])
    empty_tag = _raw((1,), 4, bytes(4)).replace(b"\x03f32", b"\x00")  # found by benchmarks/fuzz.py
    with pytest.raises(PayloadError, match="empty codec tag"):
        decode_message(empty_tag)
    # a shape within bounds but not the model's: refused before the codec sees it
    lying = encode_message(Kind.UPDATE, {"weight": 1.0},
                           [TensorRecord(k, "f32", (1 << 30,), b"") for k in TEMPLATE])
    spy = Spy(fedzip.codecs.Float32())
    with pytest.raises(PayloadError, match="shape"):
        decode_params(decode_message(lying), TEMPLATE, CodecPolicy(spy, 0, spy))
    assert spy.shapes == []


# --------------------------------------------------------------------------
# Codecs, and the server's decode path (StreamingMean)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_every_codec_round_trips_through_the_aggregator(name):
    agg = fedzip.mean(codecs()[name])
    acc = agg.accumulator({k: torch.zeros(s) for k, s in TEMPLATE.items()}, decode_each=True)
    m = decode_message(valid_update(name), expect=Kind.UPDATE)
    _check_decoded(acc.decode_update(m))
    acc.fold_message(m)
    assert acc.count == 1


@pytest.mark.parametrize("name", CODEC_NAMES)
@PER_CODEC
@given(data=st.data())
def test_mutated_updates_raise_payload_error_or_decode_finite(name, data):
    spy = Spy(codecs()[name])
    agg = fedzip.mean(spy)
    acc = agg.accumulator({k: torch.zeros(s) for k, s in TEMPLATE.items()}, decode_each=True)
    msg = data.draw(mutated(valid_update(name)))
    try:
        m = decode_message(msg, expect=Kind.UPDATE)
        update = acc.decode_update(m)
        acc.fold_message(m)
    except PayloadError as e:
        _own_payload_error(e)
    else:
        _check_decoded(update)
        assert acc.count == 1 and math.isfinite(acc.weight_sum)
    assert all(s in TEMPLATE.values() for s in spy.shapes), spy.shapes


@pytest.mark.parametrize("name", CODEC_NAMES)
@PER_CODEC
@given(data=st.data())
def test_mutated_broadcasts_raise_payload_error_or_decode_finite(name, data):
    spy = Spy(codecs()[name])
    msg = data.draw(mutated(valid_broadcast(name)))
    try:
        params = decode_params(decode_message(msg, expect=Kind.BROADCAST), TEMPLATE, fedzip.codecs.as_policy(spy))
    except PayloadError as e:
        _own_payload_error(e)
    else:
        _check_decoded(params)
    assert all(s in TEMPLATE.values() for s in spy.shapes), spy.shapes


@pytest.mark.parametrize("name", CODEC_NAMES)
@PER_CODEC
@given(body=st.binary(max_size=300), shape=st.sampled_from(sorted(set(TEMPLATE.values()))), data=st.data())
def test_codec_decode_of_arbitrary_bodies(name, body, shape, data):
    """The codec contract itself: untrusted bytes give PayloadError or a float
    tensor of the asked shape (finiteness is checked by the caller)."""
    codec = codecs()[name]
    if data.draw(st.booleans()):  # near-valid: a real body of this shape, mutated
        real = codec.encode(torch.randn(shape, generator=torch.Generator().manual_seed(3)),
                            torch.Generator().manual_seed(4))
        body = data.draw(st.sampled_from([real[:-1], real + b"\0", bytes([real[0] ^ 0xFF]) + real[1:] if real else b"x",
                                          real[: len(real) // 2], bytes(len(real))]))
    try:
        out = codec.decode(body, shape)
    except PayloadError:
        return
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.is_floating_point()
