"""FedSGD: each client sends one full-batch gradient at the broadcast model.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data" (AISTATS 2017), the
FedSGD baseline: every sampled client computes ``g_i = ∇f_i(x)``, the
gradient of its mean loss over its examples at the broadcast ``x``, and takes
no local step; the server averages the gradients weighted by the task's
weighting (examples by default, as in the paper) and steps. The client sends
``−g_i`` as its "delta", so the server optimizer, which steps on minus the
mean delta, steps on the mean gradient: server SGD with ``lr = η`` is
gradient descent ``x ← x − η·Σ n_i g_i / Σ n_i``, one full-batch step on the
pooled data when every client takes part. The server optimizer may be
anything (momentum, FedAdam's): it sees the mean gradient.

How: the client's batches are one batch of all its examples
(:class:`FullBatch`; with ``max_batches`` set, a random ``max_batches ·
batch_size`` of them, keyed by seed, round and client, so a huge client costs
a bounded amount; otherwise ``batch_size`` plays no part), the client takes
one throwaway SGD step, and the ``finish`` hook replaces the delta with
exactly ``−g_i`` from the gradient left on the model. The ``client_optimizer``
argument is ignored (there are no local steps; the step size is the server's).
The whole client is one forward and backward pass: memory grows with its
example count (``max_batches`` bounds it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.client import ClientContext, ClientHooks
from fedzip.data.federated import ClientExamples, Preprocess
from fedzip.tree import Params


@dataclass(frozen=True)
class FullBatch(Preprocess):
    """One batch of every example (epochs and shuffle play no part); with
    ``max_batches`` a random ``max_batches · batch_size`` examples."""

    def batches(
        self, examples: ClientExamples, generator: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(examples)
        if n == 0:
            return
        if self.max_batches is not None and self.max_batches * self.batch_size < n:
            idx = torch.from_numpy(generator.permutation(n)[: self.max_batches * self.batch_size]).sort().values
            yield examples.x[idx], examples.y[idx]
        else:
            yield examples.x, examples.y


class GradientAsDelta(ClientHooks):
    """Sends ``−∇f_i(x)`` as the delta (the gradient the one step left on the model)."""

    def start(self, ctx: ClientContext) -> None:
        ctx.model.zero_grad(set_to_none=True)  # the model is reused: no gradient of another client

    def finish(self, ctx: ClientContext, delta: Params) -> None:
        for name, p in ctx.model.named_parameters():
            # the step was SGD with lr 1 (delta ≈ −g already); this makes it exact
            delta[name] = -p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(delta[name])


class FedSGD(FederatedAlgorithm):
    """FedSGD (see the module doc). Arguments: :class:`~fedzip.algorithms.base.FederatedAlgorithm`'s;
    ``client_optimizer`` may be omitted and is ignored, ``preprocess`` only
    counts for ``max_batches`` (and ``batch_size`` with it)."""

    name = "fedsgd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(FederatedAlgorithm.__init__).bind(None, *args, **kwargs)
        a = bound.arguments
        pre = a.get("preprocess") or Preprocess()
        a["preprocess"] = FullBatch(pre.batch_size, 1, pre.shuffle_buffer, pre.max_batches)
        a["client_optimizer"] = functools.partial(torch.optim.SGD, lr=1.0)
        super().__init__(*bound.args[1:], **bound.kwargs)

    def client_hooks(self) -> ClientHooks:
        return GradientAsDelta()


def fedsgd(model_fn: Any = None, server_optimizer: Any = None, aggregator: Any = None, **kwargs: Any) -> FedSGD:
    """FedSGD with ``server_optimizer`` (``partial(torch.optim.SGD, lr=η)`` for
    gradient descent); other arguments as :func:`~fedzip.weighted_fedavg`."""
    return FedSGD(model_fn, None, server_optimizer, aggregator, **kwargs)


__all__ = ["FedSGD", "FullBatch", "GradientAsDelta", "fedsgd"]
