"""Property tests: every decoder, fed random or mutated bytes, raises
PayloadError or returns a finite float32 tensor of the asked shape; and the
packings round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codecs import CODECS

from fedzip.bitpack import (
    pack_bits,
    pack_symbols,
    packed_size,
    packed_symbols_size,
    rice_decode,
    rice_encode,
    unpack_bits,
    unpack_symbols,
)
from fedzip.errors import PayloadError

pytestmark = pytest.mark.usefixtures("one_thread")


FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHAPES = [(1,), (7,), (64,), (5, 13), (2, 3, 4)]


def _accepts_or_rejects(codec, data: bytes, shape) -> None:
    try:
        out = codec.decode(data, shape)
    except PayloadError:
        return
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == tuple(shape)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(data=st.binary(max_size=600), shape=st.sampled_from(SHAPES))
def test_random_bytes(name, data, shape):
    _accepts_or_rejects(CODECS[name], data, shape)


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(-8, 8))
def test_mutated_bytes(name, shape, seed, edits, cut):
    codec = CODECS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    buf = bytearray(codec.encode(x, torch.Generator().manual_seed(seed)))
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    if cut < 0:
        buf = buf[:cut]
    elif cut > 0:
        buf += bytes(range(cut))
    _accepts_or_rejects(codec, bytes(buf), shape)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(bits=st.integers(1, 32), codes=st.lists(st.integers(0, 2**32 - 1), max_size=70))
def test_pack_bits_round_trip(bits, codes):
    arr = np.array([c % (1 << bits) for c in codes], dtype=np.uint64).astype(np.uint32)
    data = pack_bits(arr, bits)
    assert len(data) == packed_size(len(arr), bits)
    assert np.array_equal(unpack_bits(data, bits, len(arr)).astype(np.uint64), arr.astype(np.uint64))
    # reference: bit i of the stream is bit (i % bits) of code i // bits, LSB first
    ref = np.zeros(8 * len(data), np.uint8)
    for i, c in enumerate(arr.tolist()):
        for j in range(bits):
            ref[i * bits + j] = (c >> j) & 1
    assert np.packbits(ref, bitorder="little").tobytes() == data


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(alphabet=st.integers(1, 70_000), raw=st.lists(st.integers(0, 2**31), max_size=60))
def test_pack_symbols_round_trip(alphabet, raw):
    arr = np.array([r % alphabet for r in raw], dtype=np.int64)
    data = pack_symbols(arr, alphabet)
    assert len(data) == packed_symbols_size(len(arr), alphabet)
    assert np.array_equal(unpack_symbols(data, alphabet, len(arr)).astype(np.int64), arr)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(alphabet=st.integers(1, 70_000), n=st.integers(0, 50), data=st.binary(max_size=200))
def test_unpack_symbols_of_garbage(alphabet, n, data):
    try:
        out = unpack_symbols(data, alphabet, n)
    except PayloadError:
        return
    assert len(out) == n and (len(out) == 0 or int(out.max()) < alphabet)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(values=st.lists(st.integers(0, 10_000), max_size=60), r=st.integers(0, 14), tail=st.binary(max_size=8))
def test_rice_round_trip(values, r, tail):
    arr = np.array(values, dtype=np.uint64)
    data = rice_encode(arr, r)
    out, used = rice_decode(data + tail, len(arr), r, 10_000)
    assert used == len(data) and np.array_equal(out, arr.astype(np.int64))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=100), n=st.integers(0, 40), r=st.integers(0, 70), bound=st.integers(0, 10**6))
def test_rice_decode_of_garbage(data, n, r, bound):
    try:
        out, used = rice_decode(data, n, r, bound)
    except PayloadError:
        return
    assert len(out) == n and used <= len(data) and (n == 0 or (0 <= out.min() and out.max() <= bound))
