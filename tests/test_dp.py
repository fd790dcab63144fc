"""Central DP-FedAvg (fedzip.algorithms.dp): clipping, the noise on the
aggregate, the fixed denominator, adaptive clipping, and ε against
dp_accounting called directly."""

from __future__ import annotations

import functools
import math

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import NeighboringRelation, rdp
from torch import nn

import fedzip
from fedzip.aggregators import AdaptiveNorm
from fedzip.algorithms.dp import ClippedSum, DPClip, DPFedAvg, poisson_sample
from fedzip.codecs import CodecPolicy, SharedScaleQuantization, UniformQuantization
from fedzip.config import RunConfig, build_algorithm_spec
from fedzip.data.federated import ClientExamples, Preprocess
from fedzip.errors import ClientFailure, ConfigError, PayloadError
from fedzip.payload import encode_params
from fedzip.privacy.accounting import epsilon, noise_for_epsilon
from fedzip.tasks.base import Task

D, C = 500, 20  # 10,020 parameters: enough coordinates to measure a standard deviation


def linear_model():
    return nn.Linear(D, C)


TASK = Task(name="blobs", model_fn=linear_model)


class Blobs:
    """Clients of examples from the same Gaussian blobs; ``sizes`` examples each."""

    def __init__(self, sizes=(20,) * 6, seed=0):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(C, D, generator=g)
        self.examples = {}
        for i, n in enumerate(sizes):
            y = torch.randint(0, C, (n,), generator=g)
            self.examples[f"c{i}"] = ClientExamples(centers[y] + torch.randn(n, D, generator=g), y)

    @property
    def client_ids(self):
        return list(self.examples)

    def client(self, cid):
        return self.examples[cid]


SGD = torch.optim.SGD


class FailOne:
    """Runs clients in process; ``victim`` raises."""

    def __init__(self, victim):
        self.victim = victim

    def map(self, work, data, tasks):
        for task in tasks:
            if task.client_id == self.victim:
                yield ClientFailure(task.client_id, "RuntimeError: unplugged")
            else:
                yield work(data, task)


def dp(data, aggregator=None, **kw):
    kw.setdefault("population", len(data.client_ids))
    kw.setdefault("delta", 1e-3)
    return DPFedAvg(task=TASK, client_optimizer=functools.partial(SGD, lr=0.5),
                    server_optimizer=functools.partial(SGD, lr=1.0), aggregator=aggregator,
                    preprocess=Preprocess(batch_size=20, epochs=1, shuffle_buffer=100), **kw)


def fedavg(aggregator=None):
    return fedzip.weighted_fedavg(task=TASK, client_optimizer=functools.partial(SGD, lr=0.5),
                                  server_optimizer=functools.partial(SGD, lr=1.0), aggregator=aggregator,
                                  preprocess=Preprocess(batch_size=20, epochs=1, shuffle_buffer=100))


def flat(params):
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def round_delta(fa, data, ids, state=None):
    s0 = state or fa.init()
    s1, metrics = fa.next(s0, data, ids)
    return flat(s1.params) - flat(s0.params), metrics, s1


# --------------------------------------------------------------------------
# Clipping and the fixed denominator
# --------------------------------------------------------------------------


def test_one_client_without_noise_gets_its_clipped_update():
    data = Blobs(sizes=(20,))
    raw, _, _ = round_delta(fedavg(), data, ["c0"])
    clip = 0.25 * float(raw.norm())
    got, metrics, _ = round_delta(dp(data, cohort=1, clip=clip, noise_multiplier=0.0), data, ["c0"])
    assert torch.allclose(got, raw * (clip / raw.norm()), atol=1e-7)
    assert float(got.norm()) == pytest.approx(clip, rel=1e-5)
    assert metrics["privacy/epsilon"] == math.inf and metrics["privacy/noise_multiplier"] == 0.0
    assert metrics["aggregator/dp/clipping_norm"] == clip
    # a bound above the norm leaves the update as it is
    got, _, _ = round_delta(dp(data, cohort=1, clip=10 * float(raw.norm()), noise_multiplier=0.0), data, ["c0"])
    assert torch.allclose(got, raw, atol=1e-7)


def test_unweighted_sum_over_a_fixed_denominator():
    data = Blobs(sizes=(20, 60, 40, 20))
    raws = [round_delta(fedavg(), data, [cid])[0] for cid in data.client_ids]
    clip = 1e6  # nothing clipped: the mean is the unweighted sum over the cohort
    got, _, _ = round_delta(dp(data, cohort=4, clip=clip, noise_multiplier=0.0), data, data.client_ids)
    assert torch.allclose(got, sum(raws) / 4, atol=1e-6)
    # a failed client still divides by the expected cohort: the others' sum / 4
    fa = dp(data, cohort=4, clip=clip, noise_multiplier=0.0, min_clients=3, executor=FailOne("c3"))
    got, metrics, _ = round_delta(fa, data, data.client_ids)
    assert metrics["clients/failed"] == 1
    assert torch.allclose(got, sum(raws[:3]) / 4, atol=1e-6)


def test_capped_weights():
    data = Blobs(sizes=(20, 60))  # weights (examples trained on) 20 and 60
    raws = [round_delta(fedavg(), data, [cid])[0] for cid in data.client_ids]
    fa = dp(data, cohort=2, clip=1e6, noise_multiplier=0.0, weight_cap=40.0, mean_weight=0.75)
    got, _, _ = round_delta(fa, data, data.client_ids)
    # w = min(n / 40, 1) = 0.5 and 1; the denominator is cohort × mean_weight = 1.5
    assert torch.allclose(got, (0.5 * raws[0] + raws[1]) / 1.5, atol=1e-6)


def test_the_server_clips_each_decoded_update_again():
    template = {"w": (tuple([4]), torch.device("cpu"))}
    agg = fedzip.mean(weighted=False)
    acc = ClippedSum(agg, template, bound=1.0)
    for v in ([3.0, 4.0, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0]):
        acc.fold(encode_params({"w": torch.tensor(v)}, CodecPolicy(), torch.Generator()), weight=7.0)
    assert torch.allclose(acc.sums["w"], torch.tensor([0.9, 1.2, 0.0, 0.0], dtype=torch.float64))
    assert acc.reclipped == 1 and acc.weight_sum == 2.0
    # updates folded already decoded (algorithms with their own update space) are clipped too
    acc.fold_decoded({"w": torch.tensor([0.0, 0.0, 6.0, 8.0])}, weight=1.0)
    assert torch.allclose(acc.sums["w"], torch.tensor([0.9, 1.2, 0.6, 0.8], dtype=torch.float64))
    with pytest.raises(PayloadError, match="NaN"):
        acc.fold_decoded({"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, weight=1.0)
    assert acc.count == 3
    with pytest.raises(PayloadError, match="coverage"):
        acc.fold([], 1.0, coverage={"w": torch.ones(4, dtype=torch.bool)})


def test_lossy_codecs_compose_and_stay_within_the_bound():
    data = Blobs(sizes=(20,) * 4)
    clip = 0.05
    fa = dp(data, fedzip.mean(UniformQuantization(bits=2)), cohort=4, clip=clip, noise_multiplier=0.0)
    got, metrics, _ = round_delta(fa, data, data.client_ids)
    # each decoded 2-bit update is clipped again on the server: the mean is within C
    assert float(got.norm()) <= clip * (1 + 1e-5)
    assert metrics["aggregated_bits"] > 0


# --------------------------------------------------------------------------
# The noise
# --------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["after", "before"])
def test_noise_on_the_aggregate_has_the_configured_stddev(placement):
    data = Blobs(sizes=(20,) * 4)
    z, clip, cohort = 1.5, 0.2, 4
    quiet, _, _ = round_delta(dp(data, cohort=cohort, clip=clip, noise_multiplier=0.0, noise=placement),
                              data, data.client_ids)
    noisy, metrics, _ = round_delta(dp(data, cohort=cohort, clip=clip, noise_multiplier=z, noise=placement),
                                    data, data.client_ids)
    noise = (noisy - quiet).double()
    # noise of std z·C on the sum, then the division by the fixed denominator
    want = z * clip / cohort
    assert noise.numel() == D * C + C
    assert noise.std().item() == pytest.approx(want, rel=0.03)
    assert abs(noise.mean().item()) < 4 * want / math.sqrt(noise.numel())
    assert metrics["aggregator/dp/noise_stddev"] == pytest.approx(z * clip)
    # keyed by (seed, round): the same run draws the same noise
    again, _, _ = round_delta(dp(data, cohort=cohort, clip=clip, noise_multiplier=z, noise=placement),
                              data, data.client_ids)
    assert torch.equal(noisy, again)


def test_noise_before_is_drawn_per_client_before_the_codec():
    data = Blobs(sizes=(20,))
    fa = dp(data, cohort=1, clip=0.1, noise_multiplier=1.0, noise="before")
    stage = fa.aggregator.stages[0]
    assert isinstance(stage, DPClip) and stage.noise == "before"
    # the stage cannot draw without the per-client key DPFedAvg gives it
    with pytest.raises(ConfigError, match="per-client key"):
        stage.client({"threshold": 0.1}, {"w": torch.zeros(3)})
    got, metrics, _ = round_delta(fa, data, ["c0"])
    assert float(got.norm()) > 0.1 * 10  # nearly all noise: std 0.1 over 10,020 coordinates
    assert metrics["aggregator/dp/noise_stddev"] == pytest.approx(0.1)


# --------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------


def direct(event, relation, delta):
    return rdp.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(delta)


def test_epsilon_every_round_matches_dp_accounting_fixed_cohorts():
    data = Blobs(sizes=(20,) * 6)
    z, delta = 1.1, 1e-3
    fa = dp(data, cohort=3, clip=0.1, noise_multiplier=z, delta=delta)
    state = fa.init()
    for r in (1, 2, 3):
        state, metrics = fa.next(state, data, fa.sample(data.client_ids, r))
        # fixed cohorts: sampling without replacement, replace-one, sensitivity 2C
        want = direct(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
            6, 3, dpa.GaussianDpEvent(z / 2)), r), NeighboringRelation.REPLACE_ONE, delta)
        assert metrics["privacy/epsilon"] == want
        assert metrics["privacy/delta"] == delta and metrics["privacy/noise_multiplier"] == z


def test_epsilon_with_poisson_cohorts_and_adaptive_clipping_matches_dp_accounting():
    data = Blobs(sizes=(20,) * 16)
    z, sb, delta = 1.3, 0.4, 1e-3
    fa = dp(data, cohort=4, noise_multiplier=z, delta=delta, sampling="poisson",
            clip=AdaptiveNorm(0.1, 0.5, 0.2), clipped_count_stddev=sb)
    state = fa.init()
    for r in (1, 2):
        ids = fa.sample(data.client_ids, r)
        assert ids  # (an empty Poisson cohort cannot run; this seed draws none)
        state, metrics = fa.next(state, data, ids)
        # Poisson, add/remove one: the values' z and the ±1/2 count's 2σ_b, composed in each sample
        event = dpa.PoissonSampledDpEvent(4 / 16, dpa.ComposedDpEvent(
            [dpa.GaussianDpEvent(z), dpa.GaussianDpEvent(2 * sb)]))
        want = direct(dpa.SelfComposedDpEvent(event, r), NeighboringRelation.ADD_OR_REMOVE_ONE, delta)
        assert metrics["privacy/epsilon"] == want


def test_a_target_epsilon_gives_the_solved_noise_multiplier():
    data = Blobs(sizes=(20,) * 20)
    poisson = dict(sampling="poisson")  # (RDP of sampling without replacement is slower to solve for)
    fa = dp(data, cohort=3, clip=0.1, target_epsilon=2.0, rounds=2, **poisson)
    want = noise_for_epsilon(2.0, 2, 3, 20, 1e-3, **poisson)
    assert fa.noise_multiplier == want
    assert epsilon(want, 2, 3, 20, 1e-3, **poisson) <= 2.0
    assert epsilon(want * 0.99, 2, 3, 20, 1e-3, **poisson) > 2.0  # and not much more noise than needed
    state = fa.init()
    for _ in (1, 2):
        state, metrics = fa.next(state, data, ["c0", "c2", "c5"])
    assert metrics["privacy/epsilon"] == epsilon(want, 2, 3, 20, 1e-3, **poisson) <= 2.0
    # with adaptive clipping the count's noise is held fixed and accounted
    fa = dp(data, cohort=3, clip=AdaptiveNorm(0.1, 0.5, 0.2), target_epsilon=2.0, rounds=2,
            clipped_count_stddev=3.0, **poisson)
    z = fa.noise_multiplier
    assert z > want
    assert epsilon(z, 2, 3, 20, 1e-3, clipped_count_stddev=3.0, **poisson) <= 2.0
    assert epsilon(z * 0.99, 2, 3, 20, 1e-3, clipped_count_stddev=3.0, **poisson) > 2.0


# --------------------------------------------------------------------------
# Adaptive clipping
# --------------------------------------------------------------------------


def test_adaptive_clipping_moves_with_the_noised_count():
    data = Blobs(sizes=(20,) * 4)
    norm = AdaptiveNorm(initial_estimate=1e-4, target_quantile=0.5, learning_rate=0.2)
    # noise off: every norm is above the tiny estimate, so the fraction below is 0
    fa = dp(data, cohort=4, clip=norm, noise_multiplier=0.0, clipped_count_stddev=0.0)
    _, metrics, state = round_delta(fa, data, data.client_ids)
    assert metrics["aggregator/dp/below_fraction"] == 0.0
    assert fa.clip_norm(state) == pytest.approx(1e-4 * math.exp(0.2 * 0.5))
    # count noise on: the released fraction is noised, the step follows it
    fa = dp(data, cohort=4, clip=norm, noise_multiplier=1.0, clipped_count_stddev=1.0)
    _, metrics, state = round_delta(fa, data, data.client_ids)
    f = metrics["aggregator/dp/below_fraction"]
    assert f != 0.0
    assert fa.clip_norm(state) == pytest.approx(1e-4 * math.exp(-0.2 * (min(1, max(0, f)) - 0.5)))
    assert "aggregator/dp/clipped_count" not in metrics  # nothing unnoised about clients is released


# --------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(cohort=3, clip=0.1), "exactly one of"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, target_epsilon=1.0), "exactly one of"),
    (dict(cohort=3, clip=0.1, target_epsilon=1.0), "needs rounds"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, delta=None), "delta"),
    (dict(cohort=9, clip=0.1, noise_multiplier=1.0), "larger than population"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, accountant="pld"), "'poisson' only"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, noise="middle"), "noise must be"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, clipped_count_stddev=1.0), "adaptive clipping only"),
    (dict(cohort=3, clip=AdaptiveNorm(0.1, 0.5, 0.2), noise_multiplier=1.0, clipped_count_stddev=0.0),
     "clipped_count_stddev > 0"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, noise="before", weight_cap=10.0), "noise='after'"),
    (dict(cohort=3, clip=0.1, noise_multiplier=1.0, mean_weight=2.0), "at most 1"),
    (dict(cohort=3, clip=-1.0, noise_multiplier=1.0), "positive"),
])
def test_bad_settings_are_config_errors(kw, match):
    data = Blobs()
    with pytest.raises(ConfigError, match=match):
        dp(data, **kw)


def test_aggregators_it_cannot_privatize_are_refused():
    data = Blobs()
    with pytest.raises(ConfigError, match="plain mean"):
        dp(data, fedzip.clipping(fedzip.mean(), 1.0), cohort=3, noise_multiplier=1.0)
    from fedzip.robust import median

    with pytest.raises(ConfigError, match="plain mean"):
        dp(data, median(), cohort=3, noise_multiplier=1.0)
    ssq = SharedScaleQuantization(bits=8, bound=0.1)
    summable = fedzip.mean(CodecPolicy(codec=ssq, small=ssq), weighted=False)
    with pytest.raises(ConfigError, match="summable"):
        dp(data, summable, cohort=3, noise_multiplier=1.0)
    fa = dp(data, summable, cohort=3, clip=0.1, noise_multiplier=1.0, noise="before")
    assert fa.aggregator.accumulator_kind is None  # summed encoded: the server decodes only the sum


def test_rounds_that_break_the_accounting_assumptions_are_refused():
    data = Blobs(sizes=(20,) * 6)
    fa = dp(data, cohort=3, clip=0.1, noise_multiplier=1.0)
    state = fa.init()
    with pytest.raises(ConfigError, match="exactly 3"):
        fa.next(state, data, ["c0", "c1"])
    with pytest.raises(ConfigError, match="twice"):
        fa.next(state, data, ["c0", "c0", "c1"])
    fa = dp(data, cohort=3, clip=0.1, noise_multiplier=1.0, population=7)
    with pytest.raises(ConfigError, match="population=7"):
        fa.next(state, data, ["c0", "c1", "c2"])


def test_sampling():
    ids = [f"c{i}" for i in range(1000)]
    got = poisson_sample(ids, 0.1, 3, 0)
    assert got == poisson_sample(ids, 0.1, 3, 0) and got != poisson_sample(ids, 0.1, 4, 0)
    assert 60 < len(got) < 140
    data = Blobs(sizes=(20,) * 6)
    fa = dp(data, cohort=3, clip=0.1, noise_multiplier=1.0)
    assert fa.sample(data.client_ids, 5) == fedzip.sample_clients(data.client_ids, 3, 5, 0)


def test_config_names_it():
    cls, extra = build_algorithm_spec({"type": "dpfedavg", "population": 100, "cohort": 10, "delta": 1e-3,
                                       "noise_multiplier": 1.0, "clip": {"type": "adaptive",
                                                                         "initial_estimate": 0.1,
                                                                         "target_quantile": 0.5,
                                                                         "learning_rate": 0.2}})
    assert cls is DPFedAvg and extra["cohort"] == 10
    RunConfig(algorithm="dpfedavg:population=100,cohort=10,delta=0.001,noise_multiplier=1.0,clip=0.1")
    with pytest.raises(ConfigError, match="unknown argument"):
        build_algorithm_spec({"type": "dpfedavg", "sigma": 1.0})
    data = Blobs()
    fa = cls(task=TASK, client_optimizer=functools.partial(SGD, lr=0.1),
             server_optimizer=functools.partial(SGD, lr=1.0), **{**extra, "population": 6, "cohort": 3})
    assert isinstance(fa.clip, AdaptiveNorm) and fa.clipped_count_stddev == pytest.approx(0.15)
    _, metrics, _ = round_delta(fa, data, ["c0", "c1", "c2"])
    assert metrics["privacy/epsilon"] > 0


def test_noise_before_with_secure_aggregation():
    secagg = pytest.importorskip("fedzip.privacy.secagg")
    data = Blobs(sizes=(20,) * 6)
    agg = secagg.secure_mean(SharedScaleQuantization(bits=12, bound=0.2))
    z, clip = 0.5, 0.2
    quiet, _, _ = round_delta(dp(data, agg, cohort=6, clip=clip, noise_multiplier=0.0, noise="before"),
                              data, data.client_ids)
    noisy, metrics, _ = round_delta(dp(data, agg, cohort=6, clip=clip, noise_multiplier=z, noise="before"),
                                    data, data.client_ids)
    # six shares of std z·C/√6 sum to z·C, over the denominator 6 (plus the codec's own rounding)
    assert (noisy - quiet).double().std().item() == pytest.approx(z * clip / 6, rel=0.05)
    assert metrics["aggregator/secagg/survivors"] == 6


def test_a_run_config_runs_it(tmp_path):
    from types import SimpleNamespace

    from fedzip.run import run

    data = Blobs(sizes=(20,) * 6)
    config = RunConfig(
        algorithm={"type": "dpfedavg", "population": 6, "cohort": 3, "delta": 1e-3, "noise_multiplier": 1.0,
                   "clip": 0.1},
        aggregator={"type": "mean", "codec": {"type": "uniform", "bits": 4}, "threshold": 0},
        task="test_dp:TASK", rounds=2, clients_per_round=3, batch_size=20, client_lr=0.5)
    result = run(config, logdir=tmp_path, data=(data, data, SimpleNamespace(name="blobs", description="blobs", num_classes=C)),
                 console=False)
    eps = [m["privacy/epsilon"] for m in result.history]
    assert eps == [epsilon(1.0, r, 3, 6, 1e-3) for r in (1, 2)]
