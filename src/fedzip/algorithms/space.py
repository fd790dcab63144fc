"""How a client's update is parametrized, and what model a client trains.

By default a client trains the whole model and sends ``local − received`` for
every tensor (:class:`FullSpace`). Other spaces change three things at once,
on both sides of the wire:

* what the client trains: ``prepare`` returns the module to run and the
  tensors its optimizer updates — a sub-model (federated dropout, Caldas et
  al. 2018) or the factors of an update trained in a subspace (structured
  updates, Konečný et al. 2016: only ``B`` of ``A·B`` is trained);
* what it sends: ``update`` returns the tensors to encode (their shapes are
  the space's, not the model's) — the sub-model's delta, or ``B``;
* how the server reads it: ``sent_shapes`` is the template decoding checks
  against, and ``expand`` maps what was sent back onto the model's
  coordinates, with the coordinates the client held (``coverage``) so the
  mean is taken per coordinate over the clients that held it.

A space that sends each client a different model (``personal_model``) makes
the broadcast per client: :meth:`client_model` gives the tensors that client
receives, sent (and counted) in its personal message instead of the shared
broadcast.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) keeps a residual
on the coordinates of the tensor sent. A space whose coordinates change every
round (``moves_residuals``: other kept units, another mask) keeps each
client's residual on the *model's* coordinates instead: before encoding,
:meth:`gather` reads the entries this round sends, and afterwards
:meth:`scatter` writes the new residual back there. The coordinates not sent
this round keep theirs: an error is carried until they are sent again.

Secure aggregation (:mod:`fedzip.privacy.secagg`) sums masked codes position
by position: the pairwise masks cancel only where every client added its own
at the same position, so code ``i`` must be the same model coordinate for
every client. :class:`ModelCoordinates` wraps a space whose clients send
their own coordinates (federated dropout, a random mask, ``B`` of ``B·A``):
the client still receives and trains what the inner space gives it (a
dropout sub-model stays small on the downlink and in compute), then maps
its update onto the model's coordinates itself (zeros where it held
nothing; ``B·A`` for low rank) before encoding and masking. The uplink then costs the whole model: that is the price of
hiding each update in the sum. The server, which knows no single update,
takes the per-coordinate weights from :meth:`UpdateSpace.coverage`, which
needs only (seed, round, client id): nothing a client sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedzip.codecs import CodecPolicy
from fedzip.codecs.feedback import map_residuals
from fedzip.tree import Params


class UpdateSpace:
    """The whole model, as FedAvg trains it (see the module doc)."""

    #: True when each client receives its own model tensors (personal message)
    personal_model: bool = False
    #: True when the tensors sent are the model's, shape for shape (what secure
    #: aggregation needs); a space whose ``sent_shapes`` differ sets it False
    sends_model_coordinates: bool = True
    #: True when :meth:`gather` and :meth:`scatter` move per-client residuals
    #: between the model's coordinates and the sent ones; False where the sent
    #: coordinates are the model's (FedAvg) and the codec state is left alone
    moves_residuals: bool = False

    # -- server side ---------------------------------------------------------

    def client_model(self, params: Params, client_id: str, round_num: int, seed: int) -> Params:
        """The model tensors ``client_id`` receives (only with ``personal_model``)."""
        return params

    def sent_shapes(self, template: Mapping[str, tuple[int, ...]], client_id: str, round_num: int,
                    seed: int) -> dict[str, tuple[int, ...]]:
        """The names and shapes of the tensors ``client_id`` sends."""
        return dict(template)

    def expand(self, sent: Params, template: Mapping[str, tuple[int, ...]], client_id: str,
               round_num: int, seed: int) -> tuple[Params, dict[str, torch.Tensor] | None]:
        """What was sent, on the model's coordinates, and the coordinates held
        (bool masks; None: all of them)."""
        return sent, None

    def coverage(self, template: Mapping[str, tuple[int, ...]], client_id: str, round_num: int,
                 seed: int) -> dict[str, torch.Tensor] | None:
        """The coordinates ``client_id`` holds in ``round_num`` (bool masks by
        tensor, a tensor left out held whole; None: all), as :meth:`expand`
        returns them, from (seed, round, client) alone: the server computes
        them without looking at the update (secure aggregation's weights)."""
        return None

    # -- client side ---------------------------------------------------------

    def prepare(self, model: nn.Module, received: Params, ctx: Any) -> tuple[nn.Module, list[torch.Tensor]]:
        """The module to train and the tensors the optimizer updates. ``model``
        holds the received weights (for a personal model: ``received`` holds them)."""
        return model, list(model.parameters())

    def update(self, module: nn.Module, model: nn.Module, received: Params, ctx: Any) -> Params:
        """The tensors to send after training (on the CPU)."""
        return {name: (p.detach() - received[name]).cpu() for name, p in module.named_parameters()}

    def gather(self, name: str, full: torch.Tensor, client_id: str, round_num: int, seed: int) -> torch.Tensor:
        """The entries of ``full`` (on the model's coordinates of tensor ``name``)
        that ``client_id`` sends in ``round_num``, laid out as it sends them."""
        return full

    def scatter(self, name: str, full: torch.Tensor, sent: torch.Tensor, client_id: str, round_num: int,
                seed: int) -> torch.Tensor:
        """A copy of ``full`` whose entries that ``client_id`` sends in
        ``round_num`` are ``sent`` (laid out as sent); the others are kept."""
        return sent


def gather_codec_state(space: UpdateSpace, policy: CodecPolicy, state: Mapping[str, Any],
                       sent: Params, client_id: str, round_num: int, seed: int) -> dict[str, Any]:
    """A client's codec state (by tensor, residuals on the model's coordinates)
    as its codecs see it this round: each residual gathered onto the
    coordinates of ``sent``, the tensors it sends. None stays None (no residual yet)."""

    def this_round(name: str, r: torch.Tensor | None) -> torch.Tensor | None:
        return None if r is None else space.gather(name, r, client_id, round_num, seed)

    out = {}
    for name, s in state.items():
        if name not in sent:  # no such tensor sent: nothing encodes with this state
            continue
        codec = policy.for_tensor(name, sent[name].numel())
        out[name] = map_residuals(codec, s, lambda r, _, n=name: this_round(n, r))
    return out


def scatter_codec_state(space: UpdateSpace, policy: CodecPolicy, state: Mapping[str, Any],
                        new: Mapping[str, Any], sent: Params, template: Mapping[str, tuple[int, ...]],
                        client_id: str, round_num: int, seed: int) -> dict[str, Any]:
    """The client's codec state to keep: ``new`` (what the codecs returned for
    ``sent``) with each residual scattered into the one ``state`` held on the
    model's coordinates (zero where it held none); the coordinates not sent
    this round keep their residual."""

    def into_full(name: str, r: torch.Tensor | None, old: torch.Tensor | None) -> torch.Tensor | None:
        if r is None:
            return old
        if not isinstance(old, torch.Tensor) or tuple(old.shape) != tuple(template[name]):
            old = torch.zeros(template[name], dtype=r.dtype)
        return space.scatter(name, old, r, client_id, round_num, seed)

    out = {}
    for name, s in new.items():
        codec = policy.for_tensor(name, sent[name].numel())
        out[name] = map_residuals(codec, s, lambda r, old, n=name: into_full(n, r, old), state.get(name))
    return out


class ModelCoordinates(UpdateSpace):
    """``inner``'s clients, sending their update on the model's coordinates
    (see the module doc): what secure aggregation needs. The client trains as
    ``inner`` says, then expands its update with ``inner.expand`` (it
    regenerates its layout from the run's ``seed``, as the server does); the
    server reads the update as sent and weighs each coordinate by
    ``inner.coverage``. Error-feedback residuals then live on the coordinates
    sent, the model's, so nothing moves them (``moves_residuals`` False)."""

    moves_residuals = False
    sends_model_coordinates = True

    def __init__(self, inner: UpdateSpace, seed: int) -> None:
        self.inner = inner
        self.seed = int(seed)  # the client's layout comes from it (kept units, A, the mask)
        self.personal_model = inner.personal_model

    def client_model(self, params, client_id, round_num, seed):
        return self.inner.client_model(params, client_id, round_num, seed)

    def sent_shapes(self, template, client_id, round_num, seed):
        return dict(template)

    def coverage(self, template, client_id, round_num, seed):
        return self.inner.coverage(template, client_id, round_num, seed)

    def expand(self, sent, template, client_id, round_num, seed):
        return sent, self.coverage(template, client_id, round_num, seed)

    def prepare(self, model, received, ctx):
        return self.inner.prepare(model, received, ctx)

    def update(self, module, model, received, ctx):
        sent = self.inner.update(module, model, received, ctx)
        template = {k: tuple(p.shape) for k, p in model.named_parameters()}  # ``model``: the whole one
        full, _ = self.inner.expand(sent, template, ctx.client_id, ctx.round, self.seed)
        return {k: full[k] for k in template}


FullSpace = UpdateSpace

__all__ = ["FullSpace", "ModelCoordinates", "UpdateSpace", "gather_codec_state", "scatter_codec_state"]
