"""Every built-in codec against the contract, and what each promises beyond it."""

from __future__ import annotations

import math
import struct
import sys

import numpy as np
import pytest
import torch

import fedzip.codecs as C
from fedzip.codecs.base import Float32
from fedzip.codecs.gaussian import ecsq_step, lloyd_max
from fedzip.codecs.rotation import fwht, rotate, unrotate
from fedzip.errors import ConfigError, NonFiniteUpdateError, PayloadError
from fedzip.testing import check_compressor

pytestmark = pytest.mark.usefixtures("one_thread")


def builtin() -> dict[str, C.Codec]:
    """Every codec class and composition with the settings worth covering."""
    return {
        "float32": C.Float32(),
        "kashin2": C.kashin_uniform(2),
        "ssq8": C.SharedScaleQuantization(8, bound=4.0),
        "uniform8": C.UniformQuantization(8),
        "uniform3-nearest": C.UniformQuantization(3, stochastic=False),
        "uniform12": C.UniformQuantization(12),
        "uniform4-range": C.UniformQuantization(4, range=(-1.0, 1.0)),
        "qsgd": C.QSGD(),
        "qsgd-s1-b64": C.QSGD(1, 64),
        "rotated-uniform4": C.rotated_uniform(4),
        "rotated-float32-blocks": C.RandomRotation(C.Float32(), block_size=64),
        "drive": C.DRIVE(),
        "drive-mse": C.DRIVE(unbiased=False),
        "eden1": C.EDEN(1),
        "eden2": C.EDEN(2),
        "eden4": C.EDEN(4),
        "eden8": C.EDEN(8),
        "eden0.3": C.EDEN(0.3),
        "eden3-blocks": C.EDEN(3, block_size=256),
        "gaussian-lloyd-max": C.GaussianLloydMax(2),
        "rotated-lloyd-max": C.rotated_lloyd_max(3),
        "lloyd-max": C.LloydMax(3),
        "lloyd-max-stochastic": C.LloydMax(2, stochastic=True),
        "ecsq0.5": C.ecsq(0.5),
        "ecsq2": C.ecsq(2),
        "ecsq8-blocks": C.ecsq(8, block_size=128),
        "ecsq-plain": C.RandomRotation(C.GaussianECSQ(3)),
        "eden-ans": C.eden_ans(4),
        "qsgd-ans": C.qsgd_ans(),
        "uniform-ans": C.EntropyCoded(C.UniformQuantization(8)),
        "sign-ans": C.EntropyCoded(C.SignSGD()),
        "zstd-uniform": C.zstd_uniform(8),
        "zstd-float32": C.Zstd(C.Float32()),
        "topk": C.TopK(0.1),
        "topk-k3": C.TopK(k=3),
        "topk-uniform-values": C.TopK(0.2, values=C.UniformQuantization(8)),
        "randk": C.RandK(0.25),
        "randk-eden": C.RandK(0.5, inner=C.EDEN(2)),
        "sign": C.SignSGD(),
        "scaled-sign": C.ScaledSign(),
        "powersgd": C.PowerSGD(2),
        "topk-ef": C.topk_ef(0.1),
        "sign-ef": C.sign_ef(),
        "powersgd-ef": C.powersgd_ef(1),
        "adaptive": C.AdaptiveBits(),
        "adaptive-uniform-schedule": C.AdaptiveBits(C.UniformQuantization, ladder=(2, 4, 8), schedule=(8, 4, 2)),
    }


CODECS = builtin()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_contract(name):
    report = check_compressor(CODECS[name], trials=120)
    assert report.checks


def test_every_exported_codec_class_is_covered():
    covered = set()
    for codec in CODECS.values():
        stack = [codec]
        while stack:
            c = stack.pop()
            covered.add(type(c))
            stack += [getattr(c, a) for a in ("inner", "_impl", "values") if isinstance(getattr(c, a, None), C.Codec)]
            if isinstance(c, C.AdaptiveBits):
                stack += [c.codec(b) for b in c.ladder]
    exported = {getattr(C, n) for n in C.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, C.Codec)}
    abstract = {C.Codec, C.SymbolCodec, C.Transform, C.SummableCodec}
    assert classes - abstract <= covered, classes - abstract - covered


def test_registry_names_build_codecs_that_pass_a_round_trip():
    x = torch.randn(40, 30)
    for name, factory in C.registry().items():
        codec = factory()
        data = codec.encode(x, torch.Generator().manual_seed(0))
        assert codec.decode(data, (40, 30)).shape == (40, 30), name


def test_config_spec_strings_reach_the_registry():
    from fedzip.config import build_aggregator

    agg = build_aggregator("eden:bits=2,threshold=100")
    assert isinstance(agg.policy.codec, C.EDEN) and agg.policy.codec.bits == 2
    agg = build_aggregator("topk_ef:fraction=0.05")
    assert isinstance(agg.policy.codec, C.ErrorFeedback)


# -- published numbers --------------------------------------------------------


def _nmse(codec, x, trials=6):
    errs = []
    for t in range(trials):
        out = codec.decode(codec.encode(x, torch.Generator().manual_seed(t)), tuple(x.shape))
        errs.append(float((out.double() - x.double()).square().sum() / x.double().square().sum()))
    return sum(errs) / len(errs)


@pytest.mark.parametrize("bits,published", [(1, 0.571), (2, 0.133), (4, 0.00959), (8, 4.12e-5)])
def test_eden_reproduces_the_published_nmse(bits, published):
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(3))
    got = _nmse(C.EDEN(bits), x, trials=12)
    assert abs(got / published - 1) < 0.03, got


def test_eden_nmse_does_not_depend_on_the_input_distribution():
    g = torch.Generator().manual_seed(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        heavy = torch.distributions.StudentT(3.0).sample((1 << 16,))
    spiky = torch.zeros(1 << 16)
    spiky[torch.randint(0, 1 << 16, (50,), generator=g)] = 100.0
    for x in (heavy, spiky, torch.rand(1 << 16, generator=g)):
        assert abs(_nmse(C.EDEN(2), x, trials=8) / 0.1331 - 1) < 0.05


def test_drive_scales():
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(5))
    assert abs(_nmse(C.DRIVE(), x) / (math.pi / 2 - 1) - 1) < 0.03
    assert abs(_nmse(C.DRIVE(unbiased=False), x) / (1 - 2 / math.pi) - 1) < 0.03
    # EDEN at one bit is DRIVE with the unbiased scale, byte for byte
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert C.EDEN(1).encode(x, g1) == C.DRIVE().encode(x, g2)


def test_lloyd_max_tables():
    assert lloyd_max(1)[2] == pytest.approx(1 - 2 / math.pi, rel=1e-9)
    assert lloyd_max(2)[2] == pytest.approx(0.11748, rel=1e-4)  # Max (1960), table I
    assert lloyd_max(4)[2] == pytest.approx(0.009501, rel=1e-3)
    c, b, _ = lloyd_max(3)
    assert np.allclose(c, -c[::-1]) and np.all(np.diff(c) > 0) and len(b) == 7


def test_fractional_eden_sends_the_fraction_of_bits():
    d = 1 << 14
    x = torch.randn(d)
    data = C.EDEN(0.25).encode(x, torch.Generator().manual_seed(0))
    assert 8 * len(data) / d == pytest.approx(0.25, abs=0.01)
    # unbiased rand-k (1/p - 1) plus 1-bit EDEN on the rest
    assert _nmse(C.EDEN(0.25), x, trials=8) == pytest.approx(4 * 1.5708 - 1, rel=0.05)


def test_ecsq_hits_its_rate_within_two_percent_and_is_near_the_bound():
    d = 1 << 16
    x = torch.randn(d, generator=torch.Generator().manual_seed(6))
    for bits in (2.0, 4.0):
        codec = C.ecsq(bits)
        data = codec.encode(x, torch.Generator().manual_seed(0))
        rate = 8 * len(data) / d
        assert rate == pytest.approx(bits, rel=0.02)
        ratio = _nmse(codec, x, trials=4) / (1 / (4**rate - 1))
        assert ratio < 1.5, ratio
    assert ecsq_step(4.0) == pytest.approx(0.259, rel=0.01)


# -- layouts -------------------------------------------------------------------


def test_uniform_byte_layout_is_tffs():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25])
    data = C.UniformQuantization(2, stochastic=False).encode(x, torch.Generator())
    lo, hi = struct.unpack("<ff", data[:8])
    assert (lo, hi) == (0.0, 1.0)
    # codes 0, 3, 2 (0.5*3 = 1.5 rounds to 2), 1 (0.75 rounds to 1), LSB first
    assert data[8:] == bytes([0 | 3 << 2 | 2 << 4 | 1 << 6])
    assert len(C.UniformQuantization(8).encode(torch.randn(1001), torch.Generator())) == 8 + 1001


def test_uniform_encodes_as_before():
    """The bytes of TFF-style quantization are unchanged by the symbol interface."""
    x = torch.randn(777, generator=torch.Generator().manual_seed(1))
    codec = C.UniformQuantization(8)
    data = codec.encode(x, torch.Generator().manual_seed(2))
    s = codec.quantize(x, torch.Generator().manual_seed(2))
    assert data == s.side_bytes + bytes(s.symbols.astype(np.uint8))


@pytest.mark.parametrize("bits,stochastic,fixed", [(8, True, None), (16, True, None), (3, True, None),
                                                  (8, False, None), (8, True, (-0.5, 0.7)), (12, False, (-1, 1))])
def test_uniform_blocks_give_the_one_pass_codes(monkeypatch, bits, stochastic, fixed):
    """Quantized in cache-sized blocks, the codes are the formula's over the
    whole tensor at once: floor((clamp(x) - lo) * levels / (hi - lo) + u),
    clamped to the levels, with numpy's float32 uniforms of the codec's
    generator (or rounded, deterministically)."""
    from fedzip.codecs import base

    x = torch.randn(101, generator=torch.Generator().manual_seed(bits)) * 0.3
    x[5] = 2.0  # the top of the range (clipped by a fixed one)
    codec = C.UniformQuantization(bits, stochastic=stochastic, range=fixed)
    levels = (1 << bits) - 1
    if fixed is None:
        lo, hi = struct.unpack("<ff", struct.pack("<ff", float(x.min()), float(x.max())))
    else:
        lo, hi = fixed
    y = (x.clamp(lo, hi) - lo) * (levels / (hi - lo))
    if stochastic:
        u = base.numpy_generator(torch.Generator().manual_seed(9)).random(101, dtype=np.float32)
        y = (y + torch.from_numpy(u)).clamp(0, levels).floor()
    else:
        y = y.round().clamp(0, levels)
    reference = y.to(torch.int64).numpy()
    for block in (4, 10, 1 << 18):  # many blocks (the last one short), and one
        monkeypatch.setattr(C.UniformQuantization, "BLOCK", block)
        _, codes, _, _ = codec._codes(x, torch.Generator().manual_seed(9))
        assert np.array_equal(codes.astype(np.int64), reference), block
        assert bytes(codec.encode_view(x, torch.Generator().manual_seed(9))) == \
            codec.encode(x, torch.Generator().manual_seed(9))


def test_entropy_coding_modes():
    d = 4096
    g = torch.Generator().manual_seed(0)
    # a prior from the rotation: nothing but the mode byte besides the stream
    x = torch.randn(d, generator=g)
    s = C.EDEN(4).quantize(x, torch.Generator().manual_seed(1))
    assert C.EntropyCoded.code(s.symbols, s.side)[0] == 0
    # no prior: a table (a uniform quantizer of a Gaussian is far from uniform)
    s = C.UniformQuantization(8).quantize(x, torch.Generator().manual_seed(1))
    assert C.EntropyCoded.code(s.symbols, s.side)[0] == 1
    # all symbols equal
    z = C.EntropyCoded(C.SignSGD()).encode(torch.ones(d), torch.Generator())
    assert z[0] == 2 and len(z) == 5
    # random symbols: packed is cheapest
    s = C.UniformQuantization(8).quantize(torch.rand(d, generator=g), torch.Generator().manual_seed(1))
    assert C.EntropyCoded.code(s.symbols, s.side)[0] == 3


def test_entropy_coding_beats_zstd_and_packing_on_tffs_8_bits():
    x = torch.randn(1 << 15, generator=torch.Generator().manual_seed(0))
    g = torch.Generator
    plain = len(C.UniformQuantization(8).encode(x, g().manual_seed(1)))
    ans = len(C.EntropyCoded(C.UniformQuantization(8)).encode(x, g().manual_seed(1)))
    zs = len(C.zstd_uniform(8).encode(x, g().manual_seed(1)))
    assert ans < zs < plain


def test_entropy_decoder_rejects_forged_tables():
    codec = C.EntropyCoded(C.UniformQuantization(4))
    x = torch.randn(500)
    data = bytearray(codec.encode(x, torch.Generator().manual_seed(0)))
    assert data[8] == 1  # TABLE
    data[9:13] = struct.pack("<HH", 10, 200)  # symbols 10..210 of an alphabet of 16
    with pytest.raises(PayloadError, match="frequency table"):
        codec.decode(bytes(data), (500,))


def test_qsgd_packs_sign_and_level_tightly():
    d = 10_000
    data = C.QSGD(levels=1, bucket_size=d).encode(torch.randn(d), torch.Generator())
    assert 8 * (len(data) - 4) / d < 1.59  # 3 symbols: log2(3) = 1.585 bits


def test_topk_indices_cost_about_log2_d_over_k_bits():
    d, k = 1 << 16, 655
    x = torch.randn(d)
    data = C.TopK(k=k).encode(x, torch.Generator())
    index_bits = 8 * (len(data) - 4 * k - 1) / k
    assert index_bits < math.log2(d / k) + 2.0
    out = C.TopK(k=k).decode(data, (d,))
    assert torch.equal(out.abs() > 0, (x.abs() >= x.abs().topk(k).values[-1]))


def test_randk_indices_travel_as_a_seed():
    d = 1000
    data = C.RandK(k=10).encode(torch.randn(d), torch.Generator())
    assert len(data) == 4 + 40


# -- rotation ------------------------------------------------------------------


def test_fwht_matches_the_hadamard_matrix_and_inverts():
    for n in (1, 2, 16, 64, 1024):
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        x = torch.randn(3, n, dtype=torch.float32)
        assert torch.allclose(fwht(x), x @ h, atol=1e-3)
    v = torch.randn(1000)
    y = rotate(v, 7, 1, 1024)
    assert torch.allclose(y.norm(), v.norm(), rtol=1e-5)
    assert torch.allclose(unrotate(y, 7, 1000), v, atol=1e-5)


def test_rotation_does_not_overflow():
    v = torch.full((4096,), 1e30)
    y = rotate(v, 1, 1, 4096)
    assert torch.isfinite(y).all()
    assert torch.allclose(unrotate(y, 1, 4096), v, rtol=1e-4)


def test_block_rotation_pads_less():
    d = 1025
    assert len(C.EDEN(2).encode(torch.randn(d), torch.Generator())) > 500
    assert len(C.EDEN(2, block_size=256).encode(torch.randn(d), torch.Generator())) < 400


# -- state ---------------------------------------------------------------------


def test_error_feedback_sends_what_was_left_over():
    codec = C.topk_ef(0.05)
    shape = (200,)
    state = codec.init_client_state(shape)
    total_in = torch.zeros(shape)
    total_out = torch.zeros(shape)
    g = torch.Generator().manual_seed(0)
    for r in range(30):
        x = torch.randn(shape, generator=g)
        data, state = codec.encode_stateful(x, torch.Generator().manual_seed(r), state)
        total_in += x
        total_out += codec.decode(data, shape)
    # sum of what was sent = sum of the inputs minus the final residual
    assert torch.allclose(total_out + state["residual"], total_in, atol=1e-4)


def test_powersgd_warm_start_converges_to_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
    codec = C.PowerSGD(3)
    state = codec.init_client_state((64, 48))
    errs = []
    for r in range(4):
        data, state = codec.encode_stateful(m, torch.Generator().manual_seed(r), state)
        errs.append(float((codec.decode(data, (64, 48)) - m).norm() / m.norm()))
    assert errs[-1] < 0.02 and errs[-1] <= errs[0]
    assert len(data) == 4 * 3 * (64 + 48)


def test_powersgd_reshapes_conv_kernels_and_sends_small_tensors_plain():
    codec = C.PowerSGD(2)
    x = torch.randn(32, 16, 5, 5)
    data = codec.encode(x, torch.Generator())
    assert len(data) == 4 * 2 * (32 + 16 * 25)
    assert codec.init_client_state((10,)) is None
    assert len(codec.encode(torch.randn(10), torch.Generator())) == 40


def test_adaptive_bits_settle_under_the_target_and_travel_in_the_bytes():
    codec = C.AdaptiveBits(target=0.05)
    state = codec.init_client_state((4096,))
    widths = []
    for r in range(6):
        data, state = codec.encode_stateful(torch.randn(4096), torch.Generator().manual_seed(r), state)
        widths.append(data[0])
    assert widths[-1] == 3 and state["nmse"] < 0.05  # EDEN: 2 bits give 0.133, 3 give 0.036
    sched = C.AdaptiveBits(ladder=(2, 4, 8), schedule=(8, 4, 2))
    st = sched.init_client_state((100,))
    got = []
    for r in range(4):
        data, st = sched.encode_stateful(torch.randn(100), torch.Generator().manual_seed(r), st)
        got.append(data[0])
    assert got == [8, 4, 2, 2]
    with pytest.raises(PayloadError, match="ladder"):
        sched.decode(bytes([5]) + data[1:], (100,))


# -- inputs --------------------------------------------------------------------


def test_codecs_reject_non_finite_input_and_bad_options():
    with pytest.raises(NonFiniteUpdateError):
        C.EDEN(2).encode(torch.tensor([1.0, math.nan]), torch.Generator())
    for bad in (lambda: C.EDEN(1.5), lambda: C.EDEN(0), lambda: C.QSGD(0), lambda: C.TopK(fraction=2.0),
                lambda: C.PowerSGD(0), lambda: C.RandomRotation(C.Float32(), block_size=100),
                lambda: C.EntropyCoded(C.TopK(0.1)), lambda: C.AdaptiveBits(schedule=(5,))):
        with pytest.raises((ConfigError, TypeError)):
            bad()


def test_float32_rejects_non_finite_bytes():
    with pytest.raises(PayloadError, match="not finite"):
        Float32().decode(struct.pack("<f", math.inf), (1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_input_gives_the_same_bytes():
    x = torch.randn(3000)
    for name, codec in CODECS.items():
        a = codec.encode(x, torch.Generator().manual_seed(0))
        b = codec.encode(x.cuda(), torch.Generator().manual_seed(0))
        assert a == b, name


def test_default_rotation_blocks_pad_less_than_one_rotation_of_the_whole_tensor():
    """A tensor just above a multiple of 2^16: the default blocks pad to the next
    multiple of 2^16, one whole-tensor rotation to the next power of two."""
    d = 4 * 65536 + 5
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    blocked = C.EDEN(1).encode(x, torch.Generator().manual_seed(1))
    whole = C.EDEN(1, block_size=None).encode(x, torch.Generator().manual_seed(1))
    assert 5 * 65536 <= 8 * len(blocked) <= 5 * 65536 + 5 * 32 + 64  # codes, a scale per block, seed
    assert 8 * len(whole) >= 1 << 19
    for data, codec in ((blocked, C.EDEN(1)), (whole, C.EDEN(1, block_size=None))):
        y = codec.decode(data, (d,))
        assert 0.45 < float((y - x).square().sum() / x.square().sum()) < 0.7  # EDEN's 0.571 at 1 bit


def test_uniforms_float32_are_numpys_own_draws():
    from fedzip.codecs import base

    assert base._RAW_UNIFORMS_MATCH == (sys.byteorder == "little")  # the fast path runs here
    for seed in range(3):
        for n in (0, 1, 2, 7, 1000, 1001):
            ours = base.uniforms_float32(torch.Generator().manual_seed(seed), n)
            ref = base.numpy_generator(torch.Generator().manual_seed(seed)).random(n, dtype=np.float32)
            assert ours.dtype == np.float32 and np.array_equal(ours, ref)


def test_uniform_stream_in_pieces_is_one_draw():
    from fedzip.codecs import base

    ref = base.numpy_generator(torch.Generator().manual_seed(4)).random(23, dtype=np.float32)
    stream = base.UniformStream(torch.Generator().manual_seed(4))
    out = np.empty(23, np.float32)
    for start, stop in ((0, 2), (2, 12), (12, 12), (12, 23)):  # even pieces, the last one odd
        stream.fill(out[start:stop])
    assert np.array_equal(out, ref)
    with pytest.raises(RuntimeError, match="last piece"):  # a raw output would be split
        stream.fill(np.empty(2, np.float32))
