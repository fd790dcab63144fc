"""fedzip.privacy.accounting against dp_accounting called directly."""

import math

import dp_accounting as dpa
import pytest
from dp_accounting import NeighboringRelation, pld, rdp

from fedzip.errors import ConfigError
from fedzip.privacy.accounting import (
    dp_event,
    effective_noise_multiplier,
    epsilon,
    noise_for_epsilon,
)

DELTA = 1e-5


def direct(event, relation=NeighboringRelation.ADD_OR_REMOVE_ONE, accountant="rdp"):
    acc = (rdp.RdpAccountant(neighboring_relation=relation) if accountant == "rdp"
           else pld.PLDAccountant(relation))
    return acc.compose(event).get_epsilon(DELTA)


def test_fixed_cohorts_are_sampling_without_replacement_under_replace_one():
    # replace one client: the clipped sum moves by up to 2C, so the event's multiplier is z/2
    want = direct(dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(1000, 20, dpa.GaussianDpEvent(1.2 / 2)), 50),
        NeighboringRelation.REPLACE_ONE)
    assert epsilon(1.2, 50, 20, 1000, DELTA, sampling="fixed") == want


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_cohorts_under_add_remove(accountant):
    want = direct(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(20 / 1000, dpa.GaussianDpEvent(1.2)), 50),
                  accountant=accountant)
    assert epsilon(1.2, 50, 20, 1000, DELTA, sampling="poisson", accountant=accountant) == want


def test_full_participation_is_the_plain_gaussian_mechanism():
    z, rounds = 2.0, 10
    add_remove = direct(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), rounds))
    replace = direct(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / 2), rounds))
    assert epsilon(z, rounds, 100, 100, DELTA, sampling="poisson") == pytest.approx(add_remove, rel=1e-9)
    assert epsilon(z, rounds, 100, 100, DELTA, sampling="fixed") == pytest.approx(replace, rel=1e-9)


def test_adaptive_clipping_composes_the_clipped_count_query():
    z, sb = 1.0, 0.5  # TFF's default count stddev: 0.05 × 10 clients
    # Poisson / add-remove: the ±1/2 indicator has sensitivity 1/2, multiplier 2σ_b
    composed = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
        0.01, dpa.ComposedDpEvent([dpa.GaussianDpEvent(z), dpa.GaussianDpEvent(2 * sb)])), 100)
    got = epsilon(z, 100, 10, 1000, DELTA, sampling="poisson", clipped_count_stddev=sb)
    assert got == direct(composed)
    assert got > epsilon(z, 100, 10, 1000, DELTA, sampling="poisson")
    # PLD takes one Gaussian per sampled event: Andrew et al.'s effective multiplier
    z_eff = (z**-2 + (2 * sb) ** -2) ** -0.5
    assert effective_noise_multiplier(z, 2 * sb) == pytest.approx(z_eff)
    merged = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(z_eff)), 100)
    assert epsilon(z, 100, 10, 1000, DELTA, sampling="poisson", accountant="pld",
                   clipped_count_stddev=sb) == direct(merged, accountant="pld")
    # ... which is the same mechanism: RDP gives the same ε either way
    assert direct(merged) == pytest.approx(direct(composed), rel=1e-9)
    # fixed / replace-one: sensitivities 2C and 1
    wor = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
        1000, 10, dpa.ComposedDpEvent([dpa.GaussianDpEvent(z / 2), dpa.GaussianDpEvent(sb)])), 100)
    assert epsilon(z, 100, 10, 1000, DELTA, clipped_count_stddev=sb) == direct(
        wor, NeighboringRelation.REPLACE_ONE)


def test_dp_event_is_the_event_accounted():
    ev = dp_event(1.5, 7, 10, 500, sampling="poisson")
    assert ev == dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(10 / 500, dpa.GaussianDpEvent(1.5)), 7)


@pytest.mark.parametrize("sampling, accountant, rounds, target", [
    ("fixed", "rdp", 100, 0.8), ("fixed", "rdp", 100, 4.0),
    ("poisson", "rdp", 100, 0.8), ("poisson", "rdp", 100, 4.0),
    ("poisson", "pld", 50, 1.0),  # PLD composes numerically: one, cheaper, case
])
def test_noise_for_epsilon_round_trips(sampling, accountant, rounds, target):
    kw = dict(sampling=sampling, accountant=accountant)
    z = noise_for_epsilon(target, rounds, 10, 1000, DELTA, **kw)
    eps = epsilon(z, rounds, 10, 1000, DELTA, **kw)
    assert eps <= target and eps == pytest.approx(target, rel=1e-3)
    # and it is the smallest such multiplier: a little less noise overspends
    assert epsilon(z * 0.99, rounds, 10, 1000, DELTA, **kw) > target


def test_noise_for_epsilon_with_a_clipped_count_query():
    z = noise_for_epsilon(3.0, 50, 10, 1000, DELTA, sampling="poisson", clipped_count_stddev=1.0)
    assert epsilon(z, 50, 10, 1000, DELTA, sampling="poisson", clipped_count_stddev=1.0) == pytest.approx(
        3.0, rel=1e-3)
    assert z > noise_for_epsilon(3.0, 50, 10, 1000, DELTA, sampling="poisson")
    # the count alone spends more than this target: no value multiplier helps
    with pytest.raises(ConfigError, match="clipped-count"):
        noise_for_epsilon(0.05, 50, 10, 1000, DELTA, sampling="poisson", clipped_count_stddev=0.1)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_epsilon_falls_with_noise_and_grows_with_rounds(sampling):
    by_noise = [epsilon(z, 50, 10, 1000, DELTA, sampling=sampling) for z in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    by_rounds = [epsilon(1.0, r, 10, 1000, DELTA, sampling=sampling) for r in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=-1e-5), "delta"),
    (dict(delta=math.nan), "delta"),
    (dict(cohort=1001), "cohort=1001 is larger than population=1000"),
    (dict(cohort=0), "cohort"),
    (dict(rounds=0), "rounds"),
    (dict(rounds=2.5), "rounds"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(sampling="shuffle"), "sampling"),
    (dict(accountant="moments"), "accountant"),
    (dict(sampling="fixed", accountant="pld"), "poisson"),
    (dict(clipped_count_stddev=-1.0), "clipped_count_stddev"),
])
def test_bad_inputs_are_config_errors(kwargs, match):
    args = dict(noise_multiplier=1.0, rounds=10, cohort=10, population=1000, delta=DELTA)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        epsilon(**args)
    if "noise_multiplier" not in kwargs:
        args.pop("noise_multiplier")
        with pytest.raises(ConfigError, match=match):
            noise_for_epsilon(1.0, **args)
