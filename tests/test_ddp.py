"""Distributed DP through secure aggregation (Kairouz, Liu, Steinke, ICML 2021;
Agarwal, Kairouz, Liu, NeurIPS 2021): the decoded sum, the noise it carries,
modular clipping, the bits on the wire and the accounting."""

import math

import numpy as np
import pytest
import torch

from fedzip.algorithms.client import ClientTask
from fedzip.bitpack import packed_size
from fedzip.errors import ConfigError, PayloadError
from fedzip.privacy import accounting, ddp
from fedzip.privacy.ddp import DistributedDiscreteGaussian, DistributedSkellam
from fedzip.privacy.masking import modulus_bits
from fedzip.privacy.secagg import mask_update
from fedzip.seeding import torch_rng

MECHANISMS = [DistributedDiscreteGaussian, DistributedSkellam]
DELTA = 1 / 284


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _clipped(x, clip=1.0):
    x = x.double()
    n = float(x.norm())
    return x * (clip / n) if n > clip else x


def _sum(codec, xs, seed=0):
    """The server's decoded sum of the clients' codes, and each client's integers."""
    total, ints = None, []
    for i, x in enumerate(xs):
        data = codec.encode(x, torch_rng(seed, i))
        assert len(data) == packed_size(x.numel(), codec.bits)
        ints.append(codec.integers(x, torch_rng(seed, i)))  # the same draws, before the reduction
        codes = codec.parse_summand(data, tuple(x.shape))
        total = codes if total is None else codec.add_summands(total, codes)
    return codec.decode_sum(total, len(xs), tuple(xs[0].shape)), np.sum(ints, axis=0)


def _rotated_error(codec, decoded, expected):
    """Per coordinate, after the rotation, in units of the step 1/γ."""
    diff = decoded.double().reshape(-1) - expected.reshape(-1)
    return float(ddp.rotate(diff, codec.seed).abs().max()) * codec.gamma


# -- the rotation -----------------------------------------------------------


@pytest.mark.parametrize("d", [1, 5, 1000, 1024])
def test_the_rotation_is_orthogonal_without_padding_and_flattens_spikes(d):
    v = _randn(d, seed=d)
    y = ddp.rotate(v, 7)
    assert y.shape == (d,)  # no padding
    assert abs(float(y.norm()) - float(v.norm())) < 1e-5 * float(v.norm())
    assert float((ddp.unrotate(y, 7) - v).abs().max()) < 1e-5
    if d >= 64:
        p = 1 << (d.bit_length() - 1)
        for i in (0, d - 1):  # a spike at either end spreads over every coordinate
            spike = torch.zeros(d)
            spike[i] = 1.0
            assert float(ddp.rotate(spike, 7).abs().max()) < 6 / math.sqrt(p)


# -- the decoded sum ----------------------------------------------------------


@pytest.mark.parametrize("cls", MECHANISMS)
def test_one_client_without_noise_gets_its_clipped_update_back_within_the_step(cls):
    codec = cls(bits=24, gamma=1000.0, clip=1.0)
    x = _randn(1000) * 3  # norm ~95: clipped to 1
    (decoded, _) = _sum(codec, [x])
    assert decoded.shape == (1000,)
    assert _rotated_error(codec, decoded, _clipped(x)) < 1.0 + 1e-3
    assert float((decoded.double() - _clipped(x)).norm()) < math.sqrt(1000) / codec.gamma
    # decode() of one message is decode_sum of it alone
    data = codec.encode(x, torch_rng(0, 0))
    assert torch.equal(codec.decode(data, (1000,)), decoded)


@pytest.mark.parametrize("cls", MECHANISMS)
def test_the_sum_of_clients_without_noise_is_the_plain_sum_within_n_steps(cls):
    n = 5
    codec = cls(bits=22, gamma=500.0, clip=1.0, clients=n)
    xs = [_randn(40, 25, seed=s) * (0.01 if s % 2 else 1.0) for s in range(n)]  # some clipped, some not
    decoded, int_sum = _sum(codec, xs)
    plain = sum(_clipped(x) for x in xs)
    assert decoded.shape == (40, 25)
    assert _rotated_error(codec, decoded, plain.reshape(-1)) < n + 1e-2
    assert ddp.count_wrapped(int_sum, codec.bits) == 0


def test_conditional_rounding_keeps_every_rounded_vector_within_the_papers_bound():
    """Values half-way between integers (the worst case): plain randomized
    rounding exceeds KLS21's bound often; the codec's rounding never does."""
    d, gamma = 64, 100.0
    codec = DistributedDiscreteGaussian(bits=16, gamma=gamma, clip=1.0)
    z = torch.where(torch.arange(d) % 3 == 0, 12.5, -12.5).double()  # ||z|| = 100 = γC
    x = ddp.unrotate(z / gamma, codec.seed)  # so that the codec rounds exactly z
    bound2 = ddp.rounding_bound(gamma * 1.0, d, codec.beta) ** 2
    g = np.random.default_rng(0)
    plain = [np.sum((np.floor(z.numpy()) + (g.random(d) < 0.5)) ** 2) > bound2 for _ in range(200)]
    assert sum(plain) > 10  # the bound bites
    for s in range(60):
        r = codec.integers(x, torch_rng(1, s))
        assert float(np.dot(r, r)) <= bound2


def test_modular_clipping_wraps_where_the_sum_leaves_the_range_and_is_measured():
    n, d, gamma = 4, 256, 2000.0
    x = _randn(d, seed=3)
    xs = [x] * n  # aligned clients: the sum's coordinates are large
    small = DistributedDiscreteGaussian(bits=10, gamma=gamma, clip=1.0, clients=n)
    decoded, int_sum = _sum(small, xs)
    wrapped = ddp.count_wrapped(int_sum, small.bits)
    assert 20 < wrapped < d  # 10 bits hold |sum| < 512 steps; these sums reach ~4·γ/√d·3
    # each coordinate comes back as the true sum mod 2^m, centred: off by a multiple of 2^m where it wrapped
    back = ddp.rotate(decoded.double(), small.seed).double().numpy() * gamma
    turns = np.round((back - int_sum) / 2**small.bits)
    assert np.all(np.abs(back - int_sum - turns * 2**small.bits) < 0.05)
    assert np.count_nonzero(turns) == wrapped
    # the server's estimate, from the modular sum alone, sees wraps of the same order
    meas = small.drain_measurements()
    assert wrapped / 3 < meas["expected_wrapped"] < wrapped * 3
    assert meas["headroom"] < 2 and small.drain_measurements() == {}
    # enough bits: nothing wraps, the sum is exact to n steps, and the estimate agrees
    big = DistributedDiscreteGaussian(bits=16, gamma=gamma, clip=1.0, clients=n)
    decoded, int_sum = _sum(big, xs)
    assert ddp.count_wrapped(int_sum, big.bits) == 0
    assert _rotated_error(big, decoded, n * _clipped(x)) < n + 1e-2
    meas = big.drain_measurements()
    assert meas["expected_wrapped"] < 1e-3 and meas["headroom"] > 10


# -- the noise ------------------------------------------------------------------


@pytest.mark.parametrize("cls", MECHANISMS)
def test_the_noise_on_the_decoded_sum_has_the_configured_stddev(cls):
    n, d, z, clip = 4, 1 << 14, 0.5, 2.0
    codec = cls(bits=20, gamma=100.0, clip=clip, noise_multiplier=z, clients=n)
    xs = [_randn(d, seed=10 + s) * 0.01 for s in range(n)]
    decoded, int_sum = _sum(codec, xs)
    assert ddp.count_wrapped(int_sum, codec.bits) == 0
    err = decoded.double() - sum(_clipped(x, clip) for x in xs)
    # σ = zC on the sum (n shares of σ/√n); the rounding adds at most n/(4γ²) of variance
    assert abs(float(err.std()) / (z * clip) - 1) < 0.03
    assert abs(float(err.mean())) < 4 * z * clip / math.sqrt(d)
    # in integer units, before the modular reduction: the n shares add up to std σγ
    plain = ddp.rotate(sum(_clipped(x, clip) for x in xs), codec.seed).double().numpy() * codec.gamma
    assert abs(float(np.std(int_sum - plain)) / (z * clip * codec.gamma) - 1) < 0.03


# -- bits -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [12, 14, 16, 18])
@pytest.mark.parametrize("cls", MECHANISMS)
def test_each_message_is_exactly_m_bits_per_coordinate(cls, bits):
    codec = cls(bits=bits, gamma=50.0, clip=1.0, noise_multiplier=1.0, clients=10)
    for d in (1000, 1024, 7):
        data = codec.encode(_randn(d), torch_rng(0, d))
        assert len(data) == math.ceil(d * bits / 8) == codec.max_encoded_size((d,))
    assert modulus_bits(codec, 1000) == bits  # secure aggregation sums mod the codec's own 2^m
    with pytest.raises(PayloadError):
        codec.parse_summand(data[:-1], (7,))


def test_secure_aggregation_sums_mod_2_to_the_m_and_the_aggregate_is_the_mean():
    shapes = {"b": (7,), "w": (40, 25)}
    n, bits = 4, 20
    agg = ddp.distributed_dp(0.0, clip=1.0, cohort=n, bits=bits, gamma=1e4, threshold=2)
    ups = [{k: _randn(*s, seed=10 * i + len(s)) * 0.02 for k, s in shapes.items()} for i in range(n)]
    state = agg.init()
    scalars = agg.broadcast_scalars(state)
    acc = agg.accumulator(ups[0])
    tasks = acc.setup(0, 1, [ClientTask(f"c{i}", 1, b"") for i in range(n)])
    reports: dict[str, float] = {}
    for t, u in zip(tasks, ups, strict=True):
        recs, rep, _ = agg.client_encode(scalars, u, torch_rng(0, 1, t.client_id, "codec"))
        acc.fold_masked(t.client_id, mask_update(t.secagg, recs, agg.policy, 0, 1, t.client_id))
        agg.fold_reports(reports, rep)
    mean, _, meas = agg.finalize(state, acc, reports)
    # the update is clipped as a whole (norm over both tensors), then summed
    for k in shapes:
        norms = [math.sqrt(sum(float(v.double().square().sum()) for v in u.values())) for u in ups]
        plain = sum(u[k].double() * min(1.0, 1.0 / nm) for u, nm in zip(ups, norms, strict=True)) / n
        assert float((mean[k].double() - plain).abs().max()) < 1e-3
    assert acc.decoded_individually == 0
    assert meas["secagg/modulus_bits"] == bits
    # m bits per coordinate, each tensor's codes padded to a whole byte
    assert meas["secagg/bits_per_client/masked_input"] == 8 * (packed_size(7, bits) + packed_size(1000, bits))
    assert meas["ddp/noise_stddev"] == 0 and meas["ddp/expected_wrapped"] < 1e-6


def test_the_stage_reports_the_noise_and_epsilon_so_far():
    agg = ddp.distributed_dp(1.0, clip=0.5, cohort=2, bits=16, dim=64, mechanism="skellam", secure=False,
                             population=284, delta=DELTA)
    ups = [{"w": _randn(8, 8, seed=i)} for i in range(2)]
    state = agg.init()
    eps = []
    for r in range(2):
        acc = agg.accumulator(ups[0])
        for i, u in enumerate(ups):
            recs, _, _ = agg.client_encode(agg.broadcast_scalars(state), u, torch_rng(0, r, i))
            acc.fold(recs, 1.0)
        _, state, meas = agg.finalize(state, acc, {})
        eps.append(meas["ddp/epsilon"])
        assert meas["ddp/noise_stddev"] == pytest.approx(0.5)
    codec = agg.policy.codec
    assert eps == pytest.approx([ddp.ddp_epsilon("skellam", 1.0, codec.gamma, 64, r, 2, 284, DELTA, clip=0.5)
                                 for r in (1, 2)])
    assert eps[0] < eps[1]


# -- accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["ddg", "skellam"])
def test_epsilon_falls_with_noise_and_grows_with_rounds(mechanism):
    def eps(z=1.0, rounds=100, gamma=300.0):
        return ddp.ddp_epsilon(mechanism, z, gamma, 1 << 16, rounds, 10, 284, DELTA)

    assert eps(z=0.8) > eps(z=1.0) > eps(z=1.5)
    assert eps(rounds=50) < eps(rounds=100) < eps(rounds=200)
    assert eps(gamma=30.0) > eps(gamma=300.0) > eps(gamma=3000.0)  # coarse steps inflate the sensitivity
    assert ddp.ddp_epsilon(mechanism, 0.0, 300.0, 10, 1, 10, 284, DELTA) == math.inf


@pytest.mark.parametrize("mechanism", ["ddg", "skellam"])
def test_fine_granularity_approaches_central_dp_at_the_same_noise(mechanism):
    fine = ddp.ddp_epsilon(mechanism, 1.0, 1e5, 1 << 16, 100, 10, 284, DELTA)
    central = accounting.epsilon(1.0, 100, 10, 284, DELTA)  # fixed cohort, replace-one: the same relation
    assert fine == pytest.approx(central, rel=0.01)
    coarse = ddp.ddp_epsilon(mechanism, 1.0, 100.0, 1 << 16, 100, 10, 284, DELTA)
    assert coarse > 3 * central
    # without sampling (cohort = population), dp_accounting's Gaussian composition
    full = ddp.ddp_epsilon(mechanism, 2.0, 1e5, 1000, 10, 10, 10, DELTA)
    assert full == pytest.approx(accounting.epsilon(2.0, 10, 10, 10, DELTA), rel=0.02)
    # Poisson sampling: the same general bound applied to the Gaussian, which is above dp_accounting's exact one
    fine_p = ddp.ddp_epsilon(mechanism, 1.0, 1e5, 1 << 16, 100, 10, 284, DELTA, sampling="poisson")
    same_bound = ddp.ddp_epsilon("gaussian", 1.0, 1.0, 1 << 16, 100, 10, 284, DELTA, sampling="poisson")
    assert fine_p == pytest.approx(same_bound, rel=0.01)
    assert accounting.epsilon(1.0, 100, 10, 284, DELTA, sampling="poisson") < same_bound


def test_the_per_round_curves_are_the_papers_formulas():
    orders = np.arange(2, 9)
    # KLS21 Proposition 14's τ, by hand for n = 3, σ_c = 0.5
    tau = 10 * (math.exp(-2 * math.pi**2 * 0.25 / 2) + math.exp(-2 * math.pi**2 * 0.25 * 2 / 3))
    assert ddp.ddg_tau(0.5, 3) == pytest.approx(tau)
    z, gamma, d, n = 1.0, 40.0, 100, 4
    l2 = ddp.rounded_norm_bound(gamma, d)  # add/remove (Poisson) sensitivity, integer units
    assert l2 == pytest.approx(min(gamma + 10, math.sqrt(gamma**2 + 25 + 1.0 * (gamma + 5))))
    l1 = min(l2 * l2, 10 * l2)
    sigma = z * gamma
    # no sampling: one round is the unsampled curve
    ddg = ddp.round_rdp("ddg", z, gamma, 1.0, d, n, n, sampling="poisson", orders=orders)
    tau = ddp.ddg_tau(sigma / 2, n)
    a, b = l2 / sigma, l1 / sigma
    want = np.minimum.reduce([orders * a * a / 2 + tau * d, orders / 2 * (a * a + 2 * b * tau + tau * tau * d),
                              orders / 2 * (a + math.sqrt(d) * tau) ** 2])
    assert ddg == pytest.approx(want)
    # AKL21 Theorem 3.5
    sk = ddp.round_rdp("skellam", z, gamma, 1.0, d, n, n, sampling="poisson", orders=orders)
    mu = sigma**2
    want = orders * l2**2 / (2 * mu) + np.minimum(((2 * orders - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                                   3 * l1 / (2 * mu))
    assert sk == pytest.approx(want)
    # the sampling bounds at order 3, by hand: Zhu & Wang Theorem 5 (Poisson), WBK19 Theorem 9 (fixed)
    q, base = 0.05, {2: 0.3, 3: 0.5}
    e2, e3 = math.exp(0.3), math.exp(2 * 0.5)
    poisson = math.log((1 - q) ** 2 * (3 * q - q + 1) + 3 * q * q * (1 - q) * e2 + 3 * q**3 * e3) / 2
    fixed = math.log(1 + 3 * q * q * min(4 * (e2 - 1), 2 * e2) + 2 * q**3 * e3) / 2
    assert ddp.subsampled_rdp([3], base, q, "poisson")[0] == pytest.approx(poisson)
    assert ddp.subsampled_rdp([3], base, q, "fixed")[0] == pytest.approx(fixed)
    # sampling only helps
    assert np.all(ddp.round_rdp("skellam", z, gamma, 1.0, d, n, 100, sampling="poisson", orders=orders) < sk)


def test_parameter_selection_meets_the_target_with_the_bits():
    dims = 1 << 16
    p = ddp.ddp_parameters(5.0, DELTA, 100, 10, 284, 16, dims)
    assert 4.9 < p.epsilon <= 5.0
    assert p.gamma == pytest.approx(ddp.scale_for_bits(16, 1.0, p.noise_multiplier, 10, dims, 4.0))
    assert ddp.ddp_epsilon("ddg", p.noise_multiplier, p.gamma, dims, 100, 10, 284, DELTA) == pytest.approx(p.epsilon)
    # k = 4 standard deviations of the sum (signal bound, rounding, noise) fill the 2^m range
    spread = math.sqrt((10 / math.sqrt(dims)) ** 2 * p.gamma**2 + 10 / 4 + (p.noise_multiplier * p.gamma) ** 2)
    assert 2 * 4 * spread == pytest.approx(2**16, rel=1e-6)
    # a little less noise misses the target
    less = ddp.ddp_epsilon("ddg", 0.99 * p.noise_multiplier,
                           ddp.scale_for_bits(16, 1.0, 0.99 * p.noise_multiplier, 10, dims, 4.0),
                           dims, 100, 10, 284, DELTA)
    assert less > 5.0
    with pytest.raises(ConfigError, match="more bits"):
        ddp.ddp_parameters(1.0, DELTA, 100, 10, 284, 8, 1 << 20)


def test_misconfigurations_are_named():
    for bad in ({"bits": 1}, {"bits": 33}, {"gamma": 0.0}, {"beta": 1.0}, {"noise_multiplier": -1.0},
                {"clients": 0}):
        with pytest.raises(ConfigError):
            DistributedDiscreteGaussian(**bad)
    with pytest.raises(ConfigError, match="sigma >= 1/2"):
        ddp.ddp_epsilon("ddg", 0.1, 1.0, 100, 1, 10, 100, DELTA)
    with pytest.raises(ConfigError):
        ddp.ddp_epsilon("laplace", 1.0, 1.0, 100, 1, 10, 100, DELTA)
    with pytest.raises(ConfigError, match="dim"):
        ddp.distributed_dp(1.0, 1.0, 10)
