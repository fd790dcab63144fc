"""Structured updates: the client learns its update in a smaller space.

Konečný, McMahan, Yu, Richtárik, Suresh, Bacon, "Federated Learning:
Strategies for Improving Communication Efficiency" (2016), Section 2. Two
structures, each trained *in* the subspace on the client (the optimizer
steps on the small tensors; nothing is projected after training):

* **low rank** (:class:`LowRankSpace`): the update of a weight ``W`` (as a
  matrix ``out × fan_in``; a conv kernel's ``in·kh·kw`` are its ``fan_in``)
  is ``B·A``: ``A`` (``r × fan_in``) random and fixed, only ``B`` (``out ×
  r``, starting at zero) trained and sent — ``r / fan_in`` of the tensor.
  ``A``'s entries are N(0, 1/fan_in), so its rows are nearly orthonormal and
  a step on ``B`` is a step on ``W`` restricted to ``A``'s row space;
* **random mask** (:class:`RandomMaskSpace`): a fixed random set of ``k``
  entries of ``W`` is trained and sent (``k`` values), the rest stay.

``A`` and the mask are drawn from the keyed generator (``torch_rng`` /
``numpy_rng(seed, round, client_id, "lowrank" | "randmask", tensor)``), so
both sides regenerate them from (seed, round, client): the seed is implicit
and costs 0 bits (a deployment shares the run's seed once, out of band; the
server knows which client sent what). Unlike a sketch (:class:`~fedzip.codecs.RandK`
sends a 32-bit seed per tensor) nothing but the trained values travels.

What is sent keeps the model's tensor names (``fc1.weight`` is ``B``, or
the masked values), so the aggregator's codec policy encodes it like any
tensor: quantization (EDEN, uniform, ...) composes. Stages (clipping,
zeroing) see the sent tensors, not ``B·A``.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) composes with
the random mask: the masked values are the model's own entries, so each
client's residual is kept on the model's coordinates and the mask of the
round gathers and scatters it (see :mod:`fedzip.algorithms.space`). Not with
low rank: ``A`` is redrawn every round, so ``B``'s entries mean other
directions each round and none is a model coordinate; a residual in them has
nowhere to go (and ``B·A`` cannot hold the dense residual either).

Byzantine-robust rules (:mod:`fedzip.robust`) compose with both: on
``B·A`` (every coordinate held) for low rank; for the random mask over the
clients that held an entry with ``per_coordinate=True`` (without it the
zeros of the entries a client did not train count as its values, as in the
paper's mean). Secure aggregation composes too: its codes are summed position
by position, so each client sends its update on the model's coordinates
(``B·A``; the masked entries with zeros elsewhere), and the uplink costs the
whole model (:class:`~fedzip.algorithms.space.ModelCoordinates`). The
clients' stages (clipping, zeroing) then see that update, ``B·A``, not ``B``.

Which tensors are structured: those with at least two dimensions and more
than ``threshold`` entries, whose structure is smaller than the tensor;
the others (biases) are trained and sent whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.dropout import _check_aggregator, on_the_wire
from fedzip.algorithms.space import UpdateSpace
from fedzip.errors import ConfigError
from fedzip.seeding import numpy_rng, torch_rng
from fedzip.tree import Params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class StructuredSpace(UpdateSpace):
    """What the two structures share: the client trains small tensors for the
    structured weights and the rest whole, and sends them under the model's
    names. Subclasses define the structure (``small_shape``, ``expand_one``,
    and ``delta``, the weight's update from the small tensor)."""

    purpose = "structured"
    sends_model_coordinates = False  # the small tensors under the model's names

    def __init__(self, seed: int, threshold: int = 0) -> None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ConfigError(f"threshold must be a non-negative integer, got {threshold!r}")
        self.seed = int(seed)  # the client regenerates the structure from it
        self.threshold = threshold
        self._drawn: tuple[tuple[str, int, int], dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_drawn": None}  # a worker draws its own clients'

    def structure(self, name: str, shape: tuple[int, ...], client_id: str, round_num: int, seed: int) -> Any:
        """:meth:`draw`, once per tensor of the client and round at hand: its
        training, its error-feedback residuals (gathered, then scattered) and
        the server's expansion ask for the same structure (a mask of a quarter
        of the seed CNN's fc1 takes about 4 ms to draw)."""
        key = (client_id, round_num, seed)
        if self._drawn is None or self._drawn[0] != key:
            self._drawn = (key, {})
        drawn = self._drawn[1]
        if name not in drawn:
            drawn[name] = self.draw(name, shape, client_id, round_num, seed)
        return drawn[name]

    def structured(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2 and _numel(shape) > self.threshold and \
            _numel(self.small_shape(shape)) < _numel(shape)

    def small_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def draw(self, name: str, shape: tuple[int, ...], client_id: str, round_num: int, seed: int) -> Any:
        """The tensor's structure (``A``, the mask) from the keyed generator."""
        raise NotImplementedError

    def delta(self, small: torch.Tensor, structure: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """The weight's update (differentiable in ``small``)."""
        raise NotImplementedError

    def held(self, structure: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The entries of one structured tensor a client holds (None: all of them)."""
        return None

    # -- server --------------------------------------------------------------

    def sent_shapes(self, template, client_id, round_num, seed):
        return {k: self.small_shape(s) if self.structured(s) else tuple(s) for k, s in template.items()}

    def expand(self, sent, template, client_id, round_num, seed):
        full: Params = {}
        for name, shape in template.items():
            shape = tuple(shape)
            if not self.structured(shape):
                full[name] = sent[name]
                continue
            full[name] = self.delta(sent[name], self.structure(name, shape, client_id, round_num, seed), shape)
        return full, self.coverage(template, client_id, round_num, seed)

    def coverage(self, template, client_id, round_num, seed):
        out: dict[str, torch.Tensor] = {}
        for name, shape in template.items():
            shape = tuple(shape)
            if self.structured(shape):
                held = self.held(self.structure(name, shape, client_id, round_num, seed), shape)
                if held is not None:
                    out[name] = held
        return out or None

    # -- client --------------------------------------------------------------

    def prepare(self, model: nn.Module, received: Params, ctx: Any) -> tuple[nn.Module, list[torch.Tensor]]:
        sub = SubspaceModel(self, model, received, ctx.client_id, ctx.round)
        return sub, list(sub.parameters())

    def update(self, module: nn.Module, model: nn.Module, received: Params, ctx: Any) -> Params:
        return module.sent()


class SubspaceModel(nn.Module):
    """``model`` run with ``W = W_received + delta(small)`` for the structured
    tensors (only ``small`` trained) and the other tensors trained whole.
    ``sent()``: the small tensors and the whole tensors' deltas."""

    def __init__(self, space: StructuredSpace, model: nn.Module, received: Params, client_id: str,
                 round_num: int) -> None:
        super().__init__()
        self._model = [model]  # not a submodule: its parameters are not trained
        self.space = space
        self.received = {k: v.detach() for k, v in received.items()}
        self.structures: dict[str, Any] = {}
        self.small = nn.ParameterDict()
        self.whole = nn.ParameterDict()
        self.keys: dict[str, str] = {}
        for name, value in self.received.items():
            shape = tuple(value.shape)
            key = name.replace(".", "__")
            self.keys[name] = key
            if space.structured(shape):
                s = space.structure(name, shape, client_id, round_num, space.seed)
                self.structures[name] = s.to(value.device) if isinstance(s, torch.Tensor) else s
                self.small[key] = nn.Parameter(torch.zeros(space.small_shape(shape), device=value.device))
            else:
                self.whole[key] = nn.Parameter(value.clone())

    def effective(self) -> Params:
        out = {}
        for name, w0 in self.received.items():
            key = self.keys[name]
            if name in self.structures:
                out[name] = w0 + self.space.delta(self.small[key], self.structures[name], tuple(w0.shape))
            else:
                out[name] = self.whole[key]
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model[0], self.effective(), args, kwargs)

    def sent(self) -> Params:
        out = {}
        for name, w0 in self.received.items():
            key = self.keys[name]
            if name in self.structures:
                out[name] = self.small[key].detach().cpu()
            else:
                out[name] = (self.whole[key].detach() - w0).cpu()
        return out


class LowRankSpace(StructuredSpace):
    """Updates ``B·A`` of rank ``r`` (see the module doc): ``rank`` for every
    tensor, or ``fraction`` of each tensor's ``fan_in`` (rounded, at least 1),
    which makes what is sent about ``fraction`` of the tensor."""

    purpose = "lowrank"

    def __init__(self, seed: int, rank: int | None = None, fraction: float | None = 0.25,
                 threshold: int = 0) -> None:
        super().__init__(seed, threshold)
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise ConfigError(f"low rank: rank must be a positive integer or None, got {rank!r}")
        if rank is None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                             or not 0 < fraction <= 1):
            raise ConfigError(f"low rank: fraction must be in (0, 1] (or give rank), got {fraction!r}")
        self.rank = rank
        self.fraction = None if rank is not None else float(fraction)

    def r(self, shape: tuple[int, ...]) -> int:
        fan_in = _numel(shape[1:])
        if self.rank is not None:
            return self.rank
        return max(1, int(np.floor(self.fraction * fan_in + 0.5)))

    def small_shape(self, shape):
        return (int(shape[0]), self.r(shape))

    def draw(self, name, shape, client_id, round_num, seed):
        fan_in = _numel(shape[1:])
        g = torch_rng(seed, round_num, client_id, self.purpose, name)
        return torch.randn(self.r(shape), fan_in, generator=g) / float(np.sqrt(fan_in))

    def delta(self, small, structure, shape):
        return (small.to(structure.dtype) @ structure).reshape(shape)

    def coverage(self, template, client_id, round_num, seed):
        return None  # B·A is dense: every client holds every coordinate (and A need not be drawn)


class RandomMaskSpace(StructuredSpace):
    """Only ``fraction`` of each structured tensor's entries (a random mask,
    ``k = round(fraction · numel)``) trained and sent (see the module doc).
    ``per_coordinate``: average each entry over the clients whose mask held it
    (as federated dropout does); default the paper's mean over all clients."""

    purpose = "randmask"
    moves_residuals = True  # the mask changes every round (see the module doc)

    def __init__(self, seed: int, fraction: float = 0.25, threshold: int = 0,
                 per_coordinate: bool = False) -> None:
        super().__init__(seed, threshold)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"random mask: fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.per_coordinate = bool(per_coordinate)

    def k(self, shape: tuple[int, ...]) -> int:
        return max(1, int(np.floor(self.fraction * _numel(shape) + 0.5)))

    def small_shape(self, shape):
        return (self.k(shape),)

    def draw(self, name, shape, client_id, round_num, seed):
        rng = numpy_rng(seed, round_num, client_id, self.purpose, name)
        idx = rng.choice(_numel(shape), size=self.k(shape), replace=False, shuffle=False)
        return torch.from_numpy(np.sort(idx).astype(np.int64))

    def delta(self, small, structure, shape):
        flat = torch.zeros(_numel(shape), dtype=small.dtype, device=small.device)
        return flat.index_add(0, structure, small).reshape(shape)

    # -- error feedback: residuals on the model's coordinates -----------------

    def gather(self, name, full, client_id, round_num, seed):
        shape = tuple(full.shape)
        if not self.structured(shape):
            return full
        return full.reshape(-1)[self.structure(name, shape, client_id, round_num, seed)]

    def scatter(self, name, full, sent, client_id, round_num, seed):
        shape = tuple(full.shape)
        if not self.structured(shape):
            return sent
        flat = full.reshape(-1).clone()
        flat[self.structure(name, shape, client_id, round_num, seed)] = sent.reshape(-1).to(flat.dtype)
        return flat.reshape(shape)

    def coverage(self, template, client_id, round_num, seed):
        return super().coverage(template, client_id, round_num, seed) if self.per_coordinate else None

    def held(self, structure, shape):
        if not self.per_coordinate:
            return None
        held = torch.zeros(_numel(shape), dtype=torch.bool)
        held[structure.cpu()] = True
        return held.reshape(shape)


# --------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------


#: why error feedback is refused with low-rank updates (see the module doc)
LOWRANK_NO_FEEDBACK = ("low-rank clients send B of B·A, and A is redrawn every round (from seed, round and "
                       "client), so B's entries mean other directions each round and none is a model "
                       "coordinate: a residual kept in them has no coordinates to carry over to the next "
                       "round. Random-mask updates and federated dropout take error feedback")


class LowRankUpdates(FederatedAlgorithm):
    """FedAvg with low-rank structured updates (Konečný et al. 2016): see
    :class:`LowRankSpace` for ``rank``, ``fraction`` and ``threshold``."""

    name = "lowrank"

    def __init__(self, *args: Any, rank: int | None = None, fraction: float | None = 0.25,
                 threshold: int = 0, **kwargs: Any) -> None:
        self._space_args = {"rank": rank, "fraction": fraction, "threshold": threshold}
        LowRankSpace(0, **self._space_args)  # validates before the rest is built
        super().__init__(*args, **kwargs)
        _check_aggregator(self, no_feedback=LOWRANK_NO_FEEDBACK)

    def update_space(self) -> UpdateSpace:
        return on_the_wire(self, LowRankSpace(self.seed, **self._space_args))


class RandomMaskUpdates(FederatedAlgorithm):
    """FedAvg with random-mask structured updates (Konečný et al. 2016): see
    :class:`RandomMaskSpace` for ``fraction``, ``threshold`` and ``per_coordinate``."""

    name = "randmask"

    def __init__(self, *args: Any, fraction: float = 0.25, threshold: int = 0, per_coordinate: bool = False,
                 **kwargs: Any) -> None:
        self._space_args = {"fraction": fraction, "threshold": threshold, "per_coordinate": per_coordinate}
        RandomMaskSpace(0, **self._space_args)
        super().__init__(*args, **kwargs)
        _check_aggregator(self)

    def update_space(self) -> UpdateSpace:
        return on_the_wire(self, RandomMaskSpace(self.seed, **self._space_args))


def lowrank_updates(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
                    aggregator: Any = None, **kwargs: Any) -> LowRankUpdates:
    """Low-rank structured updates; other arguments as :func:`~fedzip.weighted_fedavg`."""
    return LowRankUpdates(model_fn, client_optimizer, server_optimizer, aggregator, **kwargs)


def random_mask_updates(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
                        aggregator: Any = None, **kwargs: Any) -> RandomMaskUpdates:
    """Random-mask structured updates; other arguments as :func:`~fedzip.weighted_fedavg`."""
    return RandomMaskUpdates(model_fn, client_optimizer, server_optimizer, aggregator, **kwargs)


def trained_numel(space: UpdateSpace, shapes: Mapping[str, tuple[int, ...]], client_id: str = "",
                  round_num: int = 1, seed: int = 0) -> int:
    """How many numbers a client of ``space`` trains and sends (``shapes``: the model's)."""
    return sum(_numel(s) for s in space.sent_shapes(shapes, client_id, round_num, seed).values())


__all__ = ["LowRankSpace", "LowRankUpdates", "RandomMaskSpace", "RandomMaskUpdates", "StructuredSpace",
           "SubspaceModel", "lowrank_updates", "random_mask_updates", "trained_numel"]
