"""The codec contract as a test anyone can run on their own codec.

    from fedzip.testing import check_compressor
    report = check_compressor(MyCodec())   # raises AssertionError naming what failed
    print(report)

:func:`check_compressor` runs the checks below in order, on Gaussian tensors
of odd sizes (1, 7, 1000, 1025 and a 2-D shape). Each is also a function of
its own, to run alone while a codec is being written; each raises
AssertionError with a message naming the codec, the input and what failed.

* :func:`check_tag`: the codec is a :class:`~fedzip.codecs.Codec` with a tag
  of 1-255 ASCII characters;
* :func:`check_round_trip_shape` (shape and dtype): ``encode`` returns
  ``bytes`` and ``decode`` returns a finite float32 CPU tensor of the shape;
* :func:`check_deterministic_given_rng` (determinism): the same seed gives
  the same bytes, and the same bytes decode to the same tensor, through
  ``encode``/``decode`` and through the round's paths ``encode_view`` and
  ``decode_view`` alike;
* :func:`check_bits_match_bytes` (exact bytes): ``decode`` consumes all of
  the payload: with a byte more or a byte less it raises
  :class:`~fedzip.errors.PayloadError` (so bits = 8 x payload length);
* :func:`check_hostile_bytes` and :func:`check_truncated_bytes` (hostile
  bytes): empty, random, bit-flipped and truncated payloads make ``decode``
  raise ``PayloadError`` or return a finite tensor of the right shape, never
  another exception;
* :func:`check_edge_inputs`: zeros, a constant, a single element and mixed
  magnitudes encode and decode;
* :func:`check_large_values`: values of 1e30 (finite output, error in
  proportion);
* :func:`check_rejects_non_finite`: NaN, +Inf or -Inf makes ``encode`` (and
  ``encode_stateful``) raise :class:`~fedzip.errors.NonFiniteUpdateError`;
* :func:`check_unbiased`, where claimed: over ``trials`` encodings with
  different seeds, the squared norm of the mean error is compared with what
  the variance alone explains (``T ||mean error||^2 / mean sample
  variance``, close to 1 when unbiased); it must stay below ``1 + z *
  sqrt(2 / d_eff)`` (a one-sided test at ``z`` standard deviations,
  ``d_eff`` the effective degrees of freedom), ``z = 5`` by default;
* :func:`check_stateful_replay`, when the codec has per-client state: a few
  rounds of ``encode_stateful`` decode, and replay to the same bytes;
* :func:`check_cuda_input`, when a GPU is present: encodes and decodes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from fedzip.codecs.base import Codec
from fedzip.errors import NonFiniteUpdateError, PayloadError

__all__ = [
    "ContractReport",
    "check_bits_match_bytes",
    "check_compressor",
    "check_cuda_input",
    "check_deterministic_given_rng",
    "check_edge_inputs",
    "check_hostile_bytes",
    "check_large_values",
    "check_rejects_non_finite",
    "check_round_trip_shape",
    "check_stateful_replay",
    "check_tag",
    "check_truncated_bytes",
    "check_unbiased",
]


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
    check_tag(codec)
    claims = bool(codec.unbiased) if unbiased is None else bool(unbiased)
    # one generator for the inputs and one for the byte mutations, shared by
    # the checks in this order: the inputs, and so the report, depend on the seed only
    g = _gen(seed)
    prng = random.Random(seed)
    checks: list[str] = []

    for shape in [(d,) for d in sizes] + [tuple(shape_2d)]:
        x = torch.randn(shape, generator=g)
        check_round_trip_shape(codec, x, seed=seed + 1)
        check_deterministic_given_rng(codec, x, seed=seed + 1)
        check_bits_match_bytes(codec, x, seed=seed + 1, prng=prng)
        check_hostile_bytes(codec, x, seed=seed + 1, tries=hostile, prng=prng)
        check_truncated_bytes(codec, x, seed=seed + 1)
    checks += ["shape and dtype", "exact payload length", "determinism", "hostile bytes"]

    check_edge_inputs(codec, seed=seed + 2, g=g)
    check_large_values(codec, seed=seed + 3, g=g)
    checks += ["zeros", "constants", "single element", "large values 1e30"]

    check_rejects_non_finite(codec, seed=seed, g=g)
    checks.append("NaN/Inf rejected")

    # statistics: bits, NMSE and (where claimed) unbiasedness, from the same encodings
    x = torch.randn(unbiased_size, generator=g)
    outs, nbytes = _encode_trials(codec, x, trials, seed + 1000)
    x64 = x.double()
    nmse = float((outs - x64).square().sum(1).mean() / x64.square().sum())
    stat = thr = None
    if claims:
        stat, thr = check_unbiased(codec, x, trials=trials, z=z, outs=outs)
        checks.append("unbiased")

    if codec.init_client_state(shape_2d) is not None:
        check_stateful_replay(codec, shape_2d, rounds=rounds, seed=seed)
        checks.append("stateful rounds")

    if torch.cuda.is_available():
        check_cuda_input(codec, torch.randn(1000, generator=g).cuda(), seed=seed)
        checks.append("CUDA input")

    return ContractReport(name, codec.tag, claims, 8 * nbytes / unbiased_size, nmse, stat, thr, checks)


# --------------------------------------------------------------------------
# The checks, in the order check_compressor runs them
# --------------------------------------------------------------------------


def check_tag(codec: Codec) -> None:
    """``codec`` is a fedzip :class:`~fedzip.codecs.Codec` whose tag is 1-255 ASCII characters."""
    name = repr(codec)
    assert isinstance(codec, Codec), f"{name} is not a fedzip Codec"
    tag = codec.tag
    assert isinstance(tag, str) and 0 < len(tag) <= 255 and tag.isascii(), f"{name}: tag {tag!r} must be 1-255 ASCII chars"


def check_round_trip_shape(codec: Codec, x: torch.Tensor, *, seed: int = 1) -> bytes:
    """``encode(x)`` returns bytes that decode to a finite float32 CPU tensor of
    ``x``'s shape. Returns the bytes."""
    what = _on_shape(codec, x)
    data = _encode(codec, x, seed, what)
    _decode(codec, data, tuple(x.shape), what)
    return data


def check_deterministic_given_rng(codec: Codec, x: torch.Tensor, *, seed: int = 1) -> None:
    """The same seed gives the same bytes (no global randomness), and decoding
    the same bytes twice gives the same tensor."""
    what = _on_shape(codec, x)
    shape = tuple(x.shape)
    data = _encode(codec, x, seed, what)
    again = _encode(codec, x, seed, what)
    assert again == data, f"{what}: the same seed gave different bytes (not deterministic)"
    out1, out2 = codec.decode(data, shape), codec.decode(data, shape)
    assert torch.equal(out1, out2), f"{what}: decoding the same bytes twice differs"
    # what a round runs: the client encodes through encode_view, the server folds decode_view
    view = codec.encode_view(x, _gen(seed))
    assert bytes(view) == data, f"{what}: encode_view gave other bytes than encode"
    assert torch.equal(codec.decode_view(memoryview(data), shape), out1), \
        f"{what}: decode_view gave another tensor than decode"


def check_bits_match_bytes(
    codec: Codec, x: torch.Tensor, *, seed: int = 1, prng: random.Random | None = None
) -> None:
    """``decode`` consumes exactly the bytes ``encode`` made: one byte more, eight
    bytes more or one byte less raises PayloadError, so the bits of a tensor are
    8 x its payload length and nothing can hide after it."""
    what = _on_shape(codec, x)
    shape = tuple(x.shape)
    prng = prng if prng is not None else random.Random(seed)
    data = _encode(codec, x, seed, what)
    _expect_payload_error(codec, data + b"\x00", shape, f"{what}, one trailing zero byte")
    _expect_payload_error(codec, data + bytes([prng.randrange(1, 256)]) * 8, shape, f"{what}, 8 trailing bytes")
    if data:
        _expect_payload_error(codec, data[:-1], shape, f"{what}, last byte cut")


def check_hostile_bytes(
    codec: Codec, x: torch.Tensor, *, seed: int = 1, tries: int = 24, prng: random.Random | None = None
) -> None:
    """An empty payload, ``tries`` payloads of random bytes or with flipped bits:
    ``decode`` raises PayloadError or returns a finite tensor of the shape,
    never another exception."""
    what = _on_shape(codec, x)
    shape = tuple(x.shape)
    prng = prng if prng is not None else random.Random(seed)
    data = _encode(codec, x, seed, what)
    _hostile(codec, b"", shape, f"{what}, empty payload")
    for i in range(tries):
        if i % 2 == 0 and data:
            buf = bytearray(data)
            for _ in range(1 + i % 3):
                buf[prng.randrange(len(buf))] ^= 1 << prng.randrange(8)
            _hostile(codec, bytes(buf), shape, f"{what}, bit-flipped payload")
        else:
            n = prng.choice([1, 3, 8, len(data), len(data) + 4, prng.randrange(2 * len(data) + 9)])
            _hostile(codec, prng.randbytes(n), shape, f"{what}, {n} random bytes")


def check_truncated_bytes(codec: Codec, x: torch.Tensor, *, seed: int = 1) -> None:
    """The payload cut to 1 byte, to half, and short by 4 bytes: ``decode``
    raises PayloadError or returns a finite tensor of the shape, never another
    exception (lengths are checked before anything is sliced)."""
    what = _on_shape(codec, x)
    shape = tuple(x.shape)
    data = _encode(codec, x, seed, what)
    if data:
        for cut in sorted({len(data) // 2, 1, max(0, len(data) - 4)}):
            _hostile(codec, data[:cut], shape, f"{what}, cut to {cut} bytes")


def check_edge_inputs(codec: Codec, *, seed: int = 2, g: torch.Generator | None = None) -> None:
    """Zeros (of 1000 and of 1), a constant, a single element and mixed
    magnitudes (1e-3 noise and one 1e4) encode and decode to finite tensors.
    ``g`` draws the mixed magnitudes (default: seeded by ``seed``)."""
    name = repr(codec)
    g = g if g is not None else _gen(seed)
    edge = {
        "zeros": torch.zeros(1000),
        "zeros of one": torch.zeros(1),
        "a constant": torch.full((1000,), 3.7),
        "a single element": torch.tensor([-2.5]),
        "mixed magnitudes": torch.cat([torch.randn(999, generator=g) * 1e-3, torch.tensor([1e4])]),
    }
    for label, x in edge.items():
        data = _encode(codec, x, seed, f"{name} on {label}")
        _decode(codec, data, tuple(x.shape), f"{name} on {label}")


def check_large_values(codec: Codec, *, seed: int = 3, g: torch.Generator | None = None) -> None:
    """Values of +-1e30 decode to finite, non-zero tensors whose NMSE stays in
    proportion to the same vector's at unit scale (no overflow to Inf or 0),
    and a constant of 1e30 encodes and decodes."""
    name = repr(codec)
    g = g if g is not None else _gen(seed)
    unit = torch.randn(1000, generator=g)
    for big in (1e30, -1e30):
        what = f"{name} on values of {big:g}"
        data = _encode(codec, unit * abs(big), seed, what)
        out = _decode(codec, data, (1000,), what)
        ref = _nmse(codec.decode(_encode(codec, unit, seed, what), (1000,)), unit)
        got = _nmse(out, unit * abs(big))
        assert float(out.abs().max()) > 0, f"{what}: decoded to all zeros (an overflow flushed to zero?)"
        assert got <= 4 * ref + 1.0, f"{what}: NMSE {got:.4g} where the same vector at unit scale gives {ref:.4g}"
        data = _encode(codec, torch.full((7,), big), seed, what)
        _decode(codec, data, (7,), what + " (constant)")


def check_rejects_non_finite(codec: Codec, *, seed: int = 0, g: torch.Generator | None = None) -> None:
    """A NaN, +Inf or -Inf among finite values makes ``encode`` (and
    ``encode_stateful``, for a stateful codec) raise NonFiniteUpdateError."""
    name = repr(codec)
    g = g if g is not None else _gen(seed)
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


def check_unbiased(
    codec: Codec,
    x: torch.Tensor,
    *,
    trials: int = 200,
    z: float = 5.0,
    seed: int = 1000,
    outs: torch.Tensor | None = None,
) -> tuple[float | None, float | None]:
    """Over ``trials`` encodings of ``x`` (seeds ``seed``, ``seed + 1``, ...; or
    the float64 decodings ``outs`` of them, one per row), the mean error is no
    larger than the variance explains (see the module doc).

    Returns the statistic and its threshold, or ``(None, None)`` when the mean
    error is below float32 rounding (nothing to test)."""
    name = repr(codec)
    if outs is None:
        outs, _ = _encode_trials(codec, x, trials, seed)
    x64 = x.double()
    mean_err = outs.mean(0) - x64
    var = outs.var(0, unbiased=True) if trials > 1 else torch.zeros_like(x64)
    total_var = float(var.sum())
    rel_bias = math.sqrt(float(mean_err.square().sum()) / max(float(x64.square().sum()), 1e-300))
    if rel_bias <= 1e-6:  # float32 rounding: nothing to test
        return None, None
    assert total_var > 0, f"{name}: claims to be unbiased, but its deterministic output is off by {rel_bias:.3g} (relative)"
    d_eff = total_var**2 / float(var.square().sum())
    stat = trials * float(mean_err.square().sum()) / total_var
    thr = 1.0 + z * math.sqrt(2.0 / d_eff) + 2.0 / trials
    assert stat <= thr, (
        f"{name}: claims to be unbiased, but over {trials} encodings the mean error is "
        f"{stat:.3f}x what the variance explains (threshold {thr:.3f} at z = {z}); "
        f"relative bias {rel_bias:.3g}"
    )
    return stat, thr


def check_stateful_replay(codec: Codec, shape: tuple[int, ...] = (33, 31), *, rounds: int = 3, seed: int = 0) -> None:
    """``rounds`` of ``encode_stateful`` from ``init_client_state`` return bytes
    that decode, and replaying them from a fresh state with the same seeds gives
    the same bytes (state lives in the state value, not in the codec object)."""
    name = repr(codec)

    def run() -> list[bytes]:
        st = codec.init_client_state(shape)
        gs = _gen(seed + 7)
        out = []
        for r in range(rounds):
            xr = torch.randn(shape, generator=gs)
            data, st = codec.encode_stateful(xr, _gen(seed + 100 + r), st)
            assert isinstance(data, bytes), f"{name}: encode_stateful returned {type(data).__name__}"
            _decode(codec, data, shape, f"{name}, stateful round {r}")
            out.append(data)
        return out

    assert run() == run(), f"{name}: encode_stateful is not deterministic from the same state and seeds"


def check_cuda_input(codec: Codec, x: torch.Tensor | None = None, *, seed: int = 0) -> None:
    """A CUDA tensor (default: 1000 Gaussian values) encodes, and decodes on the CPU."""
    what = f"{codec!r} on a CUDA tensor"
    x = x if x is not None else torch.randn(1000, generator=_gen(seed)).cuda()
    data = _encode(codec, x, seed, what)
    _decode(codec, data, tuple(x.shape), what)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on_shape(codec: Codec, x: torch.Tensor) -> str:
    return f"{codec!r} on shape {tuple(x.shape)}"


def _encode(codec: Codec, x: torch.Tensor, seed: int, what: str) -> bytes:
    data = codec.encode(x, _gen(seed))
    assert isinstance(data, bytes), f"{what}: encode returned {type(data).__name__}, expected bytes"
    return data


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


def _nmse(out: torch.Tensor, x: torch.Tensor) -> float:
    x64 = x.detach().cpu().double()
    den = float(x64.square().sum())
    num = float((out.double() - x64).square().sum())
    return num / den if den > 0 else num


def _encode_trials(codec: Codec, x: torch.Tensor, trials: int, seed: int) -> tuple[torch.Tensor, int]:
    """Decodings (float64, one row per trial) of ``trials`` encodings of ``x``
    with seeds ``seed``, ``seed + 1``, ...; and the last payload's length."""
    outs = torch.empty(trials, x.numel(), dtype=torch.float64)
    nbytes = 0
    for t in range(trials):
        data = _encode(codec, x, seed + t, f"{codec!r} (trial {t})")
        nbytes = len(data)
        outs[t] = codec.decode(data, tuple(x.shape)).double()
    return outs, nbytes
