"""The one byte reader: every length checked, errors that name what was read."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedzip.bytereader import Reader
from fedzip.errors import PayloadError


def test_reads_fields_in_order_as_views():
    data = struct.pack("<BIfH", 7, 1000, 2.5, 3) + np.arange(3, dtype="<f4").tobytes() + "né".encode() + b"xy"
    r = Reader(data, "demo")
    assert r.u8("a") == 7 and r.u32("b") == 1000 and r.f32("c", positive=True) == 2.5
    assert r.unpack(struct.Struct("<H"), "d") == (3,)
    assert r.f32_array(3, "e").tolist() == [0.0, 1.0, 2.0]
    assert r.utf8(3, "name") == "né"
    assert r.left == 2 and bytes(r.rest()) == b"xy"
    r.done()


@pytest.mark.parametrize(
    "data,read,message",
    [
        (b"\x01\x02", lambda r: r.u32("k"), "top-k truncated: k needs 4 bytes at offset 0, 2 left"),
        (b"\x01", lambda r: r.take(-1, "body"), "top-k truncated: body needs -1 bytes"),
        (struct.pack("<f", float("nan")), lambda r: r.f32("scale"), "top-k: scale is nan"),
        (struct.pack("<f", -1.0), lambda r: r.f32("scale", positive=True), "expected a finite positive"),
        (struct.pack("<2f", 1.0, float("inf")), lambda r: r.f32_array(2, "norms"), "top-k: norms holds non-finite"),
        (b"\xff\xfe", lambda r: r.utf8(2, "name"), "top-k: name is not valid UTF-8"),
        (b"abc", lambda r: r.done(), "top-k: 3 unexpected trailing bytes"),
    ],
)
def test_malformed_bytes_raise_payload_error_naming_the_field(data, read, message):
    with pytest.raises(PayloadError, match=message):
        read(Reader(data, "top-k"))
