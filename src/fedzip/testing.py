"""The codec contract as a test anyone can run on their own codec.

    from fedzip.testing import check_compressor
    report = check_compressor(MyCodec())   # raises AssertionError naming what failed
    print(report)

:func:`check_compressor` checks, on Gaussian tensors of odd sizes (1, 7,
1000, 1025 and a 2-D shape):

* shape and dtype: ``decode`` returns a float32 CPU tensor of the shape;
* exact bytes: ``encode`` returns ``bytes`` and ``decode`` consumes all of
  them: the payload with a byte more or a byte less raises
  :class:`~fedzip.errors.PayloadError` (so bits = 8 x payload length);
* determinism: the same seed gives the same bytes;
* unbiasedness where claimed: over ``trials`` encodings with different
  seeds, the squared norm of the mean error is compared with what the
  variance alone explains (``T ||mean error||^2 / mean sample variance``,
  close to 1 when unbiased); it must stay below ``1 + z * sqrt(2 / d_eff)``
  (a one-sided test at ``z`` standard deviations, ``d_eff`` the effective
  degrees of freedom), ``z = 5`` by default;
* edge inputs: zeros, a constant, a single element, values of 1e30
  (finite output, error in proportion) and mixed magnitudes;
* non-finite input: NaN, +Inf or -Inf makes ``encode`` (and
  ``encode_stateful``) raise :class:`~fedzip.errors.NonFiniteUpdateError`;
* hostile bytes: empty, truncated, extended, random and bit-flipped payloads
  make ``decode`` raise ``PayloadError`` or return a finite tensor of the
  right shape, never another exception;
* per-client state, when the codec has one: a few rounds of
  ``encode_stateful`` decode, and replay to the same bytes;
* CUDA input, when a GPU is present: encodes and decodes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from fedzip.codecs.base import Codec
from fedzip.errors import NonFiniteUpdateError, PayloadError

__all__ = ["ContractReport", "check_compressor"]


@dataclass
class ContractReport:
    """What :func:`check_compressor` measured (every check passed if you hold one)."""

    codec: str
    tag: str
    unbiased: bool
    bits_per_value: float  # 8 * len(bytes) / d for a Gaussian vector of d = 1000
    nmse: float  # ||x_hat - x||^2 / ||x||^2 on that vector (mean over the trials)
    bias_statistic: float | None = None  # ~1 when unbiased (see module doc), None if not tested
    bias_threshold: float | None = None
    checks: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        bias = (
            f", bias statistic {self.bias_statistic:.3f} (< {self.bias_threshold:.3f})"
            if self.bias_statistic is not None
            else ""
        )
        return (
            f"{self.codec} [{self.tag}]: {len(self.checks)} checks passed; "
            f"{self.bits_per_value:.3f} bits/value, NMSE {self.nmse:.4g}{bias}"
        )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _decode(codec: Codec, data: bytes, shape: tuple[int, ...], what: str) -> torch.Tensor:
    try:
        out = codec.decode(data, shape)
    except PayloadError as e:
        raise AssertionError(f"{what}: decode rejected the codec's own bytes: {e}") from e
    _check_tensor(out, shape, what)
    return out


def _check_tensor(out: Any, shape: tuple[int, ...], what: str) -> None:
    assert isinstance(out, torch.Tensor), f"{what}: decode returned {type(out).__name__}, not a Tensor"
    assert tuple(out.shape) == tuple(shape), f"{what}: decode returned shape {tuple(out.shape)}, expected {shape}"
    assert out.dtype == torch.float32, f"{what}: decode returned {out.dtype}, expected torch.float32"
    assert out.device.type == "cpu", f"{what}: decode returned a tensor on {out.device}, expected the CPU"
    assert bool(torch.isfinite(out).all()), f"{what}: decode returned NaN or Inf"


def _encode(codec: Codec, x: torch.Tensor, seed: int, what: str) -> bytes:
    data = codec.encode(x, _gen(seed))
    assert isinstance(data, bytes), f"{what}: encode returned {type(data).__name__}, expected bytes"
    return data


def _nmse(out: torch.Tensor, x: torch.Tensor) -> float:
    x64 = x.detach().cpu().double()
    den = float(x64.square().sum())
    num = float((out.double() - x64).square().sum())
    return num / den if den > 0 else num


def _hostile(codec: Codec, data: bytes, shape: tuple[int, ...], what: str) -> None:
    """``data`` must raise PayloadError or decode to a finite tensor of ``shape``."""
    try:
        out = codec.decode(data, shape)
    except PayloadError:
        return
    except Exception as e:  # noqa: BLE001 - the point is to name any other exception
        raise AssertionError(
            f"{what}: decode raised {type(e).__name__} ({e}) on hostile bytes; only PayloadError is allowed"
        ) from e
    _check_tensor(out, shape, f"{what} (hostile bytes accepted)")


def _expect_payload_error(codec: Codec, data: bytes, shape: tuple[int, ...], what: str) -> None:
    try:
        codec.decode(data, shape)
    except PayloadError:
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{what}: decode raised {type(e).__name__} ({e}), expected PayloadError") from e
    raise AssertionError(f"{what}: decode accepted it; bits must equal 8 x the payload length")


def check_compressor(
    codec: Codec,
    unbiased: bool | None = None,
    *,
    sizes: tuple[int, ...] = (1, 7, 1000, 1025),
    shape_2d: tuple[int, int] = (33, 31),
    trials: int = 200,
    z: float = 5.0,
    unbiased_size: int = 1000,
    hostile: int = 24,
    rounds: int = 3,
    seed: int = 0,
) -> ContractReport:
    """Check ``codec`` against the codec contract (see module doc).

    Args:
        codec: the codec under test.
        unbiased: whether to test unbiasedness (default ``codec.unbiased``).
        sizes: 1-D sizes to run every check on; ``shape_2d`` a 2-D shape.
        trials: encodings for the unbiasedness test and the NMSE.
        z: the unbiasedness tolerance, in standard deviations of the statistic.
        unbiased_size: the vector length of the unbiasedness test.
        hostile: random and bit-flipped payloads tried per shape.
        rounds: rounds of ``encode_stateful`` for stateful codecs.
        seed: the base seed; everything is deterministic given it.

    Returns:
        A :class:`ContractReport`. Raises AssertionError with a message naming
        the failed check otherwise.
    """
    name = repr(codec)
    assert isinstance(codec, Codec), f"{name} is not a fedzip Codec"
    tag = codec.tag
    assert isinstance(tag, str) and 0 < len(tag) <= 255 and tag.isascii(), f"{name}: tag {tag!r} must be 1-255 ASCII chars"
    claims = bool(codec.unbiased) if unbiased is None else bool(unbiased)
    checks: list[str] = []
    g = _gen(seed)
    prng = random.Random(seed)

    shapes = [(d,) for d in sizes] + [tuple(shape_2d)]
    for shape in shapes:
        what = f"{name} on shape {shape}"
        x = torch.randn(shape, generator=g)
        data = _encode(codec, x, seed + 1, what)
        _decode(codec, data, shape, what)
        again = _encode(codec, x, seed + 1, what)
        assert again == data, f"{what}: the same seed gave different bytes (not deterministic)"
        out1, out2 = codec.decode(data, shape), codec.decode(data, shape)
        assert torch.equal(out1, out2), f"{what}: decoding the same bytes twice differs"
        # exact payload: one byte more or less is an error
        _expect_payload_error(codec, data + b"\x00", shape, f"{what}, one trailing zero byte")
        _expect_payload_error(codec, data + bytes([prng.randrange(1, 256)]) * 8, shape, f"{what}, 8 trailing bytes")
        if data:
            _expect_payload_error(codec, data[:-1], shape, f"{what}, last byte cut")
        # hostile bytes
        _hostile(codec, b"", shape, f"{what}, empty payload")
        for i in range(hostile):
            if i % 2 == 0 and data:
                buf = bytearray(data)
                for _ in range(1 + i % 3):
                    buf[prng.randrange(len(buf))] ^= 1 << prng.randrange(8)
                _hostile(codec, bytes(buf), shape, f"{what}, bit-flipped payload")
            else:
                n = prng.choice([1, 3, 8, len(data), len(data) + 4, prng.randrange(2 * len(data) + 9)])
                _hostile(codec, prng.randbytes(n), shape, f"{what}, {n} random bytes")
        if data:
            for cut in sorted({len(data) // 2, 1, max(0, len(data) - 4)}):
                _hostile(codec, data[:cut], shape, f"{what}, cut to {cut} bytes")
    checks += ["shape and dtype", "exact payload length", "determinism", "hostile bytes"]

    # edge inputs
    edge = {
        "zeros": torch.zeros(1000),
        "zeros of one": torch.zeros(1),
        "a constant": torch.full((1000,), 3.7),
        "a single element": torch.tensor([-2.5]),
        "mixed magnitudes": torch.cat([torch.randn(999, generator=g) * 1e-3, torch.tensor([1e4])]),
    }
    for label, x in edge.items():
        data = _encode(codec, x, seed + 2, f"{name} on {label}")
        _decode(codec, data, tuple(x.shape), f"{name} on {label}")
    unit = torch.randn(1000, generator=g)
    for big in (1e30, -1e30):
        what = f"{name} on values of {big:g}"
        data = _encode(codec, unit * abs(big), seed + 3, what)
        out = _decode(codec, data, (1000,), what)
        ref = _nmse(codec.decode(_encode(codec, unit, seed + 3, what), (1000,)), unit)
        got = _nmse(out, unit * abs(big))
        assert float(out.abs().max()) > 0, f"{what}: decoded to all zeros (an overflow flushed to zero?)"
        assert got <= 4 * ref + 1.0, f"{what}: NMSE {got:.4g} where the same vector at unit scale gives {ref:.4g}"
        data = _encode(codec, torch.full((7,), big), seed + 3, what)
        _decode(codec, data, (7,), what + " (constant)")
    checks += ["zeros", "constants", "single element", "large values 1e30"]

    # non-finite input
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(100, generator=g)
        x[37] = bad
        try:
            codec.encode(x, _gen(seed))
        except NonFiniteUpdateError:
            pass
        else:
            raise AssertionError(f"{name}: encode accepted {bad} without raising NonFiniteUpdateError")
        state = codec.init_client_state((100,))
        if state is not None:
            try:
                codec.encode_stateful(x, _gen(seed), state)
            except NonFiniteUpdateError:
                pass
            else:
                raise AssertionError(f"{name}: encode_stateful accepted {bad} without raising NonFiniteUpdateError")
    checks.append("NaN/Inf rejected")

    # statistics: bits, NMSE and (where claimed) unbiasedness
    x = torch.randn(unbiased_size, generator=g)
    outs = torch.empty(trials, unbiased_size, dtype=torch.float64)
    nbytes = 0
    for t in range(trials):
        data = _encode(codec, x, seed + 1000 + t, f"{name} (trial {t})")
        nbytes = len(data)
        outs[t] = codec.decode(data, (unbiased_size,)).double()
    x64 = x.double()
    nmse = float((outs - x64).square().sum(1).mean() / x64.square().sum())
    stat = thr = None
    if claims:
        mean_err = outs.mean(0) - x64
        var = outs.var(0, unbiased=True) if trials > 1 else torch.zeros_like(x64)
        total_var = float(var.sum())
        rel_bias = math.sqrt(float(mean_err.square().sum()) / max(float(x64.square().sum()), 1e-300))
        if rel_bias > 1e-6:  # below that, float32 rounding: nothing to test
            assert total_var > 0, f"{name}: claims to be unbiased, but its deterministic output is off by {rel_bias:.3g} (relative)"
            d_eff = total_var**2 / float(var.square().sum())
            stat = trials * float(mean_err.square().sum()) / total_var
            thr = 1.0 + z * math.sqrt(2.0 / d_eff) + 2.0 / trials
            assert stat <= thr, (
                f"{name}: claims to be unbiased, but over {trials} encodings the mean error is "
                f"{stat:.3f}x what the variance explains (threshold {thr:.3f} at z = {z}); "
                f"relative bias {rel_bias:.3g}"
            )
        checks.append("unbiased")

    # per-client state
    state = codec.init_client_state(shape_2d)
    if state is not None:
        def run() -> list[bytes]:
            st = codec.init_client_state(shape_2d)
            gs = _gen(seed + 7)
            out = []
            for r in range(rounds):
                xr = torch.randn(shape_2d, generator=gs)
                data, st = codec.encode_stateful(xr, _gen(seed + 100 + r), st)
                assert isinstance(data, bytes), f"{name}: encode_stateful returned {type(data).__name__}"
                _decode(codec, data, shape_2d, f"{name}, stateful round {r}")
                out.append(data)
            return out

        assert run() == run(), f"{name}: encode_stateful is not deterministic from the same state and seeds"
        checks.append("stateful rounds")

    if torch.cuda.is_available():
        xc = torch.randn(1000, generator=g).cuda()
        data = _encode(codec, xc, seed, f"{name} on a CUDA tensor")
        _decode(codec, data, (1000,), f"{name} on a CUDA tensor")
        checks.append("CUDA input")

    return ContractReport(name, tag, claims, 8 * nbytes / unbiased_size, nmse, stat, thr, checks)
