import numpy as np
import pytest

from fedzip.bitpack import pack_bits, unpack_bits
from fedzip.errors import PayloadError
from fedzip.wire import Kind, TensorRecord, bit_account, decode_message, encode_message


def _msg():
    return encode_message(
        Kind.UPDATE,
        {"weight": 12.0, "train/loss_sum": 3.5},
        [TensorRecord("w", "f32", (2, 3), b"\x01" * 24), TensorRecord("b", "f32", (3,), bytes(12))],
    )


def test_round_trip_and_itemized_bits():
    data = _msg()
    m = decode_message(data, expect=Kind.UPDATE)
    assert m.scalars == {"weight": 12.0, "train/loss_sum": 3.5}
    assert [(t.name, t.shape, len(t.body)) for t in m.tensors] == [("w", (2, 3), 24), ("b", (3,), 12)]
    acc = bit_account(m)
    assert acc.total == 8 * len(data)
    assert acc.tensors == 8 * (24 + 12)
    assert acc.scalars == 2 * 64
    assert acc.framing == acc.total - acc.tensors - acc.scalars
    assert acc.framing > 0


@pytest.mark.parametrize("cut", [0, 3, 9, 15, 40, -1])
def test_truncated_messages_are_rejected(cut):
    data = _msg()
    with pytest.raises(PayloadError, match="truncated|magic"):
        decode_message(data[:cut] if cut >= 0 else data[:-1])


def test_trailing_bytes_wrong_magic_version_and_kind():
    data = _msg()
    with pytest.raises(PayloadError, match="trailing"):
        decode_message(data + b"\0")
    with pytest.raises(PayloadError, match="magic"):
        decode_message(b"XXXX" + data[4:])
    with pytest.raises(PayloadError, match="version"):
        decode_message(data[:4] + bytes([9]) + data[5:])
    with pytest.raises(PayloadError, match="expected a BROADCAST"):
        decode_message(data, expect=Kind.BROADCAST)


def test_body_length_larger_than_message_is_rejected_without_allocation():
    data = bytearray(_msg())
    # the first tensor's body length field sits right before its 24-byte body
    idx = bytes(data).index(b"\x01" * 24) - 4
    data[idx : idx + 4] = (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(PayloadError, match="truncated"):
        decode_message(bytes(data))


def test_duplicate_tensor_names_are_rejected():
    data = encode_message(Kind.UPDATE, {}, [TensorRecord("w", "f32", (1,), bytes(4))] * 2)
    with pytest.raises(PayloadError, match="twice"):
        decode_message(data)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_bitpack_round_trip_is_tight(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 1000, 1001):
        codes = rng.integers(0, 2**bits, n)
        packed = pack_bits(codes, bits)
        assert len(packed) == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(packed, bits, n), codes)
    with pytest.raises(PayloadError):
        unpack_bits(packed[:-1], bits, n)
