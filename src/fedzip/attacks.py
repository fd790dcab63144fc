"""Untrusted clients, for testing robust aggregation: what a few attackers
send, applied to chosen client ids.

Update attacks (the client trains honestly, then sends something else):

* :class:`SignFlip` — ``−λ·update`` (the sign-flipping attack of Li et al., "RSA", AAAI 2019);
* :class:`ScaleUpdate` — ``λ·update`` (boosting, Bhagoji et al., ICML 2019).

They run as a **client-side stage appended innermost** to the attacking
clients' copy of the aggregator (:class:`AttackedWork`, a wrapper of the
algorithm's :class:`~fedzip.algorithms.client.ClientWork`): the update is
changed *after* the honest stages (zeroing, clipping) and *before* the codec,
so an attacker skips client-side clipping, as a client running its own code
would, and its message is as well formed as an honest one. Only the server
side of the chain sees every client alike; that is where a defence lives
(:mod:`fedzip.robust`).

Message attacks: ``weight=`` in :class:`AttackedWork` rewrites the example
weight an attacker reports (a number, or a function of the honest weight), in
the encoded message, as a client lying about its data size would.

Data attacks: :class:`LabelFlip` wraps a :class:`~fedzip.data.FederatedData`
and permutes the labels of chosen clients (``y → C − 1 − y`` by default), so
they train honestly on poisoned data (Tolpegin et al., ESORICS 2020).

:func:`attacked` puts the wrapper on an algorithm::

    fa = attacked(fedzip.weighted_fedavg(...), ["c3", "c7"], update=SignFlip(10.0))
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedzip.aggregators import Stage
from fedzip.algorithms.client import ClientResult, ClientTask, ClientWork
from fedzip.data.federated import ClientExamples, FederatedData
from fedzip.errors import ConfigError, DataError
from fedzip.tree import Params
from fedzip.wire import decode_message, encode_message

# --------------------------------------------------------------------------
# Update attacks
# --------------------------------------------------------------------------


class UpdateAttack(abc.ABC):
    """What an attacker sends instead of its honest update."""

    @abc.abstractmethod
    def __call__(self, update: Params) -> Params: ...


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SignFlip(UpdateAttack):
    """Send ``−scale · update``."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        _finite_number("SignFlip scale", self.scale)

    def __call__(self, update: Params) -> Params:
        return {k: v * -self.scale for k, v in update.items()}


@dataclass(frozen=True)
class ScaleUpdate(UpdateAttack):
    """Send ``factor · update``."""

    factor: float

    def __post_init__(self) -> None:
        _finite_number("ScaleUpdate factor", self.factor)

    def __call__(self, update: Params) -> Params:
        return {k: v * self.factor for k, v in update.items()}


@dataclass(frozen=True)
class AttackStage(Stage):
    """A client-side stage that replaces the update by ``attack(update)``; on
    the server it does nothing (it is only in the attackers' chain)."""

    attack: UpdateAttack
    key: str = "attack"

    def init(self) -> dict[str, Any]:
        return {}

    def broadcast(self, state: Mapping[str, Any]) -> dict[str, float]:
        return {}

    def client(self, scalars, update):
        return self.attack(update), {}

    def server(self, state, aggregate, reports, rng):
        return aggregate, dict(state), {}


# --------------------------------------------------------------------------
# The client wrapper
# --------------------------------------------------------------------------


class AttackedWork:
    """A :class:`ClientWork` whose clients in ``attackers`` attack: ``update``
    (an :class:`UpdateAttack`) changes what they send, innermost in their
    chain; ``weight`` (a number, or ``honest_weight -> weight``) is the
    example weight their message reports. Other clients run ``inner``
    unchanged. Picklable (the attackers' copy is rebuilt in each process);
    every other attribute is ``inner``'s."""

    def __init__(self, inner: ClientWork, attackers: Collection[str], update: UpdateAttack | None = None,
                 weight: float | Callable[[float], float] | None = None) -> None:
        if not isinstance(inner, ClientWork):
            raise ConfigError(f"AttackedWork wraps a ClientWork, got {type(inner).__name__}")
        if update is not None and not isinstance(update, UpdateAttack):
            raise ConfigError(f"update must be an UpdateAttack, got {type(update).__name__}")
        if weight is not None and not callable(weight):
            weight = _finite_number("weight", weight)
        self.inner = inner
        self.attackers = frozenset(attackers)
        self.update = update
        self.weight = weight
        self._evil: ClientWork | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_evil"] = None
        return d

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _attacker_work(self) -> ClientWork:
        if self._evil is None:
            self.inner.model()  # built once, shared by the copy
            evil = object.__new__(type(self.inner))  # not copy.copy: that drops the built model
            evil.__dict__.update(self.inner.__dict__)
            if self.update is not None:
                agg = self.inner.aggregator
                keys = {s.key for s in agg.stages}
                key, i = "attack", 1
                while key in keys:
                    key, i = f"attack_{i}", i + 1
                evil.aggregator = replace(agg, stages=(*agg.stages, AttackStage(self.update, key)))
            self._evil = evil
        return self._evil

    def __call__(self, data: FederatedData, task: ClientTask) -> ClientResult:
        if task.client_id not in self.attackers:
            return self.inner(data, task)
        res = self._attacker_work()(data, task)
        if self.weight is None:
            return res
        msg = decode_message(res.message)
        honest = msg.scalars.get("weight", 0.0)
        lie = float(self.weight(honest)) if callable(self.weight) else self.weight
        message = encode_message(msg.kind, {**msg.scalars, "weight": lie}, msg.tensors)
        return ClientResult(res.client_id, message, res.client_state, res.timings)


def attacked(algorithm: Any, attackers: Collection[str], update: UpdateAttack | None = None,
             weight: float | Callable[[float], float] | None = None) -> Any:
    """A shallow copy of ``algorithm`` (a :class:`~fedzip.FederatedAlgorithm`)
    whose clients in ``attackers`` attack (see :class:`AttackedWork`); the
    original is left as it was."""
    out = copy.copy(algorithm)
    out.work = AttackedWork(algorithm.work, attackers, update, weight)
    return out


# --------------------------------------------------------------------------
# Data attacks
# --------------------------------------------------------------------------


class LabelFlip:
    """``data`` with the labels of ``client_ids`` permuted: ``y → permutation[y]``
    (default ``y → num_classes − 1 − y``). Integer class labels of any shape
    (padding ids outside ``0..num_classes−1`` are left alone)."""

    def __init__(self, data: FederatedData, client_ids: Collection[str], num_classes: int,
                 permutation: Sequence[int] | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        perm = list(range(num_classes - 1, -1, -1)) if permutation is None else [int(p) for p in permutation]
        if sorted(perm) != list(range(num_classes)):
            raise ConfigError(f"permutation must reorder 0..{num_classes - 1}, got {permutation!r}")
        self.data = data
        self.flipped = frozenset(client_ids)
        self.num_classes = num_classes
        self.permutation = torch.tensor(perm, dtype=torch.int64)

    @property
    def client_ids(self) -> Sequence[str]:
        return self.data.client_ids

    def client(self, client_id: str) -> ClientExamples:
        ex = self.data.client(client_id)
        if client_id not in self.flipped:
            return ex
        y = ex.y
        if y.is_floating_point():
            raise DataError(f"LabelFlip needs integer labels; client {client_id!r} has {y.dtype}")
        inside = (y >= 0) & (y < self.num_classes)
        flipped = torch.where(inside, self.permutation[y.clamp(0, self.num_classes - 1)].to(y.dtype), y)
        return ClientExamples(ex.x, flipped)


__all__ = ["AttackStage", "AttackedWork", "LabelFlip", "ScaleUpdate", "SignFlip", "UpdateAttack", "attacked"]
