"""Byzantine-robust aggregation: estimates of the round's update that a few
untrusted clients cannot drag far, whatever they send.

(Not to be confused with :func:`fedzip.robust_aggregator`, TFF's adaptive
zeroing and clipping around a mean: clipping runs on the client, so a client
that does not follow the protocol skips it. The rules here run on the server.)

Every rule needs the round's *individual* decoded updates, so its accumulator
(:class:`KeptUpdates`) keeps them all: server memory is **O(cohort × model)**
float32 (one row per client; the estimate is computed in float64 over blocks
of coordinates, at most one block of float64 extra; one byte more per
coordinate when clients hold part of the model), not the O(model) of
:class:`~fedzip.aggregators.StreamingMean`.

* :func:`median` — coordinate-wise median (Yin, Chen, Kannan, Bartlett, ICML
  2018); with an even number of clients, the mean of the two middle values.
* :func:`trimmed_mean` — coordinate-wise β-trimmed mean: ``floor(β·n)`` values
  dropped at each end of every coordinate, the rest averaged (Yin et al. 2018).
* :func:`krum` — Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer,
  NeurIPS 2017): with ``f`` Byzantine clients out of ``n``, each update's score
  is the sum of its squared distances to its ``n − f − 2`` nearest other
  updates; Krum returns the update of lowest score, Multi-Krum (``m > 1``)
  the mean of the ``m`` updates of lowest score (scores computed once). Ties
  go to the client folded first (task order). Needs ``n >= 2f + 3``.
* :func:`geometric_median` — the smoothed Weiszfeld algorithm of Pillutla,
  Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (IEEE TSP
  2022): from the mean, ``z ← Σ β_i w_i / Σ β_i`` with ``β_i = 1 / max(ν,
  ‖z − w_i‖)``, until the objective ``Σ ‖z − w_i‖`` improves by less than
  ``ftol`` (relative) or after ``iterations`` steps.

**Weights.** Every rule ignores the clients' example weights: each client
that sent a valid update is one point (weight 0 included). A client that lies
about its weight therefore gains nothing; an honest client with many examples
counts no more than one with few. The weight is still checked (finite, >= 0)
as every accumulator does.

**Codecs.** Any codec whose updates the server decodes one by one: float32,
quantizers, sparsifiers, rotations, stateful ones (error feedback). Not
secure aggregation: a policy whose every codec is a
:class:`~fedzip.codecs.summable.SummableCodec` means the server learns only
the sum of the encodings (:class:`~fedzip.aggregators.EncodedSum`), and there
is no median of a sum; that combination is a :class:`ConfigError`.

**Clients that hold part of the model** (federated dropout, random-mask
updates with ``per_coordinate``: :mod:`fedzip.algorithms.space`). Each
client's update comes mapped onto the model's coordinates with
``coverage``, the coordinates it held, and :class:`KeptUpdates` keeps that
mask with its row (one byte a coordinate, and only when some client of the
round sent one). Every rule is then taken over the clients that held a
coordinate, as the mean is:

* median and trimmed mean: per coordinate over its ``h`` holders (``floor(β·h)``
  trimmed at each end); a coordinate nobody held gets no update;
* Krum: the squared distance of two clients is summed over the coordinates
  *both* held and rescaled to the model's dimension (``× d / |common|``), so
  pairs that share few coordinates are not made to look close; a pair with
  no coordinate in common is infinitely far (a client that shares
  coordinates with fewer than ``n − f − 2`` others scores infinity and is
  picked only if every client does, the first folded then). Multi-Krum
  averages each coordinate over the chosen clients that held it;
* geometric median: Weiszfeld on ``Σ_i ‖P_i(z − w_i)‖`` (``P_i`` keeps the
  coordinates client ``i`` held): each distance over the client's own
  coordinates, each step the ``β``-weighted mean of every coordinate over
  its holders. This is still a majorize-minimize step of that objective, so
  it never increases. Distances are not rescaled here: a rescaling by
  ``d / |held_i|`` would weight the clients differently, another objective.

Low-rank clients hold every coordinate of their ``B·A`` (no coverage).
Random-mask clients without ``per_coordinate`` send none either: the zeros
of the entries they did not train count as their values, as in the paper's
mean over all clients, and a median of mostly zeros is zero; give a rule
``per_coordinate=True``. Without coverage (FedAvg) the rules run as they
always did, and a coverage that holds everything gives the same numbers bit
for bit.

The result is an :class:`~fedzip.aggregators.Aggregate` whose ``mean(...)`` is
the robust estimate (``sums`` = estimate × count, ``weight_sum`` = count), so
stages compose around a rule as around a mean: ``fedzip.clipping(median(),
1.0)`` clips on the clients, then takes the median on the server.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedzip.aggregators import Accumulator, Aggregate, Aggregator
from fedzip.codecs import Codec, CodecPolicy, as_policy
from fedzip.errors import ConfigError, PayloadError, RoundFailedError
from fedzip.payload import decode_params
from fedzip.wire import Kind, Message, TensorRecord

#: float64 elements of scratch per block of coordinates (about 128 MiB)
_BLOCK_ELEMENTS = 1 << 24


def _blocks(n_rows: int, d: int, per_coordinate: int = 1) -> list[tuple[int, int]]:
    """Column ranges of ``d`` coordinates so a block of ``n_rows × width ×
    per_coordinate`` float64 stays within the scratch budget."""
    width = max(1, _BLOCK_ELEMENTS // max(1, n_rows * per_coordinate))
    return [(a, min(d, a + width)) for a in range(0, d, width)]


# --------------------------------------------------------------------------
# The accumulator: every decoded update of the round, one row each
# --------------------------------------------------------------------------


class KeptUpdates(Accumulator):
    """Decodes each client's update (checked against the model as
    :class:`~fedzip.aggregators.StreamingMean` checks it) and keeps it as a
    float32 row, with the coordinates the client held when it says
    (``coverage``: bool masks by tensor; a tensor left out is held whole);
    :meth:`result` hands the ``n × d`` matrix (and the ``n × d`` bool mask, if
    any client sent coverage) to the rule. Memory: O(cohort × model), one
    byte more per coordinate with coverage. ``info`` holds what the rule
    reports (Krum's ``selected`` rows, Weiszfeld's ``iterations``)."""

    def __init__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]],
                 rule: RobustRule):
        super().__init__(aggregator, template)
        _refuse_summable(aggregator.policy, rule.name)
        self.rule = rule
        self.rows: list[torch.Tensor] = []
        #: each row's held coordinates (None: all); None until a client sends coverage
        self.held: list[torch.Tensor | None] | None = None
        self.info: dict[str, Any] = {}

    def decode_update(self, tensors: Sequence[TensorRecord] | Message) -> dict[str, torch.Tensor]:
        if isinstance(tensors, Message):
            tensors = tensors.tensors
        return decode_params(Message(Kind.UPDATE, {}, list(tensors)),
                             {k: shape for k, (shape, _) in self.template.items()}, self.aggregator.policy)

    def fold(self, tensors, weight, coverage=None):
        self.fold_decoded(self.decode_update(tensors), weight, coverage)

    def fold_decoded(self, update: Mapping[str, torch.Tensor], weight: float,
                     coverage: Mapping[str, torch.Tensor] | None = None) -> None:
        """Keep an update already decoded (checked against the model's tensors),
        on the model's coordinates, with the coordinates it held (None: all)."""
        if not math.isfinite(weight) or weight < 0:
            raise PayloadError(f"update weight {weight!r} must be a finite non-negative number")
        if sorted(update) != sorted(self.template) or any(
                tuple(update[k].shape) != tuple(shape) for k, (shape, _) in self.template.items()):
            raise PayloadError("a decoded update does not match the model's tensors")
        if not all(bool(torch.isfinite(v).all()) for v in update.values()):
            raise PayloadError("a decoded update holds NaN or Inf")
        mask = None if coverage is None else self._mask(coverage)
        self.rows.append(torch.cat([update[k].reshape(-1).to(torch.float32) for k in self.template]))
        if mask is not None and self.held is None:
            self.held = [None] * (len(self.rows) - 1)  # the clients before it held everything
        if self.held is not None:
            self.held.append(mask)
        self.count += 1

    def _mask(self, coverage: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``coverage`` as one bool row in the rows' layout (checked first)."""
        for k, held in coverage.items():
            if k not in self.template or tuple(held.shape) != tuple(self.template[k][0]):
                raise PayloadError(f"coverage of {k!r} does not match the model's tensors")
        return torch.cat([coverage[k].reshape(-1).to(torch.bool) if k in coverage
                          else torch.ones(math.prod(shape), dtype=torch.bool)
                          for k, (shape, _) in self.template.items()])

    def matrix(self) -> torch.Tensor:
        """The round's updates as an ``n × d`` float32 matrix (rows in fold order)."""
        if not self.rows:
            raise RoundFailedError("no client update to aggregate")
        stacked = torch.stack(self.rows)
        self.rows = list(stacked.unbind(0))  # views: the separate rows are freed
        return stacked

    def held_matrix(self) -> torch.Tensor | None:
        """The coordinates each row held, ``n × d`` bool; None when no client sent coverage."""
        if self.held is None:
            return None
        d = sum(math.prod(shape) for shape, _ in self.template.values())
        stacked = torch.stack([torch.ones(d, dtype=torch.bool) if m is None else m for m in self.held])
        self.held = list(stacked.unbind(0))
        return stacked

    def result(self) -> Aggregate:
        points = self.matrix()
        held = self.held_matrix()
        # without coverage, the rule's original computation (not the masked one with every bit set)
        estimate, self.info = self.rule.estimate(points) if held is None else self.rule.estimate(points, held)
        n = points.shape[0]
        sums: dict[str, torch.Tensor] = {}
        offset = 0
        for name, (shape, _) in self.template.items():
            size = math.prod(shape)
            sums[name] = (estimate[offset:offset + size] * n).reshape(shape)
            offset += size
        return Aggregate(sums, float(n), n)


def _refuse_summable(policy: CodecPolicy, name: str) -> None:
    if policy.summable():
        raise ConfigError(
            f"{name} needs each client's decoded update, but every codec of this policy is summable: "
            "with secure aggregation (EncodedSum) the server learns only the sum of the encodings, "
            "and a robust rule cannot be computed from a sum. Use a codec that is decoded per client.")


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


class RobustRule(abc.ABC):
    """A robust centre of ``n`` points. Called as an accumulator kind
    (``rule(aggregator, like)``), it gives the :class:`KeptUpdates` that applies it."""

    name: str = "robust rule"

    def __call__(self, aggregator: Aggregator, template: Mapping[str, tuple[tuple[int, ...], Any]]
                 ) -> KeptUpdates:
        return KeptUpdates(aggregator, template, self)

    @abc.abstractmethod
    def estimate(self, points: torch.Tensor, held: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        """From the ``n × d`` float32 updates (and, when clients hold part of
        the model, the ``n × d`` bool mask of the coordinates each held; see
        the module doc): the float64 estimate ``[d]`` and what the rule reports."""


def _sorted_block(points: torch.Tensor, held: torch.Tensor | None, a: int, b: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Columns ``a:b`` in float64, sorted along the clients, and each column's
    number of holders (None without coverage). The values of clients that did
    not hold a coordinate become +inf, so they sort after every holder's
    (updates are finite: checked when folded)."""
    block = points[:, a:b].to(torch.float64)
    if held is None:
        return block.sort(dim=0).values, None
    h = held[:, a:b]
    return block.masked_fill(~h, math.inf).sort(dim=0).values, h.sum(dim=0)


@dataclass(frozen=True)
class CoordinateMedian(RobustRule):
    """Coordinate-wise median; even ``n``: the mean of the two middle values.
    With coverage, over the ``h`` holders of each coordinate (0 if none)."""

    name = "median"

    def estimate(self, points, held=None):
        n, d = points.shape
        out = torch.empty(d, dtype=torch.float64)
        for a, b in _blocks(n, d):
            s, h = _sorted_block(points, held, a, b)
            if h is None:
                out[a:b] = (s[(n - 1) // 2] + s[n // 2]) / 2
                continue
            lo, hi = (h - 1).clamp_min(0) // 2, h // 2  # the middle ranks among the holders
            middle = (s.gather(0, lo[None])[0] + s.gather(0, hi[None])[0]) / 2
            out[a:b] = torch.where(h > 0, middle, 0.0)  # nobody held it: no update, as the mean
        return out, {}


@dataclass(frozen=True)
class TrimmedMean(RobustRule):
    """Coordinate-wise mean after dropping the ``floor(beta·n)`` smallest and
    largest values of every coordinate; ``0 <= beta < 1/2``. With coverage,
    ``floor(beta·h)`` of the ``h`` holders of each coordinate (0 if none);
    ``trimmed_each_side`` reports the count for a coordinate every client held."""

    beta: float
    name = "trimmed mean"

    def __post_init__(self) -> None:
        b = self.beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 0.5:
            raise ConfigError(f"trimmed_mean beta must be in [0, 0.5), got {b!r}")

    def estimate(self, points, held=None):
        n, d = points.shape
        k = math.floor(self.beta * n)
        out = torch.empty(d, dtype=torch.float64)
        rank = torch.arange(n)[:, None]
        for a, b in _blocks(n, d):
            s, h = _sorted_block(points, held, a, b)
            if h is None:
                out[a:b] = s[k:n - k].mean(dim=0)
                continue
            kh = torch.floor(h.to(torch.float64) * self.beta).to(torch.int64)  # as math.floor(beta * n)
            kept = (rank >= kh) & (rank < h - kh)  # never a non-holder's +inf: those rank >= h
            left = h - 2 * kh  # >= 1 wherever h >= 1, since beta < 1/2
            total = s.masked_fill(~kept, 0.0).sum(dim=0)
            out[a:b] = torch.where(h > 0, total / left.clamp_min(1), 0.0)
        return out, {"trimmed_each_side": k}


@dataclass(frozen=True)
class Krum(RobustRule):
    """Krum (``m = 1``) or Multi-Krum (the mean of the ``m`` best-scored updates)
    for ``f`` Byzantine clients; see the module doc (and, for clients holding
    part of the model, how distances are taken)."""

    f: int
    m: int = 1
    name = "krum"

    def __post_init__(self) -> None:
        for field_name, low in (("f", 0), ("m", 1)):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"krum {field_name} must be an integer >= {low}, got {v!r}")

    def scores(self, points: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's sum of squared distances to its ``n − f − 2`` nearest other
        rows. With ``held``: over the coordinates both rows held, times ``d /
        |common|``; infinite with nothing in common."""
        n, d = points.shape
        dist = torch.zeros(n, n, dtype=torch.float64)
        common = torch.zeros(n, n, dtype=torch.int64) if held is not None else None
        for a, b in _blocks(n * n, d):  # the n × n × width differences fit the budget
            block = points[:, a:b].to(torch.float64)
            diff = block[:, None, :] - block[None, :, :]
            if held is not None:
                both = held[:, None, a:b] & held[None, :, a:b]
                diff.masked_fill_(~both, 0.0)
                common += both.sum(dim=-1)
            dist += (diff ** 2).sum(dim=-1)
        if common is not None:
            # a distance over fewer coordinates is smaller: rescaled to the model's d, so a pair
            # sharing few coordinates does not look close (d / d = 1 exactly when all are shared)
            scale = d / common.to(torch.float64).clamp_min(1)
            dist = torch.where(common > 0, dist * scale, math.inf)
        dist.fill_diagonal_(math.inf)
        nearest = dist.sort(dim=1).values[:, : n - self.f - 2]
        return nearest.sum(dim=1)

    def estimate(self, points, held=None):
        n = points.shape[0]
        if n < 2 * self.f + 3:
            raise RoundFailedError(f"krum with f={self.f} needs at least {2 * self.f + 3} updates "
                                   f"(n > 2f + 2), got {n}")
        if self.m > n:
            raise RoundFailedError(f"multi-krum with m={self.m} needs at least m updates, got {n}")
        scores = self.scores(points, held)
        chosen = torch.argsort(scores, stable=True)[: self.m]
        rows = points[chosen].to(torch.float64)
        if held is None:
            out = rows.mean(dim=0)
        else:  # each coordinate over the chosen clients that held it
            h = held[chosen]
            count = h.sum(dim=0)
            out = torch.where(count > 0, rows.masked_fill(~h, 0.0).sum(dim=0) / count.clamp_min(1), 0.0)
        return out, {"selected": [int(i) for i in chosen], "scores": scores}


@dataclass(frozen=True)
class GeometricMedian(RobustRule):
    """The geometric median ``argmin_z Σ_i ‖z − w_i‖`` by smoothed Weiszfeld
    (Pillutla et al., IEEE TSP 2022): at most ``iterations`` steps, distances
    floored at ``nu`` (the smoothing, which also keeps a step defined when
    ``z`` lands on a point), stopping once the objective improves by less
    than ``ftol`` times its value. With coverage, ``Σ_i ‖P_i(z − w_i)‖``
    over each client's held coordinates (see the module doc)."""

    iterations: int = 100
    nu: float = 1e-6
    ftol: float = 1e-8
    name = "geometric median"

    def __post_init__(self) -> None:
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ConfigError(f"geometric_median iterations must be an integer >= 1, got {it!r}")
        for field_name in ("nu", "ftol"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"geometric_median {field_name} must be a positive number, got {v!r}")

    @staticmethod
    def _distances(points: torch.Tensor, z: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
        n, d = points.shape
        sq = torch.zeros(n, dtype=torch.float64)
        for a, b in _blocks(n, d):
            diff = points[:, a:b].to(torch.float64) - z[a:b]
            if held is not None:  # a client's distance over the coordinates it held
                diff.masked_fill_(~held[:, a:b], 0.0)
            sq += (diff ** 2).sum(dim=1)
        return sq.sqrt()

    @staticmethod
    def _weighted_mean(points: torch.Tensor, beta: torch.Tensor, held: torch.Tensor | None = None
                       ) -> torch.Tensor:
        n, d = points.shape
        out = torch.empty(d, dtype=torch.float64)
        w = beta / beta.sum()
        for a, b in _blocks(n, d):
            block = points[:, a:b].to(torch.float64)
            if held is None:
                out[a:b] = w @ block
                continue
            h = held[:, a:b]
            num = w @ block.masked_fill(~h, 0.0)
            den = w @ h.to(torch.float64)  # the holders' share of the weight
            per_holder = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
            # a coordinate every client held: den is Σw = 1 but for rounding; not dividing keeps
            # such coordinates exactly what they are without coverage
            out[a:b] = torch.where(h.all(dim=0), num, per_holder)
        return out

    def estimate(self, points, held=None):
        n = points.shape[0]
        z = self._weighted_mean(points, torch.ones(n, dtype=torch.float64), held)
        dist = self._distances(points, z, held)
        objective = float(dist.sum())
        steps = 0
        while steps < self.iterations:
            steps += 1
            beta = 1.0 / dist.clamp_min(self.nu)
            z_next = self._weighted_mean(points, beta, held)
            dist_next = self._distances(points, z_next, held)
            obj_next = float(dist_next.sum())
            if obj_next > objective:  # no progress (rounding at the optimum): keep the better point
                break
            z, dist, previous, objective = z_next, dist_next, objective, obj_next
            if previous - objective <= self.ftol * objective:
                break
        return z, {"iterations": steps, "objective": objective}


# --------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------


def _robust(codec: Codec | CodecPolicy | None, rule: RobustRule) -> Aggregator:
    policy = as_policy(codec)
    _refuse_summable(policy, rule.name)
    return Aggregator((), policy, weighted=False, accumulator_kind=rule)


def median(codec: Codec | CodecPolicy | None = None) -> Aggregator:
    """Coordinate-wise median of the clients' decoded updates (``codec``: as
    :func:`fedzip.mean`'s; any codec decoded per client, not a summable
    secure-aggregation policy). Ignores example weights. Memory O(cohort × model)."""
    return _robust(codec, CoordinateMedian())


def trimmed_mean(codec: Codec | CodecPolicy | None = None, beta: float = 0.1) -> Aggregator:
    """Coordinate-wise ``beta``-trimmed mean (``floor(beta·n)`` values dropped at
    each end). Codecs, weights and memory as :func:`median`."""
    return _robust(codec, TrimmedMean(beta))


def krum(codec: Codec | CodecPolicy | None = None, f: int = 1, m: int = 1) -> Aggregator:
    """Krum (``m=1``) or Multi-Krum for ``f`` Byzantine clients (needs ``n >= 2f + 3``
    updates a round). Codecs, weights and memory as :func:`median`."""
    return _robust(codec, Krum(f, m))


def geometric_median(codec: Codec | CodecPolicy | None = None, iterations: int = 100, nu: float = 1e-6,
                     ftol: float = 1e-8) -> Aggregator:
    """Geometric median by smoothed Weiszfeld (``iterations`` at most, smoothing
    ``nu``, relative tolerance ``ftol``). Codecs, weights and memory as :func:`median`."""
    return _robust(codec, GeometricMedian(iterations, nu, ftol))


__all__ = ["CoordinateMedian", "GeometricMedian", "KeptUpdates", "Krum", "RobustRule", "TrimmedMean",
           "geometric_median", "krum", "median", "trimmed_mean"]
