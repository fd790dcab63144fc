"""Central DP-FedAvg: per-client clipping, Gaussian noise on the sum, and
privacy accounting every round.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018), with adaptive clipping from Andrew, Thakkar,
McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021). The privacy unit is one client (all its data). Each round:

1. a cohort is sampled from a population of ``population`` clients: exactly
   ``cohort`` distinct clients, uniformly (``sampling="fixed"``, what
   :func:`fedzip.sample_clients` and ``fedzip.run`` do), or each client with
   probability ``cohort / population`` (``sampling="poisson"``, see
   :meth:`DPFedAvg.sample`);
2. each client's model delta is L2-clipped to ``C`` (fixed, or adaptive: ``C``
   tracks a quantile of the clients' norms);
3. the server sums the clipped deltas, adds Gaussian noise of standard
   deviation ``σ = z·C`` once to the sum (``z`` the noise multiplier), and
   divides by a **fixed denominator**, the expected cohort size (never the
   number of clients that reported: that number depends on who took part);
4. the server optimizer steps on minus that mean (SGD lr 1.0 is DP-FedAvg;
   any server optimizer is post-processing).

Bounded contributions. Example weights are ignored (``mean(weighted=False)``):
every client adds one clipped update, so one client moves the sum by at most
``C``. With ``weight_cap=ŵ``, McMahan et al.'s capped weights: client ``k``
counts ``w_k = min(n_k/ŵ, 1)`` (``n_k`` its reported weight; a client that
lies is still capped at 1), the sum is ``Σ w_k·clip(Δ_k)`` (sensitivity still
``C``) and the denominator is ``cohort × mean_weight`` with ``mean_weight`` the
population's mean of ``w_k``, which the server must know (it is not learned
from the round, which would spend privacy).

Adaptive clipping (``clip=AdaptiveNorm(...)``): each client reports whether
its norm was at most the current estimate; the server sums the indicators
shifted to ``±1/2``, adds Gaussian noise of std ``clipped_count_stddev``
(default ``0.05 × cohort``, TFF's), divides by the expected cohort and moves
the estimate geometrically (:class:`~fedzip.aggregators.AdaptiveNorm`). The
noise on the values is ``z`` times the clip norm of the round. The count is a
second Gaussian query on the same sample and is accounted
(:func:`fedzip.privacy.accounting.epsilon`'s ``clipped_count_stddev``).

Accounting. Every round's metrics hold ``privacy/epsilon``: ε after the rounds
run so far at ``delta``, for the sampling declared, from Google's
``dp_accounting`` (RDP by default; PLD with Poisson sampling). Give
``noise_multiplier``, or ``target_epsilon`` with the number of ``rounds``
planned and the multiplier is solved for
(:func:`~fedzip.privacy.accounting.noise_for_epsilon`); ε passes the target
after more rounds than planned. ``noise_multiplier=0`` turns noise off
(ε = inf). The round checks what the accounting assumes and can see: the data
has ``population`` clients, a fixed cohort has exactly ``cohort`` of them,
and no client appears twice. An empty Poisson cohort cannot be run (the
round needs a client); skipping it only overstates ε.

Where the noise goes, and codecs (``noise=``):

* ``"after"`` (default): the codec encodes each clipped delta; the server
  decodes each one, **clips it again to C** (an unbiased quantizer's
  decoded vector can be longer than what it encoded, and the sensitivity is
  about what is summed), sums, and adds the noise to the decoded sum
  (:class:`~fedzip.aggregators.GaussianNoise`'s draw, keyed by (seed, round,
  stage)). The guarantee then holds for every codec decoded per client, and
  compression only adds error. Secure-aggregation policies (every codec a
  :class:`~fedzip.codecs.summable.SummableCodec`, summed encoded) are refused:
  the server cannot re-clip what it never decodes.
* ``"before"``: each client adds its share of the noise, std ``z·C/√cohort``,
  to its clipped delta *before* encoding (drawn from a generator keyed by
  (seed, round, client)); the server adds none. The sum of ``cohort`` shares
  has std ``z·C``. Consequences: compression error then adds to the noise
  and counts for nothing in the accounting; ε is the accounting of the
  *sum* of the noised deltas, so it holds only where the server learns just
  that sum (secure aggregation) and the release is a post-processing of it:
  with float32 (or any deterministic linear codec) exactly; with a lossy,
  randomized codec each client's encoding is a function of its own noised
  delta, whose noise is only ``z/√cohort``, and the central ε is not a proof
  (distributed discrete noise on the integer encodings, as in Kairouz, Liu,
  Steinke, ICML 2021, is). ``aggregator=secure_mean(...)``
  (:mod:`fedzip.privacy.secagg`) gives the sum-only view. With Poisson sampling or client failures fewer
  shares land in the sum than planned. Capped weights are refused here
  (they would scale the shares down).

Not private: the round's ``train/*`` metrics (losses and counts summed from
the clients), the bits of variable-length codecs, and client failures are
released as measured; ε covers the model and the aggregator's measurements
(``clipping_norm`` and the noised ``below_fraction``). In simulation every
noise draw is keyed by the run's seed, so anyone holding the seed can redraw
it: the keyed randomness is for reproducible research, not for deployment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedzip import tree
from fedzip.aggregators import (
    AdaptiveNorm,
    Aggregate,
    Aggregator,
    FixedNorm,
    GaussianNoise,
    Stage,
    StreamingMean,
    mean,
)
from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.client import ClientResult, ClientTask, ClientWork
from fedzip.algorithms.state import ServerState
from fedzip.data.federated import FederatedData
from fedzip.errors import ConfigError, PayloadError
from fedzip.seeding import derive_seed, numpy_rng, sample_clients

NOISE_PLACEMENTS = ("after", "before")


# --------------------------------------------------------------------------
# The stage: clip on the client, noise and a fixed denominator on the server
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DPClip(Stage):
    """DP-FedAvg's query as a stage (innermost: the last thing before the codec).

    Client: L2-clip to the round's threshold; with ``noise="before"`` add a
    noise share of std ``noise_multiplier · threshold / √cohort`` (needs
    ``noise_seed``, set per client by :class:`DPFedAvg`); with an adaptive
    norm report ``below`` (norm ≤ estimate, clamped to [0, 1]).

    Server: with ``noise="after"`` add noise of std ``noise_multiplier ·
    threshold`` to the sum (:class:`GaussianNoise`'s draw); set the weight
    sum to ``denominator`` (so the mean is sum / denominator); move an
    adaptive norm with the noised ``below`` count. Measurements:
    ``clipping_norm``, ``noise_stddev`` (on the sum), and, adaptive,
    ``below_fraction`` (noised).
    """

    norm: FixedNorm | AdaptiveNorm
    noise_multiplier: float
    denominator: float
    cohort: float
    clipped_count_stddev: float = 0.0
    noise: str = "after"
    key: str = "dp"
    noise_seed: int | None = None

    report_bounds = {"below": (0.0, 1.0)}

    def init(self) -> dict[str, float]:
        return self.norm.init()

    def broadcast(self, state: Mapping[str, float]) -> dict[str, float]:
        out = {"threshold": self.norm.threshold(state)}
        if isinstance(self.norm, AdaptiveNorm):
            out["estimate"] = self.norm.estimate(state)
        return out

    def client(self, scalars, update):
        bound = scalars["threshold"]
        norm = tree.global_norm(update, 2.0)
        if math.isfinite(norm) and norm > bound:
            update = tree.scale(update, bound / norm)
        report = {}
        if "estimate" in scalars:
            report["below"] = float(math.isfinite(norm) and norm <= scalars["estimate"])
        if self.noise == "before" and self.noise_multiplier > 0:
            if self.noise_seed is None:
                raise ConfigError("noise='before' draws each client's noise from a per-client key; "
                                  "run the stage through DPFedAvg, which sets it")
            g = torch.Generator().manual_seed(self.noise_seed)
            std = self.noise_multiplier * bound / math.sqrt(self.cohort)
            update = {k: v + (torch.randn(v.shape, generator=g, dtype=torch.float64) * std).to(v.dtype)
                      for k, v in update.items()}
        return update, report

    def server(self, state, aggregate, reports, rng):
        bound = self.norm.threshold(state)
        stddev = self.noise_multiplier * bound
        meas = {"clipping_norm": bound, "noise_stddev": stddev}
        if self.noise == "after" and stddev > 0:
            aggregate = GaussianNoise(stddev, self.key).server({}, aggregate, {}, rng)[0]
        new_state = dict(state)
        if isinstance(self.norm, AdaptiveNorm):
            # Σ (indicator − 1/2) plus noise: sensitivity 1/2 (add/remove one client)
            centered = reports.get("below", 0.0) - aggregate.count / 2
            if self.clipped_count_stddev > 0:
                centered += float(torch.randn((), generator=rng, dtype=torch.float64)) * self.clipped_count_stddev
            fraction = centered / self.cohort + 0.5
            new_state = self.norm.update(state, fraction)
            meas["below_fraction"] = fraction
        return Aggregate(aggregate.sums, float(self.denominator), aggregate.count), new_state, meas


# --------------------------------------------------------------------------
# The server's sum: each decoded update clipped again, weights capped
# --------------------------------------------------------------------------


class RoundBound:
    """The clip norm of the round being run (:meth:`DPFedAvg.next` sets it
    from the state before the round's accumulator is built)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)


@dataclass(frozen=True, eq=False)
class ServerClip:
    """Accumulator kind (``Aggregator.accumulator_kind``) of :class:`ClippedSum`."""

    bound: RoundBound
    weight_cap: float | None = None

    def __call__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]
                 ) -> ClippedSum:
        return ClippedSum(aggregator, template, self.bound.value, self.weight_cap)


class ClippedSum(StreamingMean):
    """:class:`~fedzip.aggregators.StreamingMean` for DP: each decoded update is
    clipped to ``bound`` (None: not) and counts with weight 1, or with
    ``min(weight / weight_cap, 1)`` when capped. Memory O(model).
    ``reclipped`` counts the updates the server had to shorten (a measure of
    the codec's norm inflation; not released: it is not private)."""

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]],
                 bound: float | None, weight_cap: float | None = None):
        super().__init__(aggregator, template)
        self.bound = bound
        self.weight_cap = weight_cap
        self.reclipped = 0

    def fold(self, tensors, weight, coverage=None):
        if coverage is not None:  # (before decoding: nothing to decode for a refused update)
            raise PayloadError("DP-FedAvg needs whole updates; it cannot take per-coordinate coverage")
        self.fold_decoded(self.decode_update(tensors), weight)

    def fold_decoded(self, update, weight, coverage=None):
        if coverage is not None:
            raise PayloadError("DP-FedAvg needs whole updates; it cannot take per-coordinate coverage")
        if not math.isfinite(weight) or weight < 0:
            raise PayloadError(f"update weight {weight!r} must be a finite non-negative number")
        if sorted(update) != sorted(self.sums) or any(
                tuple(update[k].shape) != tuple(v.shape) for k, v in self.sums.items()):
            raise PayloadError("a decoded update does not match the model's tensors")
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
        if not math.isfinite(norm):
            raise PayloadError("a decoded update holds NaN or Inf")
        w = 1.0 if self.weight_cap is None else min(weight / self.weight_cap, 1.0)
        factor = 1.0
        if self.bound is not None and norm > self.bound:
            factor = self.bound / norm
            self.reclipped += 1
        for k, v in update.items():
            self.sums[k].add_(v, alpha=w * factor)  # float32 into float64 in place
        self.weight_sum += w
        self.count += 1


# --------------------------------------------------------------------------
# Client work with a per-client noise key (noise="before")
# --------------------------------------------------------------------------


class _KeyedNoiseWork(ClientWork):
    """ClientWork whose :class:`DPClip` stage gets the client's noise key, so a
    client-side noise share is drawn from (seed, round, client) and repeats."""

    def __call__(self, data: FederatedData, task: ClientTask) -> ClientResult:
        self.model()
        self.receive(task.broadcast)  # cached here, shared with the per-client copy
        key = derive_seed(self.seed, task.round, task.client_id, "dp_noise")
        work = object.__new__(ClientWork)
        work.__dict__.update(self.__dict__)
        work.aggregator = replace(self.aggregator, stages=tuple(
            replace(s, noise_seed=key) if isinstance(s, DPClip) else s for s in self.aggregator.stages))
        return ClientWork.__call__(work, data, task)


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def poisson_sample(client_ids: Sequence[str], rate: float, round_num: int, seed: int) -> list[str]:
    """Each client independently with probability ``rate``, a function of
    (seed, round) alone; the order is ``client_ids``'s. May be empty."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1], got {rate!r}")
    keep = numpy_rng(seed, round_num, "poisson_sample").random(len(client_ids)) < rate
    return [cid for cid, k in zip(client_ids, keep, strict=True) if k]


# --------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------


def _as_clip(clip: Any) -> FixedNorm | AdaptiveNorm:
    if isinstance(clip, (FixedNorm, AdaptiveNorm)):
        return clip
    if isinstance(clip, Mapping):
        opts = dict(clip)
        kind = opts.pop("type", "adaptive")
        try:
            if kind == "adaptive":
                return AdaptiveNorm(**opts)
            if kind == "fixed":
                return FixedNorm(**opts)
        except TypeError as e:
            raise ConfigError(f"dpfedavg clip {dict(clip)!r}: {e}") from None
        raise ConfigError(f"dpfedavg clip: type must be 'adaptive' or 'fixed', got {kind!r}")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return FixedNorm(float(clip))
    raise ConfigError(f"dpfedavg clip must be a number, FixedNorm, AdaptiveNorm or a dict, got {clip!r}")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dpfedavg {name} must be a positive integer, got {value!r}")
    return value


def _number(name: str, value: Any, low: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ConfigError(f"dpfedavg {name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


class DPFedAvg(FederatedAlgorithm):
    """DP-FedAvg (see the module doc). The other arguments are
    :class:`~fedzip.algorithms.base.FederatedAlgorithm`'s; ``aggregator`` is the
    mean to privatize: ``mean(codec)`` without stages (its ``weighted`` is
    replaced: DP counts clients, not examples).

    Args:
        population: clients the cohorts are drawn from (the data's client count).
        cohort: clients per round (``"poisson"``: the expected number); also
            the fixed denominator.
        delta: δ of the reported ε, in (0, 1) (usually below 1/population).
        clip: the clip norm C: a number, :class:`~fedzip.FixedNorm`,
            :class:`~fedzip.AdaptiveNorm`, or a dict (``{"type": "adaptive",
            "initial_estimate": ..., "target_quantile": ..., "learning_rate": ...}``).
        noise_multiplier: z, noise std on the sum over C (0: no noise).
        target_epsilon: instead of z: the ε to reach after ``rounds`` rounds.
        rounds: rounds planned (needed with ``target_epsilon``).
        clipped_count_stddev: adaptive clipping's count noise (default 0.05 × cohort).
        sampling: ``"fixed"`` or ``"poisson"`` (see :meth:`sample`).
        accountant: ``"rdp"`` or ``"pld"`` (Poisson only).
        noise: ``"after"`` (server, on the decoded sum) or ``"before"`` (client shares, before the codec).
        weight_cap: capped example weights ``min(n_k/weight_cap, 1)`` (None: every client 1).
        mean_weight: the population's mean capped weight (the denominator is
            ``cohort × mean_weight``).
    """

    name = "dpfedavg"

    def __init__(
        self,
        model_fn: Any = None,
        client_optimizer: Any = None,
        server_optimizer: Any = None,
        aggregator: Aggregator | None = None,
        *,
        population: int | None = None,
        cohort: int | None = None,
        delta: float | None = None,
        clip: float | FixedNorm | AdaptiveNorm | Mapping[str, Any] = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        clipped_count_stddev: float | None = None,
        sampling: str = "fixed",
        accountant: str = "rdp",
        noise: str = "after",
        weight_cap: float | None = None,
        mean_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        from fedzip.privacy import accounting

        self.population = _count("population", population)
        self.cohort = _count("cohort", cohort)
        if delta is None:
            raise ConfigError("dpfedavg needs delta, the δ of the reported ε (usually below 1/population)")
        self.delta = accounting._check_delta(delta)
        accounting._check_run(rounds or 1, self.cohort, self.population, sampling, accountant)
        self.sampling, self.accountant = sampling, accountant
        if noise not in NOISE_PLACEMENTS:
            raise ConfigError(f"dpfedavg noise must be one of {NOISE_PLACEMENTS}, got {noise!r}")
        self.noise = noise
        self.clip = _as_clip(clip)
        adaptive = isinstance(self.clip, AdaptiveNorm)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError("dpfedavg needs exactly one of noise_multiplier and target_epsilon")
        if rounds is not None:
            _count("rounds", rounds)
        self.rounds = rounds

        # adaptive clipping: the count query's noise
        if not adaptive:
            if clipped_count_stddev is not None:
                raise ConfigError("clipped_count_stddev applies to adaptive clipping only (clip is fixed)")
            self.clipped_count_stddev = 0.0
        elif clipped_count_stddev is None:
            self.clipped_count_stddev = 0.05 * self.cohort  # TFF's default
        else:
            self.clipped_count_stddev = _number("clipped_count_stddev", clipped_count_stddev, strict=False)

        if target_epsilon is not None:
            if rounds is None:
                raise ConfigError("dpfedavg target_epsilon needs rounds, the number of rounds planned")
            if adaptive and self.clipped_count_stddev == 0:
                raise ConfigError("adaptive clipping with a target epsilon needs clipped_count_stddev > 0")
            z = accounting.noise_for_epsilon(
                target_epsilon, rounds, self.cohort, self.population, self.delta, sampling=sampling,
                accountant=accountant, clipped_count_stddev=self.clipped_count_stddev if adaptive else None)
        else:
            z = _number("noise_multiplier", noise_multiplier, strict=False)
        if adaptive and z > 0 and self.clipped_count_stddev == 0:
            raise ConfigError("adaptive clipping releases a count of clients: with noise on it needs "
                              "clipped_count_stddev > 0")
        self.noise_multiplier = float(z)
        self.target_epsilon = target_epsilon

        # bounded contributions
        if weight_cap is not None:
            weight_cap = _number("weight_cap", weight_cap)
            if noise == "before":
                raise ConfigError("capped weights need noise='after': a weight below 1 would scale a "
                                  "client's noise share down")
        self.weight_cap = weight_cap
        mean_weight = _number("mean_weight", mean_weight)
        if mean_weight > 1:
            raise ConfigError(f"dpfedavg mean_weight is a mean of capped weights, at most 1, got {mean_weight!r}")
        self.mean_weight = mean_weight

        inner = mean() if aggregator is None else aggregator
        if not isinstance(inner, Aggregator):
            raise ConfigError(f"aggregator must be a fedzip Aggregator, got {type(inner).__name__}")
        if inner.stages or inner.accumulator_kind is not None:
            raise ConfigError("dpfedavg builds its own clipping and noise around a plain mean: give "
                              "aggregator=mean(codec) (no stages, no robust rule)")
        if noise == "after" and inner.policy.summable():
            raise ConfigError("noise='after' with a summable (secure-aggregation) codec policy: the server "
                              "must clip each decoded update to bound the sensitivity, and it never decodes "
                              "one; use noise='before' or a codec decoded per client")
        self.stage = DPClip(self.clip, self.noise_multiplier, self.cohort * mean_weight, float(self.cohort),
                            self.clipped_count_stddev, noise)
        self._bound = RoundBound(self.clip.threshold(self.clip.init()))
        kind = ServerClip(self._bound, weight_cap) if noise == "after" else None
        dp_aggregator = replace(inner, stages=(self.stage,), weighted=False, accumulator_kind=kind)
        super().__init__(model_fn, client_optimizer, server_optimizer, dp_aggregator, **kwargs)
        if noise == "before":  # the same work, with the noise key set per client
            keyed = object.__new__(_KeyedNoiseWork)
            keyed.__dict__.update(self.work.__dict__)
            self.work = keyed

    # -- privacy ---------------------------------------------------------------

    def clip_norm(self, state: ServerState) -> float:
        """The clip norm the round after ``state`` uses."""
        return self.clip.threshold(state.aggregator_state[self.stage.key])

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` rounds at ``delta`` (inf without noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        from fedzip.privacy import accounting

        count_std = self.clipped_count_stddev if isinstance(self.clip, AdaptiveNorm) else None
        return accounting.epsilon(self.noise_multiplier, rounds, self.cohort, self.population, self.delta,
                                  sampling=self.sampling, accountant=self.accountant,
                                  clipped_count_stddev=count_std)

    def sample(self, client_ids: Sequence[str], round_num: int) -> list[str]:
        """The cohort of ``round_num`` as the accounting assumes it: ``cohort``
        distinct clients (``fedzip.sample_clients``, as ``fedzip.run`` draws
        them), or Poisson with rate ``cohort / population``."""
        if len(client_ids) != self.population:
            raise ConfigError(f"dpfedavg: population={self.population} but {len(client_ids)} client ids given")
        if self.sampling == "fixed":
            return sample_clients(client_ids, self.cohort, round_num, self.seed)
        return poisson_sample(client_ids, self.cohort / self.population, round_num, self.seed)

    # -- one round -------------------------------------------------------------

    def next(self, state: ServerState, data: FederatedData, client_ids: Sequence[str]
             ) -> tuple[ServerState, dict[str, Any]]:
        """A round of :class:`FederatedAlgorithm` with the checks the accounting
        needs, and ``privacy/epsilon`` (with ``privacy/delta`` and
        ``privacy/noise_multiplier``) in the metrics."""
        n = len(data.client_ids)
        if n != self.population:
            raise ConfigError(f"dpfedavg: the accounting assumes population={self.population} clients, "
                              f"the data has {n}")
        if len(set(client_ids)) != len(client_ids):
            raise ConfigError("dpfedavg: a client appears twice in the cohort (it would count twice)")
        if self.sampling == "fixed" and len(client_ids) != self.cohort:
            raise ConfigError(f"dpfedavg: sampling='fixed' accounts for cohorts of exactly {self.cohort} "
                              f"clients, got {len(client_ids)}")
        self._bound.value = self.clip_norm(state)
        new_state, metrics = super().next(state, data, client_ids)
        metrics["privacy/epsilon"] = self.epsilon(new_state.round)
        metrics["privacy/delta"] = self.delta
        metrics["privacy/noise_multiplier"] = self.noise_multiplier
        return new_state, metrics


def dp_fedavg(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
              aggregator: Aggregator | None = None, **kwargs: Any) -> DPFedAvg:
    """DP-FedAvg; arguments as :class:`DPFedAvg`."""
    return DPFedAvg(model_fn, client_optimizer, server_optimizer, aggregator, **kwargs)


__all__ = ["ClippedSum", "DPClip", "DPFedAvg", "RoundBound", "ServerClip", "dp_fedavg", "poisson_sample"]
