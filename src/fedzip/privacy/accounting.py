"""Privacy accounting for DP federated averaging, over Google's ``dp_accounting``.

No accounting math lives here: each function builds the ``DpEvent`` for what a
run actually does and hands it to ``dp_accounting``'s RDP accountant (Mironov,
"Rényi Differential Privacy", CSF 2017) or PLD accountant (Koskela, Jälkö,
Honkela, AISTATS 2020; Google's "Connect the Dots", PoPETs 2022).

The mechanism, per round: a cohort of clients is sampled from a population,
each client's update is clipped to L2 norm C, the server sums them and adds
Gaussian noise of standard deviation ``noise_multiplier · C`` (DP-FedAvg,
McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018). The privacy unit is one client (all its data).
Rounds sample afresh and compose (``SelfComposedDpEvent``).

Sampling, and the neighbouring relation that goes with it:

* ``"fixed"`` (fedzip's :func:`~fedzip.sample_clients`: exactly ``cohort``
  distinct clients, uniformly, each round): ``SampledWithoutReplacementDpEvent``
  under *replace one client* (the population size is public). dp_accounting
  supports this event only with the RDP accountant and only under that
  relation (Wang, Balle, Kasiviswanathan, "Subsampled Rényi Differential
  Privacy and Analytical Moments Accountant", AISTATS 2019). Replacing one
  client's clipped update by another moves the sum by up to 2C, so the
  Gaussian event's multiplier is ``noise_multiplier / 2``.
* ``"poisson"`` (each client joins independently with probability
  ``cohort / population``; ``cohort`` is then the expected size):
  ``PoissonSampledDpEvent`` under *add or remove one client*, sensitivity C.
  RDP and PLD both support it.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021) also releases a noised
count of clients whose norm was below the estimate: each client contributes an
indicator shifted to ±1/2 and the sum gets noise of std
``clipped_count_stddev``. That is a second Gaussian query on the same cohort,
composed with the first inside the sampling event, as TFF's accounting does;
its multiplier is ``clipped_count_stddev / (1/2)`` under add/remove and
``clipped_count_stddev / 1`` under replace-one. The PLD accountant takes one
Gaussian per sampled event, so there the two are merged into Andrew et al.'s
effective multiplier ``(z_sum^-2 + z_count^-2)^-1/2`` (:func:`effective_noise_multiplier`),
which is exact: two Gaussian queries on the same sample are one Gaussian
query whose squared sensitivity-to-noise ratios add.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import dp_accounting
from dp_accounting import NeighboringRelation, mechanism_calibration, pld, rdp

from fedzip.errors import ConfigError

Sampling = Literal["fixed", "poisson"]
Accountant = Literal["rdp", "pld"]


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_run(rounds: int, cohort: int, population: int, sampling: str, accountant: str) -> None:
    _count("rounds", rounds)
    _count("cohort", cohort)
    _count("population", population)
    if cohort > population:
        raise ConfigError(f"cohort={cohort} is larger than population={population}")
    if sampling not in ("fixed", "poisson"):
        raise ConfigError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")
    if accountant not in ("rdp", "pld"):
        raise ConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    if accountant == "pld" and sampling == "fixed":
        raise ConfigError(
            "accountant='pld' supports sampling='poisson' only: dp_accounting's PLD accountant "
            "has no sampling-without-replacement event; use accountant='rdp' for fixed cohorts"
        )


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_count_stddev(clipped_count_stddev: float | None) -> float | None:
    return None if clipped_count_stddev is None else _positive("clipped_count_stddev", clipped_count_stddev)


# --------------------------------------------------------------------------
# Events and accountants
# --------------------------------------------------------------------------


def effective_noise_multiplier(noise_multiplier: float, clipped_count_multiplier: float) -> float:
    """One Gaussian query equivalent to two on the same sample (Andrew et al.,
    NeurIPS 2021): ``(z_1^-2 + z_2^-2)^-1/2``. TFF uses the inverse of this to
    split a total multiplier between the value and the clipped-count queries."""
    z1 = _positive("noise_multiplier", noise_multiplier)
    z2 = _positive("clipped_count_multiplier", clipped_count_multiplier)
    return (z1**-2 + z2**-2) ** -0.5


def _round_mechanism(noise_multiplier: float, sampling: str, accountant: str,
                     clipped_count_stddev: float | None) -> dp_accounting.DpEvent:
    """The Gaussian query(ies) one round releases, in multipliers of the sensitivity
    under the sampling's neighbouring relation."""
    replace_one = sampling == "fixed"
    z_sum = noise_multiplier / 2 if replace_one else noise_multiplier  # sensitivity 2C vs C
    if clipped_count_stddev is None:
        return dp_accounting.GaussianDpEvent(z_sum)
    # indicator − 1/2 per client: sensitivity 1 (replace one) or 1/2 (add/remove one)
    z_count = clipped_count_stddev if replace_one else 2 * clipped_count_stddev
    if accountant == "pld":
        return dp_accounting.GaussianDpEvent(effective_noise_multiplier(z_sum, z_count))
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_sum), dp_accounting.GaussianDpEvent(z_count)]
    )


def dp_event(
    noise_multiplier: float,
    rounds: int,
    cohort: int,
    population: int,
    *,
    sampling: Sampling = "fixed",
    accountant: Accountant = "rdp",
    clipped_count_stddev: float | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``rounds`` rounds of DP-FedAvg, as :func:`epsilon`
    accounts it (see the module docstring for the assumptions). Compose it
    with other events in your own accountant if the run does more."""
    _positive("noise_multiplier", noise_multiplier)
    _check_run(rounds, cohort, population, sampling, accountant)
    mechanism = _round_mechanism(noise_multiplier, sampling, accountant, _check_count_stddev(clipped_count_stddev))
    if sampling == "fixed":
        sampled: dp_accounting.DpEvent = dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=population, sample_size=cohort, event=mechanism)
    else:
        sampled = dp_accounting.PoissonSampledDpEvent(sampling_probability=cohort / population, event=mechanism)
    return dp_accounting.SelfComposedDpEvent(sampled, rounds)


def _accountant_factory(sampling: str, accountant: str) -> Callable[[], dp_accounting.PrivacyAccountant]:
    if accountant == "pld":
        return lambda: pld.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    relation = NeighboringRelation.REPLACE_ONE if sampling == "fixed" else NeighboringRelation.ADD_OR_REMOVE_ONE
    return lambda: rdp.RdpAccountant(neighboring_relation=relation)


# --------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------


def epsilon(
    noise_multiplier: float,
    rounds: int,
    cohort: int,
    population: int,
    delta: float,
    *,
    sampling: Sampling = "fixed",
    accountant: Accountant = "rdp",
    clipped_count_stddev: float | None = None,
) -> float:
    """ε of ``rounds`` rounds of DP-FedAvg at ``delta``, per client.

    Args:
        noise_multiplier: z, the std of the noise on the sum of clipped
            updates divided by the clipping norm C.
        rounds: how many rounds were run (each samples a fresh cohort).
        cohort: clients per round (``"poisson"``: the expected number).
        population: how many clients the cohort is drawn from.
        delta: in (0, 1); usually below 1/population.
        sampling: ``"fixed"`` (uniform without replacement; replace-one
            neighbours) or ``"poisson"`` (add/remove-one neighbours).
        accountant: ``"rdp"`` or ``"pld"`` (PLD is tighter; Poisson only).
        clipped_count_stddev: with adaptive clipping, the noise std of the
            clipped-count query (Andrew et al., NeurIPS 2021); composed in.
    """
    delta = _check_delta(delta)
    event = dp_event(noise_multiplier, rounds, cohort, population, sampling=sampling,
                     accountant=accountant, clipped_count_stddev=clipped_count_stddev)
    acc = _accountant_factory(sampling, accountant)()
    return float(acc.compose(event).get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    cohort: int,
    population: int,
    delta: float,
    *,
    sampling: Sampling = "fixed",
    accountant: Accountant = "rdp",
    clipped_count_stddev: float | None = None,
    tol: float = 1e-5,
) -> float:
    """The smallest noise multiplier z (within ``tol``) whose :func:`epsilon`
    is at most ``target_epsilon``, with the same assumptions and arguments.

    Solved by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over
    fresh accountants), inside a bracket found by doubling; the value returned
    always meets the target. With ``clipped_count_stddev``, z is the value
    query's multiplier, the count's noise held fixed; a target the count alone
    exceeds is a :class:`ConfigError`.
    """
    target = _positive("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    _check_run(rounds, cohort, population, sampling, accountant)
    count_std = _check_count_stddev(clipped_count_stddev)
    tol = _positive("tol", tol)
    make_accountant = _accountant_factory(sampling, accountant)

    def make_event(z: float) -> dp_accounting.DpEvent:
        return dp_event(z, rounds, cohort, population, sampling=sampling, accountant=accountant,
                        clipped_count_stddev=count_std)

    @functools.cache  # the bracket search revisits its ends
    def gap(z: float) -> float:
        return make_accountant().compose(make_event(z)).get_epsilon(delta) - target

    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
        if hi > 2.0**30:
            why = " (the clipped-count query alone spends more)" if count_std is not None else ""
            raise ConfigError(f"no noise multiplier reaches epsilon={target_epsilon!r}{why}")
    lo = hi / 2
    while gap(lo) <= 0:  # ε already below target: less noise would do
        hi, lo = lo, lo / 2
        if lo < tol:
            return hi
    while not math.isfinite(gap(lo)):  # brentq needs finite ends
        lo = (lo + hi) / 2
    return float(mechanism_calibration.calibrate_dp_mechanism(
        make_accountant, make_event, target, delta,
        mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=tol,
    ))


__all__ = ["dp_event", "effective_noise_multiplier", "epsilon", "noise_for_epsilon"]
