"""check_compressor catches each way a codec can break the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedzip.codecs import Codec, Float32
from fedzip.codecs.base import check_finite, numel_of
from fedzip.errors import PayloadError
from fedzip.testing import (
    ContractReport,
    check_bits_match_bytes,
    check_compressor,
    check_deterministic_given_rng,
    check_hostile_bytes,
    check_large_values,
    check_rejects_non_finite,
    check_round_trip_shape,
    check_stateful_replay,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16_bytes(x):
    return x.detach().cpu().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


class Half(Codec):
    """A correct codec: bfloat16 values (unbiased=False: rounding is deterministic)."""

    tag = "half"

    def encode(self, x, rng):
        check_finite(x)
        return _bf16_bytes(x)

    def decode(self, data, shape):
        if len(data) != 2 * numel_of(shape):
            raise PayloadError(f"half: expected {2 * numel_of(shape)} bytes, got {len(data)}")
        raw = torch.from_numpy(np.frombuffer(data, "<i2").astype(np.int16))
        out = raw.view(torch.bfloat16).to(torch.float32)
        if not torch.isfinite(out).all():
            raise PayloadError("half: non-finite values")
        return out.reshape(shape)


class Lenient(Half):
    """Ignores trailing bytes: its bits are not 8 x its payload."""

    def decode(self, data, shape):
        return super().decode(bytes(data)[: 2 * numel_of(shape)], shape)


class Noisy(Half):
    """Uses global randomness instead of the generator: not deterministic."""

    def encode(self, x, rng):
        return super().encode(x + 1e-3 * torch.randn(x.shape), rng)


class Biased(Float32):
    """Claims unbiasedness and shrinks by 10% half the time."""

    tag = "biased"
    unbiased = True

    def encode(self, x, rng):
        shrink = 0.9 if torch.rand((), generator=rng) < 0.5 else 1.0
        return super().encode(x * shrink, rng)


class TakesNaN(Half):
    def encode(self, x, rng):
        return _bf16_bytes(x)


class WrongDtype(Half):
    def decode(self, data, shape):
        return super().decode(data, shape).double()


class Fragile(Half):
    """Raises ValueError (not PayloadError) on bytes it cannot parse."""

    def decode(self, data, shape):
        np.frombuffer(data, "<f2")  # ValueError on an odd length
        return super().decode(data, shape)


class Overflows(Half):
    """float16 overflows above 65504: 1e30 becomes Inf, which it zeroes."""

    def encode(self, x, rng):
        check_finite(x)
        return x.detach().cpu().reshape(-1).to(torch.float16).numpy().astype("<f2").tobytes()

    def decode(self, data, shape):
        if len(data) != 2 * numel_of(shape):
            raise PayloadError("wrong length")
        arr = np.frombuffer(data, "<f2").astype(np.float32)
        return torch.from_numpy(np.nan_to_num(arr, posinf=0.0, neginf=0.0)).reshape(shape)


class Stateful(Half):
    """Keeps a counter it uses in the bytes: fine, and replays deterministically."""

    def init_client_state(self, shape):
        return {"round": 0}

    def encode_stateful(self, x, rng, state):
        return self.encode(x, rng), {"round": state["round"] + 1}


class LeakyState(Stateful):
    """State shared through the object, not the state value: replays differ."""

    calls = 0

    def encode_stateful(self, x, rng, state):
        LeakyState.calls += 1
        return self.encode(x * (1 + LeakyState.calls * 1e-2), rng), state


def test_a_correct_codec_passes_and_reports():
    report = check_compressor(Half())
    assert isinstance(report, ContractReport)
    assert report.bits_per_value == 16.0 and report.nmse < 1e-5 and report.bias_statistic is None
    assert "exact payload length" in report.checks and "half" in str(report)
    assert "stateful rounds" in check_compressor(Stateful()).checks


def test_unbiasedness_is_measured_where_claimed():
    report = check_compressor(Float32(), trials=20)
    assert "unbiased" in report.checks


@pytest.mark.parametrize(
    "codec,message",
    [
        (Lenient(), "trailing"),
        (Noisy(), "not deterministic"),
        (Biased(), "claims to be unbiased"),
        (TakesNaN(), "NonFiniteUpdateError"),
        (WrongDtype(), "expected torch.float32"),
        (Fragile(), "raised ValueError"),
        (Overflows(), "1e\\+30: decoded to all zeros"),
        (LeakyState(), "encode_stateful is not deterministic"),
    ],
)
def test_broken_codecs_are_caught_with_a_clear_message(codec, message):
    with pytest.raises(AssertionError, match=message):
        check_compressor(codec, trials=60)


def test_the_unbiasedness_claim_can_be_overridden():
    check_compressor(Biased(), unbiased=False, trials=20)


def _seven():
    return torch.randn(7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "check,broken,message",
    [
        (lambda c: check_bits_match_bytes(c, _seven()), Lenient(), "one trailing zero byte: decode accepted it"),
        (lambda c: check_deterministic_given_rng(c, _seven()), Noisy(), "not deterministic"),
        (lambda c: check_round_trip_shape(c, _seven()), WrongDtype(), "expected torch.float32"),
        (lambda c: check_hostile_bytes(c, _seven()), Fragile(), "raised ValueError"),
        (lambda c: check_rejects_non_finite(c), TakesNaN(), "NonFiniteUpdateError"),
        (lambda c: check_large_values(c), Overflows(), "decoded to all zeros"),
        (lambda c: check_stateful_replay(c), LeakyState(), "encode_stateful is not deterministic"),
    ],
)
def test_one_check_alone_fails_on_the_codec_that_breaks_it(check, broken, message):
    check(Half())  # a correct codec passes it
    with pytest.raises(AssertionError, match=message):
        check(broken)


def test_a_broken_codec_fails_only_the_check_it_breaks():
    x = _seven()
    check_round_trip_shape(Lenient(), x)  # ignores trailing bytes, but round-trips
    check_deterministic_given_rng(Lenient(), x)
    with pytest.raises(AssertionError, match="one trailing zero byte"):
        check_bits_match_bytes(Lenient(), x)
