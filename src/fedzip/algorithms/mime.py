"""Mime-lite: clients mimic the server's momentum SGD with its statistics frozen.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh, "Breaking the
centralized barrier for cross-device federated learning" (NeurIPS 2021;
"Mime: Mimicking Centralized Stochastic Algorithms in Federated Learning" on
arXiv), Mime-lite with SGD with momentum as the base optimizer:

* the server broadcasts the model ``x`` and its momentum buffer ``m``
  (group ``"momentum"``, zeros at init);
* client ``i`` takes its local steps with ``m`` *fixed*:
  ``y ← y − η_l((1 − β)·g_i(y) + β·m)`` (the client optimizer is plain SGD
  with lr ``η_l``; the hooks rewrite each minibatch gradient before it steps),
  and sends the model delta ``y_i − x`` and the full-batch gradient of its
  loss *at the broadcast point*, ``∇f_i(x)`` (group ``"grad"``), computed over
  its examples before it trains;
* the server moves ``m ← (1 − β)·mean_i ∇f_i(x) + β·m`` (an unweighted mean
  over the round's clients) and the model with its optimizer on the mean
  delta, ``x ← x + η_g·mean Δy`` with server SGD at ``lr = η_g`` (give the
  server *no* momentum of its own: the momentum is ``m``, applied on clients).

The learning-rate scale: this is the *damped* heavy ball (the fresh gradient
weighted ``1 − β``). FedJAX's ``mime_lite`` with ``optimizers.sgd(lr,
momentum=β)`` (optax's undamped trace: ``y ← y − η'(g + β·m')``,
``m' ← g_srv + β·m'``) is the same algorithm with ``η' = η_l·(1 − β)`` and
``m' = m/(1 − β)``: a FedJAX client lr ``η'`` is ``client_lr = η'/(1 − β)``
here (checked step for step by ``tests/test_mime_reference.py``). ``m``
starts at zero with no bias correction, so in the first rounds a client
moves with weight ``1 − β`` on its fresh gradients (about ``η_l(1 − β)``
per step) until ``m`` has built up over about ``1/(1 − β)`` rounds; ``m``
moves once a round, not once a step, and its ``β·m`` is added at every one
of a client's local steps.

``beta = 0`` is FedAvg with client SGD, step for step. The gradient at ``x``
doubles the uplink: ``grad_codec`` (a codec, policy or spec; default
float32) encodes it.

The full-batch gradient: the client's examples in chunks of the preprocess
batch size, each chunk's mean loss weighted by its share of the examples
(exact for losses that are means over examples); with ``max_batches`` set,
over a random ``max_batches · batch_size`` of them (keyed by seed, round and
client), so its cost stays bounded like the training's. It runs in training
mode (dropout keyed by seed, round and client) and counts in the timings as
``time/client_full_gradient_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.algorithms.client import (
    ClientContext,
    ClientHooks,
    ClientResult,
    ClientTask,
    ClientWork,
)
from fedzip.algorithms.scaffold import codec_policy, plain_sgd_lr
from fedzip.algorithms.state import ServerState
from fedzip.codecs import CodecPolicy
from fedzip.data.federated import ClientExamples, FederatedData
from fedzip.errors import ConfigError
from fedzip.seeding import derive_seed, numpy_rng
from fedzip.tree import Params

MOMENTUM = "momentum"
GRAD = "grad"


def full_gradient(model: nn.Module, loss_fn: Any, examples: ClientExamples, batch_size: int,
                  on_device: Any = lambda t: t, indices: torch.Tensor | None = None) -> Params:
    """The gradient of the mean loss over ``examples`` (or the rows ``indices``)
    at the model's current weights, on the CPU; chunks of ``batch_size`` weighted
    by their share of the examples. Leaves no gradients on the model."""
    n = len(examples) if indices is None else len(indices)
    model.zero_grad(set_to_none=True)
    for start in range(0, n, batch_size):
        if indices is None:
            x, y = examples.x[start : start + batch_size], examples.y[start : start + batch_size]
        else:
            idx = indices[start : start + batch_size]
            x, y = examples.x[idx], examples.y[idx]
        x, y = on_device(x), on_device(y)
        (loss_fn(model(x), y) * (len(y) / n)).backward()
    grads = {name: (p.grad.detach().cpu().clone() if p.grad is not None
                    else torch.zeros(p.shape, dtype=torch.float32))
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


class _OneClient:
    """``data`` with one client's examples already read (so they are read once)."""

    def __init__(self, data: FederatedData, client_id: str, examples: ClientExamples) -> None:
        self.data, self.client_id, self.examples = data, client_id, examples

    @property
    def client_ids(self) -> Sequence[str]:
        return self.data.client_ids

    def client(self, client_id: str) -> ClientExamples:
        return self.examples if client_id == self.client_id else self.data.client(client_id)


class FullGradientWork(ClientWork):
    """:class:`ClientWork` that first computes ``∇f_i(x)`` at the broadcast model
    and hands it to the hooks as ``ctx.state`` (Mime-lite keeps no client state
    across rounds, so that channel is free)."""

    def __call__(self, data: FederatedData, task: ClientTask) -> ClientResult:
        t0 = time.perf_counter()
        examples = data.client(task.client_id)
        received, _, _ = self.receive(task.broadcast)
        model = self.model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(received[name])
        indices = None
        pre = self.preprocess
        if pre.max_batches is not None and pre.max_batches * pre.batch_size < len(examples):
            perm = numpy_rng(self.seed, task.round, task.client_id, "full_gradient").permutation(len(examples))
            indices = torch.from_numpy(perm[: pre.max_batches * pre.batch_size]).sort().values
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, task.round, task.client_id, "full_gradient"))
            grad = full_gradient(model, self.task.loss_fn, examples, pre.batch_size, self.on_device, indices)
        t_grad = time.perf_counter() - t0
        task = dataclasses.replace(task, client_state={**task.client_state, "algorithm": grad})
        res = super().__call__(_OneClient(data, task.client_id, examples), task)
        return dataclasses.replace(res, timings={**res.timings, "full_gradient": t_grad})


class FrozenMomentum(ClientHooks):
    """Mime-lite's client step: ``g ← (1 − β)·g + β·m`` with the broadcast ``m``;
    sends ``∇f_i(x)`` as group ``"grad"``."""

    def __init__(self, beta: float, grad_policy: CodecPolicy) -> None:
        self.beta = float(beta)
        self.group_policies = {GRAD: grad_policy}

    def start(self, ctx: ClientContext) -> None:
        m = ctx.groups.get(MOMENTUM)
        if m is None or set(m) != set(ctx.received):
            raise ValueError("Mime-lite: the broadcast holds no momentum for every model tensor")
        if self.beta:
            ctx.mime_momentum = {name: (self.beta * m[name]).to(device=p.device, dtype=p.dtype)
                                 for name, p in ctx.received.items()}

    def before_step(self, ctx: ClientContext) -> None:
        if not self.beta:
            return  # beta = 0: FedAvg with client SGD, bit for bit
        for name, p in ctx.model.named_parameters():
            bm = ctx.mime_momentum[name]
            if p.grad is None:
                p.grad = bm.clone()
            else:
                p.grad.mul_(1.0 - self.beta).add_(bm)

    def finish(self, ctx: ClientContext, delta: Params) -> None:
        ctx.out_groups[GRAD] = ctx.state  # ∇f_i(x), from FullGradientWork


class MimeLite(FederatedAlgorithm):
    """Mime-lite with momentum ``beta`` (see the module doc).

    Args:
        beta: the momentum β, in [0, 1).
        grad_codec: the uplink codec for ``∇f_i(x)`` (default float32).
        Other arguments: :class:`~fedzip.algorithms.base.FederatedAlgorithm`'s;
        the client optimizer must be plain SGD, the server optimizer should be
        SGD without momentum.
    """

    name = "mime"

    def __init__(self, *args: Any, beta: float = 0.9, grad_codec: Any = None, **kwargs: Any) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
                or not 0 <= beta < 1:
            raise ConfigError(f"Mime-lite beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.grad_policy = codec_policy(grad_codec, "grad_codec")
        super().__init__(*args, **kwargs)
        w = self.work
        self.work = FullGradientWork(w.task, w.client_optimizer, w.preprocess, w.aggregator,
                                     w.broadcast_policy, w.seed, w.device, w.hooks)

    def client_hooks(self) -> ClientHooks:
        plain_sgd_lr(self.client_optimizer, "Mime-lite")
        return FrozenMomentum(self.beta, self.grad_policy)

    def init_groups(self, params: Params) -> dict[str, Params]:
        return {MOMENTUM: {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}}

    def broadcast_groups(self, state: ServerState) -> dict[str, Params]:
        return {MOMENTUM: state.groups[MOMENTUM]}

    def update_groups(self, state: ServerState) -> dict[str, dict[str, tuple[int, ...]]]:
        return {GRAD: {k: tuple(v.shape) for k, v in state.params.items()}}

    def server_update(
        self, state: ServerState, mean_delta: Params, group_means: dict[str, Params], cohort: int,
    ) -> tuple[Params, dict[str, Any], dict[str, Params]]:
        params, opt_state = self.server_step(state, mean_delta)
        m = state.groups[MOMENTUM]
        g = group_means.get(GRAD)
        if g is not None:
            m = {k: (1.0 - self.beta) * g[k] + self.beta * m[k] for k in m}
        return params, opt_state, {**state.groups, MOMENTUM: m}


def mime_lite(model_fn: Any = None, client_optimizer: Any = None, server_optimizer: Any = None,
              aggregator: Any = None, beta: float = 0.9, **kwargs: Any) -> MimeLite:
    """Mime-lite with momentum ``beta``; other arguments as :func:`~fedzip.weighted_fedavg`."""
    return MimeLite(model_fn, client_optimizer, server_optimizer, aggregator, beta=beta, **kwargs)


__all__ = ["FrozenMomentum", "FullGradientWork", "MimeLite", "full_gradient", "mime_lite"]

