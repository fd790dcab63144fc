import math

import pytest
import torch

import fedzip
from fedzip.aggregators import AdaptiveNorm, ExactFloat32Sums
from fedzip.codecs import UniformQuantization
from fedzip.errors import ConfigError, NonFiniteUpdateError
from fedzip.wire import Kind, decode_message, encode_message


def _round(agg, state, updates, weights=None):
    """Run the client side and the streaming server side of one round."""
    scalars = agg.broadcast_scalars(state)
    acc = agg.accumulator(updates[0])
    report_sums = {}
    for i, u in enumerate(updates):
        records, reports, _ = agg.client_encode(scalars, u, torch.Generator().manual_seed(i))
        w = 1.0 if weights is None else weights[i]
        msg = decode_message(encode_message(Kind.UPDATE, {"weight": w, **reports}, records))
        acc.fold(msg.tensors, msg.scalars["weight"])
        agg.fold_reports(report_sums, {k: v for k, v in msg.scalars.items() if k != "weight"})
    return agg.finalize(state, acc, report_sums)


def _vec(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_weighted_mean_is_exact():
    agg = fedzip.mean()
    mean, _, _ = _round(agg, agg.init(), [_vec(1.0, 2.0), _vec(3.0, 6.0)], weights=[1.0, 3.0])
    assert torch.allclose(mean["w"], torch.tensor([2.5, 5.0]))


def test_unweighted_mean_ignores_weights():
    agg = fedzip.mean(weighted=False)
    mean, _, _ = _round(agg, agg.init(), [_vec(1.0), _vec(3.0)], weights=[1.0, 100.0])
    assert torch.allclose(mean["w"], torch.tensor([2.0]))


def test_fixed_clipping_projects_onto_l2_ball_and_counts():
    agg = fedzip.clipping(fedzip.mean(), 1.0)
    mean, _, meas = _round(agg, agg.init(), [_vec(3.0, 4.0), _vec(0.3, 0.4)])
    # (3,4) has norm 5 -> (0.6, 0.8); mean with (0.3, 0.4)
    assert torch.allclose(mean["w"], torch.tensor([0.45, 0.6]))
    assert meas["clipping/clipped_count"] == 1
    assert meas["clipping/clipping_norm"] == 1.0


def test_adaptive_clipping_follows_tff_geometric_update():
    norm = AdaptiveNorm(initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2)
    agg = fedzip.clipping(fedzip.mean(), norm)
    state = agg.init()
    # norms 0.5, 0.9, 2.0, 5.0: two of four are <= 1.0
    updates = [_vec(0.5), _vec(0.9), _vec(2.0), _vec(-5.0)]
    _, state, meas = _round(agg, state, updates)
    expected = 1.0 * math.exp(-0.2 * (2 / 4 - 0.8))
    assert state["clipping"]["estimate"] == pytest.approx(expected, rel=1e-12)
    assert meas["clipping/clipped_count"] == 2
    # the next round uses the new estimate, and moves again by the same rule
    _, state2, meas2 = _round(agg, state, updates)
    assert meas2["clipping/clipping_norm"] == pytest.approx(expected)
    below = sum(abs(u["w"].item()) <= expected for u in updates) / 4
    assert state2["clipping"]["estimate"] == pytest.approx(expected * math.exp(-0.2 * (below - 0.8)))


def test_adaptive_zeroing_uses_multiplier_increment_and_linf_norm():
    agg = fedzip.zeroing(fedzip.mean(), fedzip.aggregators.default_zeroing_norm())
    state = agg.init()
    assert agg.broadcast_scalars(state)["zeroing/threshold"] == 2.0 * 10.0 + 1.0
    # L-inf norm 25 > 21 is zeroed even though each entry alone is modest in L2 terms
    mean, new_state, meas = _round(agg, state, [_vec(25.0, 0.0), _vec(1.0, 1.0)])
    assert meas["zeroing/zeroed_count"] == 1
    assert torch.allclose(mean["w"], torch.tensor([0.5, 0.5]))  # weight kept, value zeroed
    frac = 1 / 2  # only the second is <= estimate 10
    assert new_state["zeroing"]["estimate"] == pytest.approx(10.0 * math.exp(-math.log(10) * (frac - 0.98)))


def test_zeroing_drops_non_finite_updates():
    agg = fedzip.compression_aggregator()
    mean, _, meas = _round(agg, agg.init(), [_vec(float("nan"), 1.0), _vec(0.1, 0.2)])
    assert meas["zeroing/zeroed_count"] == 1
    assert torch.isfinite(mean["w"]).all()


def test_non_finite_update_without_zeroing_is_an_error():
    agg = fedzip.mean()
    with pytest.raises(NonFiniteUpdateError, match="NaN or Inf"):
        agg.client_encode({}, _vec(float("inf")), torch.Generator())


def test_compression_aggregator_structure_matches_tff():
    agg = fedzip.compression_aggregator()
    assert [type(s).__name__ for s in agg.stages] == ["Zeroing", "Clipping"]
    zero, clip = agg.stages
    assert (zero.norm.initial_estimate, zero.norm.target_quantile, zero.norm.multiplier,
            zero.norm.increment) == (10.0, 0.98, 2.0, 1.0)
    assert zero.norm.learning_rate == pytest.approx(math.log(10))
    assert (clip.norm.initial_estimate, clip.norm.target_quantile, clip.norm.learning_rate) == (1.0, 0.8, 0.2)
    assert math.isinf(zero.norm_order)
    big = agg.policy.for_tensor("fc1.weight", 20_001)
    assert isinstance(big, UniformQuantization) and big.bits == 8 and big.stochastic
    assert agg.policy.for_tensor("fc1.bias", 20_000).tag == "f32"


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="norm"):
        fedzip.clipping(fedzip.mean(), -1.0)
    with pytest.raises(ConfigError, match="norm_order"):
        fedzip.zeroing(fedzip.mean(), 1.0, norm_order=3.0)
    with pytest.raises(ConfigError, match="target_quantile"):
        AdaptiveNorm(1.0, 1.5, 0.2)


def test_uniform_quantizer_round_trip_and_unbiased():
    codec = UniformQuantization(bits=8)
    x = torch.randn(5000)
    lo, hi = float(x.min()), float(x.max())
    step = (hi - lo) / 255
    g = torch.Generator().manual_seed(0)
    y = codec.decode(codec.encode(x, g), (5000,))
    assert (y - x).abs().max() <= step * (1 + 1e-5)
    # unbiased: averaging many independent encodings converges to x
    mean = sum(codec.decode(codec.encode(x, g), (5000,)) for _ in range(400)) / 400
    # per-coordinate std of one encoding <= step/2; of the mean <= step/40
    assert (mean - x).abs().mean() < step / 40
    assert (y - x).abs().mean() > step / 10  # and it does quantize
    det = UniformQuantization(bits=4, stochastic=False)
    yd = det.decode(det.encode(x, g), (5000,))
    assert (yd - x).abs().max() <= (hi - lo) / 15 / 2 * (1 + 1e-5)


def _fold_all(agg, updates, weights):
    acc = agg.accumulator(updates[0])
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        records, _, _ = agg.client_encode({}, u, torch.Generator().manual_seed(i))
        acc.fold(records, w)
    return acc


def _float64_mean(sums, weight_sum):
    """The reference: float64 sums divided in float64, rounded to float32."""
    return {k: (v.double() / weight_sum).to(torch.float32) for k, v in sums.items()}


@pytest.mark.parametrize("weights", [[20, 37, 1, 95, 4], [1.0] * 5, [0.5, 0.25, 3.0, 1.5, 0.125]])
def test_a_round_of_one_block_divides_in_float32_to_the_float64_bits(weights):
    # magnitudes from 1e-38 (the division lands among float32's subnormals) to 1e30
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-38, 30, 4001)
    updates = [{"w": torch.randn(4001, generator=g) * scale, "b": torch.randn(3, generator=g)} for _ in weights]
    agg = fedzip.mean()
    aggregate = _fold_all(agg, updates, weights).result()
    sums = aggregate.sums
    assert isinstance(sums, ExactFloat32Sums) and sums.float32() is not None
    like = {k: (tuple(v.shape), torch.device("cpu")) for k, v in updates[0].items()}
    fast = aggregate.mean(like)
    # the float64 sums, read through the view, are the float32 block exactly
    block = {k: v.clone() for k, v in sums.float32().items()}
    assert all(torch.equal(sums[k], block[k].double()) for k in block)
    reference = _float64_mean(block, float(sum(weights)))
    assert all(torch.equal(fast[k], reference[k]) for k in reference)
    assert int((fast["w"].abs() < 1.2e-38).sum()) > 0  # subnormal quotients were compared too


def test_a_stage_that_reads_the_sums_gets_float64_and_its_changes_count():
    updates = [_vec(1.0, 2.0), _vec(3.0, 6.0)]
    aggregate = _fold_all(fedzip.mean(), updates, [1, 3]).result()
    aggregate.sums["w"].mul_(2.0)  # a stage changing the float64 sums in place
    assert aggregate.sums.float32() is None and aggregate.sums["w"].dtype == torch.float64
    assert torch.equal(aggregate.mean({"w": ((2,), torch.device("cpu"))})["w"], torch.tensor([5.0, 10.0]))


def test_rounds_past_one_block_or_with_huge_weights_sum_in_float64():
    from fedzip.aggregators import StreamingMean

    many = [_vec(float(i)) for i in range(StreamingMean.BLOCK + 1)]
    aggregate = _fold_all(fedzip.mean(), many, [1.0] * len(many)).result()
    assert not isinstance(aggregate.sums, ExactFloat32Sums) and aggregate.sums["w"].dtype == torch.float64
    assert float(aggregate.mean({"w": ((1,), torch.device("cpu"))})["w"]) == sum(range(len(many))) / len(many)
    huge = _fold_all(fedzip.mean(), [_vec(1.0), _vec(3.0)], [1.0, 1e30]).result()
    assert not isinstance(huge.sums, ExactFloat32Sums)
    assert float(huge.mean({"w": ((1,), torch.device("cpu"))})["w"]) == 3.0
