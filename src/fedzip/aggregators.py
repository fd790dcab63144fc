"""Aggregators that compose: zeroing → clipping → weighted mean over a codec.

The shape follows TFF's aggregation factories, made explicit in the optax
way: every piece has ``init() -> state`` and pure functions of ``(state,
inputs)``, and *measurements* (norms, counts) are returned apart from *state*.

An :class:`Aggregator` is a chain of :class:`Stage` s (outermost first) around
a leaf, the weighted mean over a :class:`~fedzip.codecs.CodecPolicy`. A round
runs in three places:

1. server, before the round: :meth:`Aggregator.broadcast_scalars` — what the
   clients need (current clipping/zeroing norms). They are sent, and counted,
   in the broadcast message.
2. each client: :meth:`Aggregator.client_encode` — stages transform the update
   (zero it, clip it) and report a few scalars (was it clipped, was its norm
   below the estimate); the codec policy encodes each tensor.
3. server: :class:`StreamingMean` folds each client's message into running
   sums as it arrives (memory stays O(model size) whatever the cohort), then
   :meth:`Aggregator.finalize` returns the mean, the new state (adaptive norms
   move) and the measurements.

Build them with :func:`mean`, :func:`clipping`, :func:`zeroing` and
:func:`compression_aggregator`, nesting as in TFF::

    zeroing(clipping(mean(codec=...)))
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedzip import tree
from fedzip.codecs import Codec, CodecPolicy, UniformQuantization, above_threshold, as_policy
from fedzip.codecs.base import is_finite
from fedzip.errors import ConfigError, NonFiniteUpdateError, PayloadError, RoundFailedError
from fedzip.payload import decode_params
from fedzip.tree import Params
from fedzip.wire import Kind, Message, TensorRecord

if TYPE_CHECKING:
    from fedzip.privacy.secagg import SecAggConfig

# --------------------------------------------------------------------------
# Norm estimates: fixed, or adaptive (tracking a quantile of client norms)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedNorm:
    """A norm bound that never moves."""

    value: float

    def __post_init__(self) -> None:
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"norm must be a positive finite number, got {self.value!r}")

    def init(self) -> dict[str, float]:
        return {}

    def threshold(self, state: Mapping[str, float]) -> float:
        return float(self.value)

    def estimate(self, state: Mapping[str, float]) -> float:
        return float(self.value)

    def update(self, state: Mapping[str, float], below_fraction: float) -> dict[str, float]:
        return dict(state)


@dataclass(frozen=True)
class AdaptiveNorm:
    """A norm bound that tracks a quantile of the clients' norms across rounds.

    This is TFF's ``PrivateQuantileEstimationProcess.no_noise`` with geometric
    updates (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
    Learning with Adaptive Clipping", NeurIPS 2021): each round, with ``f``
    the fraction of clients whose norm is ``<= estimate``,

        estimate ← estimate · exp(−learning_rate · (f − target_quantile))

    and the bound used is ``multiplier · estimate + increment``.
    """

    initial_estimate: float
    target_quantile: float
    learning_rate: float
    multiplier: float = 1.0
    increment: float = 0.0

    def __post_init__(self) -> None:
        if not self.initial_estimate > 0:
            raise ConfigError(f"AdaptiveNorm.initial_estimate must be > 0, got {self.initial_estimate!r}")
        if not 0 <= self.target_quantile <= 1:
            raise ConfigError(f"AdaptiveNorm.target_quantile must be in [0, 1], got {self.target_quantile!r}")
        if not self.learning_rate >= 0:
            raise ConfigError(f"AdaptiveNorm.learning_rate must be >= 0, got {self.learning_rate!r}")

    def init(self) -> dict[str, float]:
        return {"estimate": float(self.initial_estimate)}

    def estimate(self, state: Mapping[str, float]) -> float:
        return float(state["estimate"])

    def threshold(self, state: Mapping[str, float]) -> float:
        return self.multiplier * float(state["estimate"]) + self.increment

    def update(self, state: Mapping[str, float], below_fraction: float) -> dict[str, float]:
        below = min(1.0, max(0.0, below_fraction))
        new = float(state["estimate"]) * math.exp(-self.learning_rate * (below - self.target_quantile))
        return {"estimate": new}


NormSpec = FixedNorm | AdaptiveNorm


def _as_norm(norm: float | NormSpec) -> NormSpec:
    if isinstance(norm, (FixedNorm, AdaptiveNorm)):
        return norm
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        return FixedNorm(float(norm))
    raise ConfigError(f"norm must be a number, FixedNorm or AdaptiveNorm, got {type(norm).__name__}")


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


class ExactFloat32Sums(Mapping[str, torch.Tensor]):
    """Sums held exactly in float32, read as float64 like any aggregate's sums.

    A round of at most :attr:`StreamingMean.BLOCK` clients whose weights are
    float32 integers sums into one float32 block and never into float64: its
    float64 sums would be the block's values, converted. Reading a tensor here
    converts it (once; a stage may change what it reads in place); while none
    has been read, :meth:`float32` hands out the block itself, so the mean can
    divide in float32 without the two float64 passes (convert, divide, cast
    back: about 3 ms a round on the seed CNN)."""

    def __init__(self, block: Params) -> None:
        self._block = block
        self._float64: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._float64:
            self._float64[name] = self._block[name].to(torch.float64)
        return self._float64[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._block)

    def __len__(self) -> int:
        return len(self._block)

    def float32(self) -> Params | None:
        """The float32 sums, or None once a tensor was read as float64."""
        return None if self._float64 else self._block


def float32_exact(x: float) -> bool:
    """Whether the number ``x`` is a float32 value."""
    return math.isfinite(x) and float(np.float32(x)) == x


@dataclass
class Aggregate:
    """The server's running result of a round before division: weighted sums of
    the updates (float64, or :class:`ExactFloat32Sums`), the weight sum (a
    number, or a tensor per coordinate when clients hold different
    coordinates) and the number of clients."""

    sums: Params | ExactFloat32Sums
    weight_sum: float | Params
    count: int

    def mean(self, like: Mapping[str, tuple[tuple[int, ...], Any]]) -> Params:
        if self.count == 0:
            raise RoundFailedError("no client update to aggregate")
        exact = self.sums.float32() if isinstance(self.sums, ExactFloat32Sums) else None
        if exact is not None and not isinstance(self.weight_sum, dict) and self.weight_sum > 0 \
                and float32_exact(self.weight_sum):
            # float32 operands: float32 division gives the float64 quotient
            # rounded to float32 (double rounding is innocuous for division when
            # 53 >= 2*24 + 2: Figueroa, "When is double rounding innocuous?", 1995)
            return {k: torch.div(v, self.weight_sum).to(like[k][1]) for k, v in exact.items()}
        if isinstance(self.weight_sum, dict):
            out = {}
            for k, v in self.sums.items():
                w = self.weight_sum[k]
                # coordinates no client held keep a zero update
                out[k] = torch.where(w > 0, v / w.clamp_min(1e-300), torch.zeros_like(v))
        else:
            if self.weight_sum <= 0:
                raise RoundFailedError("the clients' total weight is zero (no examples)")
            # divided in float64: sums past float32's range (weights of 1e300) stay finite
            out = {k: v / self.weight_sum for k, v in self.sums.items()}
        return {k: v.to(torch.float32).to(like[k][1]) for k, v in out.items()}


class Stage(abc.ABC):
    """A middleware around the mean: a client side that transforms each update
    (and reports scalars), and a server side that sees the round's aggregate.

    ``report_bounds`` names each report a client may send and the range one
    client's value is clamped to before it is summed: a 0/1 indicator is
    clamped to [0, 1], so a lying client moves an adaptive norm no more than an
    honest one could; a norm is bounded by ``(0, inf)`` and summed as sent.
    Reports a stage does not declare are ignored.
    """

    key: str
    report_bounds: Mapping[str, tuple[float, float]] = {}

    @abc.abstractmethod
    def init(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def broadcast(self, state: Mapping[str, Any]) -> dict[str, float]:
        """Scalars the clients need this round."""

    @abc.abstractmethod
    def client(self, scalars: Mapping[str, float], update: Params) -> tuple[Params, dict[str, float]]:
        """Transform one client's update; return it and the scalars to report."""

    @abc.abstractmethod
    def server(
        self, state: Mapping[str, Any], aggregate: Aggregate, reports: Mapping[str, float],
        rng: torch.Generator,
    ) -> tuple[Aggregate, dict[str, Any], dict[str, float]]:
        """From the aggregate and the summed reports: (aggregate, new state,
        measurements). ``rng`` is keyed by (seed, round, stage key)."""


@dataclass(frozen=True)
class _NormStage(Stage):
    norm: NormSpec
    key: str

    def init(self) -> dict[str, float]:
        return self.norm.init()

    def broadcast(self, state: Mapping[str, float]) -> dict[str, float]:
        out = {"threshold": self.norm.threshold(state)}
        if isinstance(self.norm, AdaptiveNorm):
            out["estimate"] = self.norm.estimate(state)
        return out


@dataclass(frozen=True)
class Zeroing(_NormStage):
    """Replace an update by zeros when its norm exceeds the bound or is not
    finite (TFF's ``zeroing_factory``; L-infinity norm by default). The
    client's weight is kept, as TFF does, so heavy zeroing pulls the mean
    toward zero. Measurements: ``zeroing_norm``, ``zeroed_count``."""

    norm_order: float = math.inf

    report_bounds = {"zeroed": (0.0, 1.0), "below": (0.0, 1.0)}

    def client(self, scalars: Mapping[str, float], update: Params) -> tuple[Params, dict[str, float]]:
        norm = tree.global_norm(update, self.norm_order)
        zero = not math.isfinite(norm) or norm > scalars["threshold"]
        if zero:
            update = tree.zeros_like(update)
        report = {"zeroed": float(zero)}
        if "estimate" in scalars:
            report["below"] = float(math.isfinite(norm) and norm <= scalars["estimate"])
        return update, report

    def server(self, state, aggregate, reports, rng):
        new_state = self.norm.update(state, reports.get("below", 0.0) / max(aggregate.count, 1))
        meas = {"zeroing_norm": self.norm.threshold(state), "zeroed_count": reports.get("zeroed", 0.0)}
        return aggregate, new_state, meas


@dataclass(frozen=True)
class Clipping(_NormStage):
    """Project the update onto the L2 ball of the bound (TFF's
    ``clipping_factory``). Measurements: ``clipping_norm``, ``clipped_count``."""

    # "norm" is the client's L2 norm before clipping, bounded only to be >= 0:
    # its mean is a measurement, it moves no state
    report_bounds = {"clipped": (0.0, 1.0), "below": (0.0, 1.0), "norm": (0.0, math.inf)}

    def client(self, scalars: Mapping[str, float], update: Params) -> tuple[Params, dict[str, float]]:
        norm = tree.global_norm(update, 2.0)
        bound = scalars["threshold"]
        clipped = math.isfinite(norm) and norm > bound
        if clipped:
            update = tree.scale(update, bound / norm)
        report = {"clipped": float(clipped), "norm": norm if math.isfinite(norm) else 0.0}
        if "estimate" in scalars:
            report["below"] = float(math.isfinite(norm) and norm <= scalars["estimate"])
        return update, report

    def server(self, state, aggregate, reports, rng):
        new_state = self.norm.update(state, reports.get("below", 0.0) / max(aggregate.count, 1))
        meas = {"clipping_norm": self.norm.threshold(state), "clipped_count": reports.get("clipped", 0.0),
                "mean_norm": reports.get("norm", 0.0) / max(aggregate.count, 1)}
        return aggregate, new_state, meas


@dataclass(frozen=True)
class GaussianNoise(Stage):
    """Gaussian noise of standard deviation ``stddev`` added once, on the server,
    to every coordinate of the sum of the updates (the Gaussian mechanism of
    DP-FedAvg: McMahan, Ramage, Talwar, Zhang, ICLR 2018, with ``stddev`` =
    noise multiplier × clipping norm). The noise is drawn from the generator
    keyed by (seed, round, stage), so runs repeat and restarts draw the same.
    Put clipping inside it (``gaussian_noise(clipping(mean(weighted=False), C), z * C)``)
    so that one client's contribution to the sum is bounded by C."""

    stddev: float
    key: str = "noise"

    def init(self) -> dict[str, Any]:
        return {}

    def broadcast(self, state):
        return {}

    def client(self, scalars, update):
        return update, {}

    def server(self, state, aggregate, reports, rng):
        sums = {k: v + torch.randn(v.shape, generator=rng, dtype=torch.float64) * self.stddev
                for k, v in aggregate.sums.items()}
        return Aggregate(sums, aggregate.weight_sum, aggregate.count), dict(state), {"stddev": self.stddev}


# --------------------------------------------------------------------------
# The aggregator
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregator:
    """Stages (outermost first) around a weighted mean over a codec policy.

    ``weighted=True`` weights each client by its number of examples (TFF's
    weighted FedAvg); ``False`` gives every client weight 1.
    """

    stages: tuple[Stage, ...] = ()
    policy: CodecPolicy = field(default_factory=CodecPolicy)
    weighted: bool = True
    #: builds the round's accumulator in place of the default (StreamingMean or
    #: EncodedSum): ``accumulator_kind(aggregator, like) -> Accumulator``, e.g.
    #: the robust rules of :mod:`fedzip.robust` (median, Krum, ...)
    accumulator_kind: Any = None
    #: secure aggregation of the codes (:func:`fedzip.privacy.secagg.secure_mean`):
    #: the accumulator is a ``SecureSum`` and the round runs its protocol
    secure: SecAggConfig | None = None

    # -- state ------------------------------------------------------------

    def init(self) -> dict[str, Any]:
        """The aggregator's state: each stage's (per-client codec state lives in
        the server state's ``client_states["codec"]`` store)."""
        return {s.key: s.init() for s in self.stages}

    def broadcast_scalars(self, state: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.stages:
            for k, v in s.broadcast(state[s.key]).items():
                out[f"{s.key}/{k}"] = v
        return out

    # -- client side --------------------------------------------------------

    def client_encode(
        self,
        scalars: Mapping[str, float],
        update: Params,
        rng: torch.Generator,
        client_state: Mapping[str, Any] | None = None,
    ) -> tuple[list[TensorRecord], dict[str, float], dict[str, Any]]:
        """Run the stages and the codecs on one client's update.

        Returns the tensor records, the stage reports (prefixed by stage key)
        and the client's new codec state. Raises :class:`NonFiniteUpdateError`
        if the update is not finite once the stages ran (no zeroing to drop it).
        """
        reports: dict[str, float] = {}
        for s in self.stages:
            prefix = f"{s.key}/"
            mine = {k[len(prefix) :]: v for k, v in scalars.items() if k.startswith(prefix)}
            update, rep = s.client(mine, update)
            reports.update({prefix + k: v for k, v in rep.items()})
        bad = [k for k, v in update.items() if not is_finite(v)]
        if bad:
            raise NonFiniteUpdateError(
                f"update holds NaN or Inf in {', '.join(bad[:3])}"
                + (" (add zeroing to drop such updates)" if not self.stages else "")
            )
        records = []
        new_state: dict[str, Any] = {}
        client_state = client_state or {}
        for name, value in update.items():
            codec = self.policy.for_tensor(name, value.numel())
            prev = client_state.get(name)
            if prev is None:
                prev = codec.init_client_state(tuple(value.shape))
            if prev is None:
                body = codec.encode_view(value, rng)  # joined into the message right away
            else:
                body, prev = codec.encode_stateful(value, rng, prev)
                new_state[name] = prev
            records.append(TensorRecord(name, codec.tag, tuple(value.shape), body))
        return records, reports, new_state

    # -- server side -------------------------------------------------------

    def accumulator(self, template: Params, decode_each: bool = False) -> Accumulator:
        """Where the round's updates are summed: decoded one by one
        (:class:`StreamingMean`), or, when every codec of the policy can add
        its encodings (:class:`~fedzip.codecs.summable.SummableCodec`) and
        ``decode_each`` is False, summed encoded and decoded once
        (:class:`EncodedSum`)."""
        like = {k: (tuple(v.shape), v.device) for k, v in template.items()}
        if self.secure is not None:  # masked codes, summed mod 2^m
            from fedzip.privacy.secagg import SecureSum  # cryptography loads only when asked for

            if decode_each or self.accumulator_kind is not None:
                raise ConfigError("secure aggregation sums masked codes: it cannot decode updates "
                                  "one by one or use another accumulator")
            return SecureSum(self, like)
        if self.accumulator_kind is not None:
            return self.accumulator_kind(self, like)
        if self.policy.summable() and not decode_each:
            if self.weighted:
                raise ConfigError("a mean over encoded sums needs weighted=False: integer encodings "
                                  "add up only with equal weights")
            return EncodedSum(self, like)
        return StreamingMean(self, like)

    def fold_reports(self, sums: dict[str, float], reports: Mapping[str, float]) -> None:
        """Add one client's stage reports to ``sums``, each clamped to its stage's
        bounds; a report no stage declared is ignored."""
        for s in self.stages:
            prefix = f"{s.key}/"
            for k, v in reports.items():
                if not k.startswith(prefix):
                    continue
                bounds = s.report_bounds.get(k[len(prefix):])
                if bounds is not None:  # a report the stage did not declare counts nowhere
                    sums[k] = sums.get(k, 0.0) + min(bounds[1], max(bounds[0], v))

    def finalize(
        self, state: Mapping[str, Any], acc: Accumulator, report_sums: Mapping[str, float],
        rng_for: Any = None,
    ) -> tuple[Params, dict[str, Any], dict[str, float]]:
        """The mean update, the new state, and the measurements of this round.

        The stages' server sides run innermost first (the way out of the
        middleware), each with a generator from ``rng_for(stage_key)``."""
        aggregate = acc.result()
        new_state = dict(state)
        measurements: dict[str, float] = {}
        for s in reversed(self.stages):
            prefix = f"{s.key}/"
            mine = {k[len(prefix):]: v for k, v in report_sums.items() if k.startswith(prefix)}
            rng = rng_for(s.key) if rng_for is not None else torch.Generator().manual_seed(0)
            aggregate, new_state[s.key], meas = s.server(state[s.key], aggregate, mine, rng)
            measurements.update({f"{s.key}/{k}": v for k, v in meas.items()})
        measurements.update(acc.measurements())
        return aggregate.mean(acc.template), new_state, measurements


def client_scalars(scalars: Mapping[str, float]) -> tuple[float, dict[str, float], dict[str, float]]:
    """A client's scalars, checked: (weight, train sums, stage reports).

    Everything a client reports is its word: the weight must be finite and
    non-negative, training sums finite and non-negative, reports finite. A
    client whose training diverged reports a non-finite loss honestly: its
    train sums are left out and it is counted in ``diverged_clients``.
    """
    rest = dict(scalars)
    weight = rest.pop("weight", None)
    if weight is None or not math.isfinite(weight) or weight < 0:
        raise PayloadError(f"update weight {weight!r} must be a finite non-negative number")
    train = {k[6:]: v for k, v in rest.items() if k.startswith("train/")}
    reports = {k: v for k, v in rest.items() if not k.startswith("train/")}
    if not math.isfinite(train.get("loss_sum", 0.0)):
        train = {"diverged_clients": 1.0}
    for k, v in train.items():
        if not math.isfinite(v) or v < 0:
            raise PayloadError(f"update scalar 'train/{k}' is {v!r}; counts and sums must be finite and >= 0")
    for k, v in reports.items():
        if not math.isfinite(v):
            raise PayloadError(f"update scalar {k!r} is {v!r}; scalars must be finite")
    return float(weight), train, reports


class Accumulator(abc.ABC):
    """Folds the round's updates as they arrive; :meth:`result` is the aggregate.

    ``fold`` gets a client's tensor records (still encoded) and its weight;
    ``coverage`` (optional) names, per tensor, the coordinates the client held
    (a bool mask), for clients that train only part of the model: the weight
    then counts per coordinate. Nothing is added unless the whole update is valid.
    """

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]):
        self.aggregator = aggregator
        self.template = dict(template)
        self.count = 0

    @abc.abstractmethod
    def fold(self, tensors: Sequence[TensorRecord], weight: float,
             coverage: Mapping[str, torch.Tensor] | None = None) -> None: ...

    @abc.abstractmethod
    def result(self) -> Aggregate: ...

    def measurements(self) -> dict[str, float]:
        """What the accumulator itself reports (secure aggregation's bits); none by default."""
        return {}

    def fold_message(self, message: Message) -> tuple[dict[str, float], dict[str, float]]:
        """Check a whole update message's scalars (:func:`client_scalars`) and fold
        its tensors; returns its train sums and stage reports."""
        weight, train, reports = client_scalars(message.scalars)
        self.fold(message.tensors, weight)
        return train, reports


class StreamingMean(Accumulator):
    """Running weighted sums: each client's update is decoded and folded as it arrives.

    Blocked summation: updates are added in float32 into a block buffer, and
    every :attr:`BLOCK` clients the block is added into the float64 sums. A
    float32 add is about 8 times faster than adding float32 into float64 in
    place (memory traffic and a mixed-dtype kernel), which made the server's
    fold the largest cost of a round after training; the rounding error of a
    block is at most ``BLOCK`` float32 roundings of its partial sums (about
    1e-6 relative), whatever the number of clients, since the blocks add up in
    float64. The fold order is the task order on every backend, so results
    stay bit-identical across them.

    Memory is one float64 and one float32 buffer per model tensor (and the
    per-coordinate weights, float64, when clients hold different coordinates)
    whatever the number of clients. Records are checked against the model
    template (names, shapes, codec tags) before anything is decoded.
    """

    #: clients added in float32 before their block is added into the float64 sums
    BLOCK = 16
    #: the largest weight added in float32 (larger ones go into float64 directly)
    EXACT_WEIGHT = float(2**24)

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]):
        super().__init__(aggregator, template)
        self.weight_sum = 0.0
        self.coord_weights: dict[str, torch.Tensor] | None = None
        self._sums: dict[str, torch.Tensor] | None = None  # float64, allocated when first needed
        self._block: dict[str, torch.Tensor] | None = None  # float32, allocated by the first fold
        self._in_block = 0

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The float64 sums of the blocks flushed so far (and of the weights too
        large for a block); allocated on first use: a round that fits one block
        never needs them (:class:`ExactFloat32Sums`)."""
        if self._sums is None:
            self._sums = {k: torch.zeros(shape, dtype=torch.float64) for k, (shape, _) in self.template.items()}
        return self._sums

    def decode_update(self, tensors: Sequence[TensorRecord] | Message) -> Params:
        """Validate a client's tensors against the template and decode them."""
        if isinstance(tensors, Message):
            tensors = tensors.tensors
        return decode_params(
            Message(Kind.UPDATE, {}, list(tensors)),
            {k: shape for k, (shape, _) in self.template.items()}, self.aggregator.policy, views=True,
        )

    def fold(self, tensors, weight, coverage=None):
        self.fold_decoded(self.decode_update(tensors), weight, coverage)

    def fold_decoded(self, update: Params, weight: float,
                     coverage: Mapping[str, torch.Tensor] | None = None) -> None:
        """Fold an update already decoded (and mapped onto the model's coordinates)."""
        if not math.isfinite(weight) or weight < 0:
            raise PayloadError(f"update weight {weight!r} must be a finite non-negative number")
        if not self.aggregator.weighted:
            weight = 1.0
        if sorted(update) != sorted(self.template) or any(
                tuple(update[k].shape) != tuple(shape) for k, (shape, _) in self.template.items()):
            raise PayloadError("a decoded update does not match the model's tensors")
        if coverage is not None:
            bad = [k for k in update if k in coverage and tuple(coverage[k].shape) != tuple(update[k].shape)]
            if bad:
                raise PayloadError(f"coverage of {bad[0]!r} does not match its shape")
            if self.coord_weights is None:
                self.coord_weights = {k: torch.full(shape, self.weight_sum, dtype=torch.float64)
                                      for k, (shape, _) in self.template.items()}
        # A weight past float32's exact integers (2^24; example counts stay far
        # below it) goes straight into the float64 sums: a client's lie of 1e300
        # examples must weigh what it says without overflowing the float32 block.
        small = weight <= self.EXACT_WEIGHT
        if small and self._block is None:
            self._block = {k: torch.zeros(shape, dtype=torch.float32) for k, (shape, _) in self.template.items()}
        for k, v in update.items():
            if small:
                self._block[k].add_(v.to(torch.float32), alpha=weight)
            else:
                self.sums[k].add_(v, alpha=weight)
            if self.coord_weights is not None:
                held = coverage.get(k) if coverage is not None else None
                if held is None:
                    self.coord_weights[k].add_(weight)
                else:
                    self.coord_weights[k].add_(held.to(torch.float64), alpha=weight)
        self.weight_sum += weight
        self.count += 1
        if small:
            self._in_block += 1
            if self._in_block == self.BLOCK:
                self._flush()

    def _flush(self) -> None:
        """Add the float32 block into the float64 sums and clear it."""
        if self._block is None or not self._in_block:
            return
        for k, b in self._block.items():
            self.sums[k].add_(b)
            b.zero_()
        self._in_block = 0

    def result(self) -> Aggregate:
        weights = self.coord_weights if self.coord_weights is not None else self.weight_sum
        if self._sums is None and self._block is not None:  # one block, nothing in float64
            return Aggregate(ExactFloat32Sums(self._block), weights, self.count)
        self._flush()
        return Aggregate(self.sums, weights, self.count)


def check_coverage(coverage: Mapping[str, torch.Tensor] | None,
                   template: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    """A client's coverage (bool masks by tensor) must name model tensors, in their shapes."""
    for name, held in (coverage or {}).items():
        if name not in template or tuple(held.shape) != tuple(template[name][0]):
            raise PayloadError(f"coverage of {name!r} does not match the model's tensors")


def count_holders(holders: dict[str, torch.Tensor] | None, template: Mapping[str, tuple[tuple[int, ...], Any]],
                  count: int, coverage: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Per coordinate, how many of the clients summed so far held it, with one
    more client of ``coverage`` (None: it held all) added; ``holders`` None
    while every client held everything (``count`` of them), so a round of
    whole-model clients keeps no per-coordinate counts."""
    if coverage is not None and holders is None:  # the clients before it held everything
        holders = {k: torch.full(shape, float(count), dtype=torch.float64) for k, (shape, _) in template.items()}
    if holders is not None:
        for name, n in holders.items():
            held = (coverage or {}).get(name)
            n.add_(1.0 if held is None else held.to(torch.float64))
    return holders


class EncodedSum(Accumulator):
    """Adds clients' integer encodings without decoding any one of them, and
    decodes only the sum (what secure aggregation needs: the server sees sums).

    Every codec of the policy must be a :class:`~fedzip.codecs.base.SummableCodec`;
    weights are 1 (integers add up only with equal weights).
    """

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]):
        super().__init__(aggregator, template)
        self.int_sums: dict[str, Any] = {}
        #: decoded individual updates (instrumentation: stays 0; a test checks it)
        self.decoded_individually = 0
        #: per coordinate, how many clients held it (float64); None while each held all
        self.holders: dict[str, torch.Tensor] | None = None

    def fold(self, tensors, weight, coverage=None):
        """Add one client's codes. ``coverage``: the coordinates it held (bool
        masks by tensor, a tensor left out held whole; None: all), which the
        server derives from the client's layout (federated dropout, structured
        updates: the client sent zeros elsewhere); each coordinate's sum is then
        divided by the clients that held it."""
        if not math.isfinite(weight) or weight < 0:
            raise PayloadError(f"update weight {weight!r} must be a finite non-negative number")
        by_name = {t.name: t for t in tensors}
        if sorted(by_name) != sorted(self.template):
            missing = sorted(set(self.template) - set(by_name))[:5]
            extra = sorted(set(by_name) - set(self.template))[:5]
            raise PayloadError(f"tensors do not match the model: missing {missing}, unexpected {extra}")
        parsed = {}
        for name, t in by_name.items():
            shape = self.template[name][0]
            if t.shape != shape:
                raise PayloadError(f"tensor {name!r}: shape {t.shape}, the model has {shape}")
            codec = self.aggregator.policy.for_tensor(name, t.numel)
            if t.codec != codec.tag:
                raise PayloadError(f"tensor {name!r}: codec {t.codec!r}, expected {codec.tag!r}")
            parsed[name] = codec.parse_summand(t.body, shape)
        check_coverage(coverage, self.template)
        for name, value in parsed.items():
            codec = self.aggregator.policy.for_tensor(name, value.numel())
            prev = self.int_sums.get(name)
            self.int_sums[name] = value if prev is None else codec.add_summands(prev, value)
        self.holders = count_holders(self.holders, self.template, self.count, coverage)
        self.count += 1

    def result(self) -> Aggregate:
        sums = {}
        for name, (shape, _) in self.template.items():
            codec = self.aggregator.policy.for_tensor(name, math.prod(shape))
            sums[name] = codec.decode_sum(self.int_sums[name], self.count, shape).to(torch.float64)
        return Aggregate(sums, self.holders if self.holders is not None else float(self.count), self.count)


# --------------------------------------------------------------------------
# Constructors (the public way to build aggregators)
# --------------------------------------------------------------------------


def mean(codec: Codec | CodecPolicy | None = None, weighted: bool = True) -> Aggregator:
    """Weighted mean of the updates, each tensor sent through ``codec``
    (a codec for every tensor, a :class:`CodecPolicy`, or None for float32)."""
    return Aggregator((), as_policy(codec), weighted)


def _wrap(inner: Aggregator, stage_cls: type, norm: float | NormSpec, base_key: str, **kw) -> Aggregator:
    if not isinstance(inner, Aggregator):
        raise ConfigError(f"inner must be an Aggregator, got {type(inner).__name__}")
    keys = {s.key for s in inner.stages}
    key, i = base_key, 1
    while key in keys:
        key, i = f"{base_key}_{i}", i + 1
    return replace(inner, stages=(stage_cls(norm=_as_norm(norm), key=key, **kw), *inner.stages))


def clipping(inner: Aggregator, norm: float | NormSpec) -> Aggregator:
    """L2-clip each update to ``norm`` (fixed, or :class:`AdaptiveNorm`) before ``inner``."""
    return _wrap(inner, Clipping, norm, "clipping")


def zeroing(inner: Aggregator, norm: float | NormSpec, norm_order: float = math.inf) -> Aggregator:
    """Zero each update whose ``norm_order``-norm exceeds ``norm`` (or is not finite)."""
    if not (norm_order in (1.0, 2.0) or math.isinf(norm_order)):
        raise ConfigError(f"zeroing norm_order must be 1, 2 or inf, got {norm_order!r}")
    return _wrap(inner, Zeroing, norm, "zeroing", norm_order=float(norm_order))


def gaussian_noise(inner: Aggregator, stddev: float) -> Aggregator:
    """Add Gaussian noise of ``stddev`` to the sum of ``inner``'s updates, on the server."""
    if not (isinstance(stddev, (int, float)) and math.isfinite(stddev) and stddev >= 0):
        raise ConfigError(f"noise stddev must be a finite number >= 0, got {stddev!r}")
    if not isinstance(inner, Aggregator):
        raise ConfigError(f"inner must be an Aggregator, got {type(inner).__name__}")
    keys = {s.key for s in inner.stages}
    key, i = "noise", 1
    while key in keys:
        key, i = f"noise_{i}", i + 1
    return replace(inner, stages=(GaussianNoise(float(stddev), key), *inner.stages))


def default_zeroing_norm() -> AdaptiveNorm:
    """TFF's default: adapts very quickly to somewhat above the largest norms seen."""
    return AdaptiveNorm(10.0, 0.98, math.log(10.0), multiplier=2.0, increment=1.0)


def default_clipping_norm() -> AdaptiveNorm:
    """TFF's default: adapts relatively quickly to a moderately high norm."""
    return AdaptiveNorm(1.0, 0.8, 0.2)


def robust_aggregator(
    inner: Aggregator | None = None, zeroing_: bool = True, clipping_: bool = True
) -> Aggregator:
    """TFF's ``robust_aggregator``: adaptive zeroing, then adaptive clipping, then ``inner``."""
    agg = inner or mean()
    if clipping_:
        agg = clipping(agg, default_clipping_norm())
    if zeroing_:
        agg = zeroing(agg, default_zeroing_norm())
    return agg


def compression_aggregator(
    zeroing: bool = True,
    clipping: bool = True,
    weighted: bool = True,
    bits: int = 8,
    threshold: int = 20_000,
) -> Aggregator:
    """TFF's ``tff.learning.compression_aggregator()``: adaptive zeroing, then
    adaptive clipping, then a weighted mean where every tensor with more than
    ``threshold`` elements is sent as ``bits``-bit stochastic uniform min/max
    quantization and smaller tensors as float32 — with tight bit packing."""
    policy = above_threshold(UniformQuantization(bits=bits, stochastic=True), threshold)
    return robust_aggregator(mean(policy, weighted), zeroing_=zeroing, clipping_=clipping)
