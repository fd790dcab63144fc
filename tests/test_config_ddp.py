"""Distributed DP (Kairouz, Liu, Steinke, ICML 2021; Agarwal, Kairouz, Liu,
NeurIPS 2021) named in a config: ``{"type": "distributed_dp", ...}`` builds
what :func:`fedzip.privacy.ddp.distributed_dp` builds, and every bad field
is one ConfigError naming it."""

from __future__ import annotations

import pytest
import torch
from fakes import TensorClients, deterministic, run_rounds, small_fedavg

from fedzip.config import DISTRIBUTED_DP_FIELDS, RunConfig, build_aggregator
from fedzip.errors import ConfigError
from fedzip.privacy.ddp import distributed_dp
from fedzip.seeding import torch_rng

DELTA = 1 / 6
BASE = {"type": "distributed_dp", "noise_multiplier": 0.8, "clip": 0.5, "cohort": 3, "bits": 16, "gamma": 300.0,
        "population": 6, "delta": DELTA}


def _one_round(aggregator):
    data = TensorClients(n_clients=6, per_client=16)
    state, history = run_rounds(small_fedavg(aggregator, seed=3), data, rounds=1, per_round=3, seed=3)
    return state, history[0]


@pytest.mark.parametrize(("mechanism", "secure"), [("ddg", False), ("skellam", False), ("ddg", True)])
def test_a_config_built_aggregator_is_the_python_one_bit_for_bit(mechanism, secure):
    spec = {**BASE, "mechanism": mechanism, "secure": secure, "seed": 5}
    from_config = build_aggregator(RunConfig(aggregator=spec).aggregator)
    by_hand = distributed_dp(0.8, 0.5, 3, bits=16, gamma=300.0, mechanism=mechanism, secure=secure, seed=5,
                             population=6, delta=DELTA)
    (state_c, metrics_c), (state_h, metrics_h) = _one_round(from_config), _one_round(by_hand)
    assert all(torch.equal(state_c.params[k], state_h.params[k]) for k in state_h.params)
    assert deterministic(metrics_c) == deterministic(metrics_h)
    assert metrics_c["aggregator/ddp/bits"] == 16 and metrics_c["aggregator/ddp/epsilon"] > 0
    assert metrics_c["aggregator/ddp/gamma"] == 300.0


def test_gamma_may_be_chosen_from_the_model_size():
    spec = {k: v for k, v in BASE.items() if k != "gamma"}
    agg = build_aggregator({**spec, "dim": 5000})
    ref = distributed_dp(0.8, 0.5, 3, bits=16, dim=5000, population=6, delta=DELTA)
    assert agg.policy.codec.gamma == ref.policy.codec.gamma


def test_the_rotation_seed_defaults_to_zero_and_the_run_seed_keys_the_noise():
    codec = build_aggregator(BASE).policy.codec
    assert codec.seed == 0
    x = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 0.01
    # a client's generator is keyed by (run seed, round, client, "codec"), as ClientWork draws it
    same = [codec.encode(x, torch_rng(seed, 1, "c0", "codec")) for seed in (0, 0, 1)]
    assert same[0] == same[1] != same[2]


@pytest.mark.parametrize(("change", "field"), [
    ({"bits": 1}, "bits"),
    ({"bits": 16.5}, "bits"),
    ({"gamma": -1.0}, "gamma"),
    ({"noise_multiplier": -0.1}, "noise_multiplier"),
    ({"clip": 0}, "clip"),
    ({"cohort": 0}, "cohort"),
    ({"mechanism": "laplace"}, "mechanism"),
    ({"sampling": "shuffled"}, "sampling"),
    ({"seed": -1}, "seed"),
    ({"beta": 1.0}, "beta"),
    ({"delta": 1.5}, "delta"),
    ({"delta": 0}, "delta"),
    ({"population": 0}, "population"),
    ({"secure": "yes"}, "secure"),
    ({"secure": True, "threshold": 0}, "threshold"),
    ({"noise": 1.0}, "noise"),                       # unknown: a typo of noise_multiplier
    ({"noise_multiplier": None}, "noise_multiplier"),
])
def test_a_bad_field_is_one_config_error_naming_it(change, field):
    spec = {**BASE, **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ConfigError, match=field):
        RunConfig(aggregator=spec)


@pytest.mark.parametrize("missing", ["noise_multiplier", "clip", "cohort"])
def test_a_missing_required_field_is_named(missing):
    with pytest.raises(ConfigError, match=f"needs.*{missing}"):
        RunConfig(aggregator={k: v for k, v in BASE.items() if k != missing})


def test_population_and_delta_come_together_and_gamma_or_dim_is_needed():
    with pytest.raises(ConfigError, match="population and delta"):
        build_aggregator({k: v for k, v in BASE.items() if k != "delta"})
    with pytest.raises(ConfigError, match="gamma, or dim"):
        build_aggregator({k: v for k, v in BASE.items() if k != "gamma"})
    with pytest.raises(ConfigError, match="distributed_dp"):
        build_aggregator({"type": "distributed_dpp"})  # the list of types names it


def test_null_is_the_default_where_the_function_defaults_to_none():
    spec = {**BASE, "population": None, "delta": None, "neighbours": None, "k_stddevs": None}
    assert build_aggregator(spec).stages[-1].population is None


def test_every_field_is_an_argument_of_the_function():
    import inspect

    assert set(DISTRIBUTED_DP_FIELDS) == set(inspect.signature(distributed_dp).parameters)
