"""Federated dropout: each client trains a smaller sub-model.

Caldas, Konečný, McMahan, Talwalkar, "Expanding the Reach of Federated
Learning by Reducing Client Resource Requirements" (2018): in each round the
server removes a fixed fraction of the units of every layer it can shrink —
the fully connected layers' units, the convolutional layers' filters (and,
for recurrent models, the LSTM's hidden units) — and sends the client the
smaller dense model made of what is left. The client trains that model, so
the broadcast, the update and the client's compute all shrink; the server
maps the sub-update back onto the full model's coordinates and averages each
coordinate over the clients that held it (coordinates no client held do not
move). The output layer's units (the classes) are never dropped.

Which units a client keeps is drawn by the server from the keyed generator
``numpy_rng(seed, round, client_id, "dropout", layer)``; the client needs no
indices (it trains the dense tensors it received), so they cost no bits. The
sub-model's tensors go in the client's personal message (group ``model``),
encoded by the broadcast codec (Kashin or a Hadamard rotation with
quantization, as in the paper) and counted per client.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) composes: each
client's residual is kept on the full model's coordinates; each round the
entries of its kept units are gathered into the sub-update's layout before
encoding, and the new residual is scattered back there. The coordinates it
did not hold this round keep their residual until it holds them again. For
this the client regenerates its kept units from the run's seed (as random
masks are), so they still cost no bits.

Byzantine-robust rules (:mod:`fedzip.robust`) compose: each is taken over
the clients that held a coordinate (the median of its holders, Krum's
distances over the coordinates two clients share, ...). So does secure
aggregation (:mod:`fedzip.privacy.secagg`): masks cancel only position by
position, so each client maps its sub-update onto the full model's
coordinates itself (zeros for the units it did not keep) before encoding
and masking, and the server divides each coordinate's sum by the surviving
clients that held it, which it derives from (seed, round, client id). The
uplink then costs the whole model; the sub-model broadcast and the client's
compute still shrink (:func:`on_the_wire`). The same holds for a summable
codec without the protocol (distributed DP with ``secure=False``): its
codes are added position by position before anything is decoded.

What this understands is declared per model class in :data:`PLANS`, a
*dropout plan*: the unit groups of the model (a layer's outputs), each with
the tensor axes its units index — its own rows (and bias), and the next
layer's input columns. Built in: :class:`~fedzip.models.FedAvgCNN` (conv1's
and conv2's filters, fc1's units; conv2's filters reach fc1 through the
flatten as blocks of 7×7 columns), :class:`~fedzip.models.CharLSTM` (each
LSTM layer's hidden units: four gate rows each, the recurrent columns, the
next layer's columns) and an ``nn.Sequential`` of ``Linear`` layers and
elementwise activations. Any other model is refused with a
:class:`~fedzip.errors.ConfigError` naming its layer types; give it a plan
with :func:`register_dropout_plan` (:func:`chain_plan` and :func:`lstm_plan`
build the common ones). The sub-model the client trains is a real smaller
module (its layers rebuilt with fewer units), so its compute shrinks;
:func:`step_macs` counts it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.space import ModelCoordinates, UpdateSpace
from fedzip.errors import ConfigError, PayloadError
from fedzip.models import CharLSTM, FedAvgCNN
from fedzip.seeding import numpy_rng
from fedzip.tree import Params

#: the layer kinds whose units can be dropped, each with its own kept fraction
KINDS = ("fc", "conv", "lstm")


@dataclass(frozen=True)
class Coords:
    """Where a unit group sits in one tensor: along ``axis``, unit ``j`` of
    ``size`` owns the indices ``o·size·inner + j·inner + t`` for ``o < outer``,
    ``t < inner``. ``outer``: an LSTM's four gate blocks; ``inner``: the
    spatial block a conv filter becomes after a flatten (7×7 in the CNN)."""

    param: str
    axis: int
    outer: int = 1
    inner: int = 1


@dataclass(frozen=True)
class UnitGroup:
    """The output units of one layer: ``size`` of them, of ``kind`` ("fc",
    "conv", "lstm"), and every tensor axis they index."""

    name: str
    kind: str
    size: int
    coords: tuple[Coords, ...]

    def indices(self, kept: np.ndarray, c: Coords) -> torch.Tensor:
        """The indices along ``c.axis`` that the ``kept`` units own (ascending)."""
        units = torch.from_numpy(np.asarray(kept, dtype=np.int64))
        idx = (torch.arange(c.outer)[:, None, None] * (self.size * c.inner)
               + units[None, :, None] * c.inner + torch.arange(c.inner)[None, None, :])
        return idx.reshape(-1)


# --------------------------------------------------------------------------
# Plans: which units a model has and where they sit
# --------------------------------------------------------------------------


def _linear_or_conv(name: str, layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "fc"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1:
            raise ConfigError(f"federated dropout: {name} ({type(layer).__name__}) has groups="
                              f"{layer.groups}; only groups=1 convolutions can lose filters")
        return "conv"
    raise ConfigError(f"federated dropout does not understand layer {name!r} of type "
                      f"{type(layer).__name__} in a chain (Linear and Conv layers only)")


def chain_plan(layers: Sequence[tuple[str, nn.Module]]) -> list[UnitGroup]:
    """The plan of a chain of ``Linear``/``Conv`` layers where each layer's
    outputs are the next one's inputs (elementwise activations and pooling in
    between; a flatten from a conv to a linear layer is allowed: each filter
    becomes ``in_features / out_channels`` consecutive columns). ``layers``
    are ``(name prefix, layer)`` pairs in order; the last layer's outputs are
    kept whole."""
    kinds = [_linear_or_conv(name, layer) for name, layer in layers]
    plan = []
    for i in range(len(layers) - 1):
        (name, layer), (nxt_name, nxt) = layers[i], layers[i + 1]
        size = layer.out_features if kinds[i] == "fc" else layer.out_channels
        nxt_in = nxt.in_features if kinds[i + 1] == "fc" else nxt.in_channels
        if kinds[i] == "conv" and kinds[i + 1] == "fc":
            if nxt_in % size:
                raise ConfigError(f"federated dropout: {nxt_name} has {nxt_in} inputs, not a multiple of "
                                  f"{name}'s {size} filters (a flatten between them is assumed)")
            inner = nxt_in // size
        elif nxt_in == size:
            inner = 1
        else:
            raise ConfigError(f"federated dropout: {name} has {size} outputs but {nxt_name} takes {nxt_in}")
        coords = [Coords(f"{name}.weight", 0)]
        if getattr(layer, "bias", None) is not None:
            coords.append(Coords(f"{name}.bias", 0))
        coords.append(Coords(f"{nxt_name}.weight", 1, inner=inner))
        plan.append(UnitGroup(name, kinds[i], size, tuple(coords)))
    return plan


def lstm_plan(name: str, lstm: nn.LSTM, next_name: str, next_layer: nn.Linear) -> list[UnitGroup]:
    """The plan of an ``nn.LSTM`` (unidirectional, no projection) whose last
    layer feeds the linear layer ``next_layer``: each layer's hidden units,
    dropped from its four gates' rows, its recurrent columns and the next
    layer's input columns. Inputs (an embedding) are kept whole."""
    if lstm.bidirectional or lstm.proj_size:
        raise ConfigError(f"federated dropout: {name} is a bidirectional or projected LSTM; "
                          "only plain unidirectional LSTMs are understood")
    if not isinstance(next_layer, nn.Linear) or next_layer.in_features != lstm.hidden_size:
        raise ConfigError(f"federated dropout: {next_name} must be a Linear taking the LSTM's "
                          f"{lstm.hidden_size} hidden units")
    plan = []
    for k in range(lstm.num_layers):
        coords = [Coords(f"{name}.weight_ih_l{k}", 0, outer=4), Coords(f"{name}.weight_hh_l{k}", 0, outer=4),
                  Coords(f"{name}.weight_hh_l{k}", 1)]
        if lstm.bias:
            coords += [Coords(f"{name}.bias_ih_l{k}", 0, outer=4), Coords(f"{name}.bias_hh_l{k}", 0, outer=4)]
        following = f"{name}.weight_ih_l{k + 1}" if k + 1 < lstm.num_layers else f"{next_name}.weight"
        coords.append(Coords(following, 1))
        plan.append(UnitGroup(f"{name}.l{k}", "lstm", lstm.hidden_size, tuple(coords)))
    return plan


def _fedavg_cnn_plan(model: FedAvgCNN) -> list[UnitGroup]:
    return chain_plan([("conv1", model.conv1), ("conv2", model.conv2), ("fc1", model.fc1),
                       ("fc2", model.fc2)])


def _char_lstm_plan(model: CharLSTM) -> list[UnitGroup]:
    return lstm_plan("lstm", model.lstm, "fc", model.fc)


#: elementwise layers a Sequential may hold between its Linear layers
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Identity, nn.Dropout)


def _sequential_plan(model: nn.Sequential) -> list[UnitGroup]:
    linears = []
    for i, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            linears.append((i, layer))
        elif isinstance(layer, nn.Flatten) and not linears:
            continue  # flattening the input
        elif not isinstance(layer, ELEMENTWISE):
            raise ConfigError(f"federated dropout does not understand layer {i} of the nn.Sequential: "
                              f"{type(layer).__name__} (it knows Linear layers and elementwise activations "
                              f"{', '.join(c.__name__ for c in ELEMENTWISE)})")
    if not linears:
        raise ConfigError("federated dropout: the nn.Sequential has no Linear layer")
    return chain_plan(linears)


#: model class → its dropout plan (exact classes: a subclass may change ``forward``)
PLANS: dict[type, Callable[[Any], list[UnitGroup]]] = {
    FedAvgCNN: _fedavg_cnn_plan,
    CharLSTM: _char_lstm_plan,
    nn.Sequential: _sequential_plan,
}


def register_dropout_plan(cls: type, plan: Callable[[Any], list[UnitGroup]]) -> None:
    """Teach federated dropout a model class: ``plan(model)`` returns its unit
    groups (e.g. from :func:`chain_plan` and :func:`lstm_plan`)."""
    if not isinstance(cls, type) or not callable(plan):
        raise ConfigError("register_dropout_plan takes a model class and a function model -> plan")
    PLANS[cls] = plan


def dropout_plan(model: nn.Module) -> list[UnitGroup]:
    """The unit groups of ``model``, checked against its tensors; a model it
    does not understand is a :class:`ConfigError` naming its layer types."""
    fn = PLANS.get(type(model))
    if fn is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if m._parameters and
                        any(p is not None for p in m._parameters.values())})
        raise ConfigError(
            f"federated dropout does not understand {type(model).__name__} (layers with parameters: "
            f"{', '.join(kinds) or 'none'}); it knows FedAvgCNN, CharLSTM and nn.Sequential of Linear "
            "layers and elementwise activations (fc units, conv filters, LSTM hidden units). Describe "
            "your model with fedzip.algorithms.dropout.register_dropout_plan")
    plan = fn(model)
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    claimed: set[tuple[str, int]] = set()
    for g in plan:
        if g.kind not in KINDS:
            raise ConfigError(f"dropout plan: group {g.name!r} has kind {g.kind!r}, not one of {KINDS}")
        for c in g.coords:
            if c.param not in shapes:
                raise ConfigError(f"dropout plan: group {g.name!r} names {c.param!r}, not a model tensor")
            if c.axis >= len(shapes[c.param]) or shapes[c.param][c.axis] != c.outer * g.size * c.inner:
                raise ConfigError(f"dropout plan: {c.param} {shapes[c.param]} axis {c.axis} does not hold "
                                  f"{c.outer} x {g.size} x {c.inner} entries of group {g.name!r}")
            if (c.param, c.axis) in claimed:
                raise ConfigError(f"dropout plan: {c.param} axis {c.axis} belongs to two groups")
            claimed.add((c.param, c.axis))
    return plan


# --------------------------------------------------------------------------
# The sub-model: which units, its tensors, and back
# --------------------------------------------------------------------------


def kept_count(size: int, fraction: float) -> int:
    """Units kept of ``size`` at ``fraction`` (rounded, at least one)."""
    return max(1, min(size, int(math.floor(fraction * size + 0.5))))


def kept_units(plan: Sequence[UnitGroup], keep: Mapping[str, float], seed: int, round_num: int,
               client_id: str) -> dict[str, np.ndarray]:
    """Each group's kept units (sorted), drawn from the keyed generator."""
    out = {}
    for g in plan:
        k = kept_count(g.size, keep[g.kind])
        if k == g.size:
            out[g.name] = np.arange(g.size, dtype=np.int64)
        else:
            rng = numpy_rng(seed, round_num, client_id, "dropout", g.name)
            out[g.name] = np.sort(rng.choice(g.size, size=k, replace=False)).astype(np.int64)
    return out


def _axis_indices(plan: Sequence[UnitGroup], kept: Mapping[str, np.ndarray]) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for g in plan:
        for c in g.coords:
            out.setdefault(c.param, {})[c.axis] = g.indices(kept[g.name], c)
    return out


def sub_params(params: Params, plan: Sequence[UnitGroup], kept: Mapping[str, np.ndarray]) -> Params:
    """The sub-model's tensors: ``params`` restricted to the kept units."""
    axes = _axis_indices(plan, kept)
    out = {}
    for name, value in params.items():
        for axis, idx in axes.get(name, {}).items():
            value = value.index_select(axis, idx.to(value.device))
        out[name] = value.contiguous()
    return out


def _held(shape: tuple[int, ...], axes: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The coordinates of a tensor of ``shape`` that the kept indices along ``axes`` hold."""
    mask = torch.ones(shape, dtype=torch.bool)
    for axis, idx in axes.items():
        held = torch.zeros(shape[axis], dtype=torch.bool)
        held[idx] = True
        view = [1] * len(shape)
        view[axis] = shape[axis]
        mask = mask & held.view(view)
    return mask


def expand_params(sent: Params, shapes: Mapping[str, tuple[int, ...]], plan: Sequence[UnitGroup],
                  kept: Mapping[str, np.ndarray]) -> tuple[Params, dict[str, torch.Tensor]]:
    """Sub-model tensors on the full model's coordinates (zeros elsewhere),
    and the coordinates they hold (for the tensors that lost any)."""
    axes = _axis_indices(plan, kept)
    full: Params = {}
    coverage: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        value = sent[name]
        if name not in axes:
            full[name] = value
            continue
        mask = _held(tuple(shape), axes[name])
        out = torch.zeros(shape, dtype=value.dtype)
        # indices ascend along every axis: the sub-tensor's row-major order is the mask's
        out.masked_scatter_(mask, value.contiguous())
        full[name] = out
        coverage[name] = mask
    return full, coverage


def _rebuild(module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """A fresh, uninitialised (meta) layer like ``module`` for parameters of ``shapes``."""
    if isinstance(module, nn.Linear):
        out, fan_in = shapes["weight"]
        return nn.Linear(fan_in, out, bias="bias" in shapes, device="meta")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        w = shapes["weight"]
        return type(module)(w[1], w[0], module.kernel_size, module.stride, module.padding, module.dilation, 1,
                            "bias" in shapes, module.padding_mode, device="meta")
    if isinstance(module, nn.LSTM) and not module.bidirectional and not module.proj_size:
        hidden = {shapes[f"weight_hh_l{k}"][1] for k in range(module.num_layers)}
        if len(hidden) != 1:
            raise PayloadError(f"an LSTM's layers must keep the same number of units, got {sorted(hidden)}")
        return nn.LSTM(shapes["weight_ih_l0"][1], hidden.pop(), module.num_layers, module.bias,
                       module.batch_first, module.dropout, device="meta")
    raise ConfigError(f"federated dropout cannot shrink a {type(module).__name__}")


def sub_module(model: nn.Module, params: Params) -> nn.Module:
    """A module like ``model`` holding ``params`` (names as the model's, shapes
    smaller): the layers whose tensors shrank are rebuilt with fewer units,
    every parameter is a fresh copy of ``params``. ``model`` is not changed."""

    def clone(mod: nn.Module, prefix: str) -> nn.Module:
        own = {n: p for n, p in mod._parameters.items() if p is not None}
        shapes = {n: tuple(params[prefix + n].shape) for n in own}
        if any(shapes[n] != tuple(p.shape) for n, p in own.items()):
            new = _rebuild(mod, shapes)
            new.train(mod.training)
        else:
            new = copy.copy(mod)
            new._parameters = dict(mod._parameters)
            new._buffers = dict(mod._buffers)
            new._modules = {}
        for n, p in own.items():
            value = params[prefix + n].detach().clone()
            if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
                value = value.contiguous(memory_format=torch.channels_last)  # as the model runs it
            setattr(new, n, nn.Parameter(value, requires_grad=p.requires_grad))
        for n, child in mod._modules.items():
            new._modules[n] = None if child is None else clone(child, f"{prefix}{n}.")
        return new

    names = {k for k, _ in model.named_parameters()}
    if set(params) != names:
        raise PayloadError(f"the sub-model's tensors {sorted(set(params) ^ names)[:5]} do not match the model's")
    return clone(model, "")


class DropoutSpace(UpdateSpace):
    """Federated dropout as an :class:`UpdateSpace`: each client receives and
    trains the sub-model of its kept units (see the module doc).

    Args:
        plan: the model's unit groups (:func:`dropout_plan`).
        keep: kept fraction per kind (``"fc"``, ``"conv"``, ``"lstm"``).
    """

    personal_model = True
    moves_residuals = True  # the kept units change every round (see the module doc)
    sends_model_coordinates = False  # the sub-model's tensors

    def __init__(self, plan: Sequence[UnitGroup], keep: Mapping[str, float]) -> None:
        self.plan = tuple(plan)
        self.keep = dict(keep)

    def kept(self, client_id: str, round_num: int, seed: int) -> dict[str, np.ndarray]:
        """The units ``client_id`` keeps in ``round_num`` (group name → sorted indices)."""
        return kept_units(self.plan, self.keep, seed, round_num, client_id)

    def client_model(self, params: Params, client_id: str, round_num: int, seed: int) -> Params:
        return sub_params(params, self.plan, self.kept(client_id, round_num, seed))

    def sent_shapes(self, template, client_id, round_num, seed):
        shapes = {k: list(v) for k, v in template.items()}
        for g in self.plan:
            k = kept_count(g.size, self.keep[g.kind])
            for c in g.coords:
                shapes[c.param][c.axis] = c.outer * k * c.inner
        return {k: tuple(v) for k, v in shapes.items()}

    def expand(self, sent, template, client_id, round_num, seed):
        return expand_params(sent, template, self.plan, self.kept(client_id, round_num, seed))

    def coverage(self, template, client_id, round_num, seed):
        axes = _axis_indices(self.plan, self.kept(client_id, round_num, seed))
        return {name: _held(tuple(template[name]), ax) for name, ax in axes.items()}

    def prepare(self, model: nn.Module, received: Params, ctx: Any) -> tuple[nn.Module, list[torch.Tensor]]:
        sub = sub_module(model, received)
        return sub, list(sub.parameters())

    # -- error feedback: residuals on the full model's coordinates ------------
    # The client regenerates its kept units from the run's seed (as random masks
    # do), so carrying a residual across rounds costs no bits either.

    def _axes(self, name: str, client_id: str, round_num: int, seed: int) -> dict[int, torch.Tensor]:
        return _axis_indices(self.plan, self.kept(client_id, round_num, seed)).get(name, {})

    def gather(self, name, full, client_id, round_num, seed):
        for axis, idx in self._axes(name, client_id, round_num, seed).items():
            full = full.index_select(axis, idx)
        return full.contiguous()

    def scatter(self, name, full, sent, client_id, round_num, seed):
        axes = self._axes(name, client_id, round_num, seed)
        if not axes:
            return sent
        # indices ascend along every axis: the sub-tensor's row-major order is the mask's
        return full.clone().masked_scatter_(_held(tuple(full.shape), axes), sent.to(full.dtype).contiguous())


# --------------------------------------------------------------------------
# Compute, measured
# --------------------------------------------------------------------------


def step_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> int:
    """Multiply-adds of one training step (forward and backward) of ``module``
    on the batch ``(x, y)``, counted by ``torch.utils.flop_counter`` (flops /
    2). oneDNN is off while counting: its fused CPU LSTM is invisible to the
    counter, the plain one runs as matrix products it counts."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in module.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
            loss = loss_fn(module(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    del grads
    return int(counter.get_total_flops()) // 2


# --------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"federated dropout: {name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


class FederatedDropout(FederatedAlgorithm):
    """FedAvg whose clients train sub-models (Caldas et al. 2018; see the module doc).

    Args:
        keep: the fraction of units kept in every layer that loses any (the
            paper's ``1 - dropout rate``; default 0.75).
        keep_fc, keep_conv, keep_lstm: per kind, overriding ``keep``
            (fully connected units, conv filters, LSTM hidden units).
        Other arguments as :class:`~fedzip.algorithms.base.FederatedAlgorithm`;
        ``broadcast_codec`` encodes each client's sub-model (Kashin, a rotation).
    """

    name = "fed_dropout"

    def __init__(self, *args: Any, keep: float = 0.75, keep_fc: float | None = None,
                 keep_conv: float | None = None, keep_lstm: float | None = None, **kwargs: Any) -> None:
        base = _fraction("keep", keep)
        self.keep = {kind: base if v is None else _fraction(f"keep_{kind}", v)
                     for kind, v in (("fc", keep_fc), ("conv", keep_conv), ("lstm", keep_lstm))}
        super().__init__(*args, **kwargs)
        _check_aggregator(self)

    def update_space(self) -> UpdateSpace:
        return on_the_wire(self, DropoutSpace(dropout_plan(_template_model(self)), self.keep))


def _template_model(algo: FederatedAlgorithm) -> nn.Module:
    """The task's model, built without touching the global generator."""
    with torch.random.fork_rng(devices=[]):
        model = algo.task.model_fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    return model


def on_the_wire(algo: FederatedAlgorithm, space: UpdateSpace) -> UpdateSpace:
    """``space`` as ``algo``'s clients use it: where codes are summed before
    anything is decoded (secure aggregation's masked codes, a summable codec's
    :class:`~fedzip.aggregators.EncodedSum`: distributed DP) each client
    sends its update on the model's coordinates
    (:class:`~fedzip.algorithms.space.ModelCoordinates`), since codes add up
    position by position; otherwise its own coordinates (cheaper)."""
    agg = algo.aggregator
    summed = getattr(agg, "secure", None) is not None or (
        getattr(agg, "accumulator_kind", None) is None and agg.policy.summable())
    return ModelCoordinates(space, algo.seed) if summed else space


def _check_aggregator(algo: FederatedAlgorithm, no_feedback: str | None = None) -> None:
    """Refuse what cannot work when each client sends its own coordinates.
    ``no_feedback``: why error feedback cannot work in this space (None: it
    works, its residuals kept on the model's coordinates by the space).

    Robust rules compose (taken over the clients that held each coordinate,
    :mod:`fedzip.robust`), and so does secure aggregation (the clients send on
    the model's coordinates, :func:`on_the_wire`)."""
    from fedzip.codecs import ErrorFeedback
    from fedzip.codecs.feedback import unmapped_feedback

    agg = algo.aggregator
    for codec in agg.policy.codecs():
        if no_feedback is not None:
            c = codec
            while c is not None:
                if isinstance(c, ErrorFeedback):
                    raise ConfigError(f"{algo.name}: error feedback cannot work here: {no_feedback}")
                c = getattr(c, "inner", None)
        outer = unmapped_feedback(codec)
        if outer is not None:
            raise ConfigError(f"{algo.name}: error feedback inside {outer.tag} would keep its residual on "
                              "that codec's coordinates, not the sent tensor's, so it cannot be carried "
                              "from this round's coordinates to the next's; put ErrorFeedback outermost")


def federated_dropout(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
                      aggregator: Any = None, keep: float = 0.75, **kwargs: Any) -> FederatedDropout:
    """Federated dropout keeping ``keep`` of the units; other arguments as
    :func:`~fedzip.weighted_fedavg` (``keep_fc``, ``keep_conv``, ``keep_lstm`` too)."""
    return FederatedDropout(model_fn, client_optimizer, server_optimizer, aggregator, keep=keep, **kwargs)


__all__ = ["Coords", "DropoutSpace", "FederatedDropout", "PLANS", "UnitGroup", "chain_plan", "dropout_plan",
           "expand_params", "federated_dropout", "kept_units", "lstm_plan", "on_the_wire",
           "register_dropout_plan", "step_macs", "sub_module", "sub_params"]
