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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedzip.tree import Params


class UpdateSpace:
    """The whole model, as FedAvg trains it (see the module doc)."""

    #: True when each client receives its own model tensors (personal message)
    personal_model: bool = False

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

    # -- client side ---------------------------------------------------------

    def prepare(self, model: nn.Module, received: Params, ctx: Any) -> tuple[nn.Module, list[torch.Tensor]]:
        """The module to train and the tensors the optimizer updates. ``model``
        holds the received weights (for a personal model: ``received`` holds them)."""
        return model, list(model.parameters())

    def update(self, module: nn.Module, model: nn.Module, received: Params, ctx: Any) -> Params:
        """The tensors to send after training (on the CPU)."""
        return {name: (p.detach() - received[name]).cpu() for name, p in module.named_parameters()}


FullSpace = UpdateSpace

__all__ = ["FullSpace", "UpdateSpace"]
