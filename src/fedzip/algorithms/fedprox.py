"""FedProx: FedAvg whose clients minimize the loss plus a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks" (MLSys 2020): client ``k`` approximately minimizes
``F_k(w) + (μ/2)·||w − w_t||²`` from the broadcast ``w_t``, which keeps local
models near the global one when clients' data differ. μ = 0 is FedAvg,
bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.client import ClientContext, ClientHooks
from fedzip.errors import ConfigError


class ProximalTerm(ClientHooks):
    """Adds ``(mu/2)·||w − w_received||²`` to every batch's loss."""

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    def objective(self, ctx: ClientContext, loss: torch.Tensor) -> torch.Tensor:
        return self.weights_objective(dict(ctx.model.named_parameters()), ctx.received, loss)

    def weights_objective(self, weights, received, loss):
        if self.mu == 0.0:
            return loss  # no extra op: FedProx(0) is FedAvg bit for bit
        prox = sum(((w - received[name]) ** 2).sum() for name, w in weights.items())
        return loss + 0.5 * self.mu * prox


class FedProx(FederatedAlgorithm):
    """FedAvg with the proximal term ``mu`` on the clients (see the module doc)."""

    name = "fedprox"

    def __init__(self, *args: Any, mu: float = 0.01, **kwargs: Any) -> None:
        if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
            raise ConfigError(f"FedProx mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)
        super().__init__(*args, **kwargs)

    def client_hooks(self) -> ClientHooks:
        return ProximalTerm(self.mu)


def fedprox(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
            aggregator: Any = None, mu: float = 0.01, **kwargs: Any) -> FedProx:
    """FedProx with proximal weight ``mu``; other arguments as :func:`~fedzip.weighted_fedavg`."""
    return FedProx(model_fn, client_optimizer, server_optimizer, aggregator, mu=mu, **kwargs)
