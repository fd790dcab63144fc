"""The client step every algorithm shares: receive, train, encode.

:class:`ClientWork` is what one client does in a round. It is picklable (the
executors ship it to other processes) and builds the task's model once per
process. An algorithm changes the step through :class:`ClientHooks`, not by
copying it:

* ``objective``: the loss the client minimizes (FedProx adds a proximal term),
  and ``weights_objective``, the same as a function of the weights (clients
  trained together differentiate it);
* ``before_step``: the gradients before the optimizer steps (SCAFFOLD's
  control-variate correction);
* ``finish``: tensor groups the client sends besides the model delta (SCAFFOLD's
  control-variate delta) and the client's new state (its control variate).

Messages: the broadcast holds the model (no prefix) and the algorithm's
groups (``"<group>/<tensor>"``); an optional per-client ``personal`` message
holds what differs per client. The update holds the model delta, encoded by
the aggregator's chain, and the hooks' groups, each encoded by its own codec
policy. Every group is counted in the bits, itemized by group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedzip.aggregators import Aggregator
from fedzip.algorithms.space import UpdateSpace, gather_codec_state, scatter_codec_state
from fedzip.codecs import CodecPolicy
from fedzip.data.federated import FederatedData, Preprocess
from fedzip.payload import decode_params, encode_params
from fedzip.seeding import derive_seed, numpy_rng, torch_rng
from fedzip.tasks.base import Task
from fedzip.tree import Params
from fedzip.wire import Kind, decode_message, encode_message

OptimizerFn = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]

#: separates a group's name from a tensor's in message records ("control/fc1.weight")
GROUP_SEP = "/"


def split_groups(params: Mapping[str, torch.Tensor]) -> tuple[Params, dict[str, Params]]:
    """Records named ``group/tensor`` by group; names without a group are the model's."""
    model: Params = {}
    groups: dict[str, Params] = {}
    for name, value in params.items():
        group, sep, rest = name.partition(GROUP_SEP)
        if sep:
            groups.setdefault(group, {})[rest] = value
        else:
            model[name] = value
    return model, groups


def join_groups(groups: Mapping[str, Params]) -> Params:
    return {f"{g}{GROUP_SEP}{k}": v for g, p in groups.items() for k, v in p.items()}


@dataclass(frozen=True)
class ClientTask:
    """One client's work order for a round.

    ``broadcast`` is the message every client of the round receives (the Ray
    executor ships it once per round); ``personal`` is a message for this
    client alone (empty when nothing differs per client); ``client_state``
    maps an owner ("codec", "algorithm") to this client's state; ``secagg``
    is what secure aggregation told this client (its neighbours' keys), empty
    without it."""

    client_id: str
    round: int
    broadcast: bytes
    client_state: Mapping[str, Any] = field(default_factory=dict)
    personal: bytes = b""
    secagg: bytes = b""


@dataclass(frozen=True)
class ClientResult:
    """A client's update message, its new states (by owner) and its timings
    (seconds: decode (the broadcast, once per round per process, and the
    personal message), data, train, encode; instrumentation, not sent on the wire)."""

    client_id: str
    message: bytes
    client_state: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientContext:
    """What hooks see during one client's step."""

    client_id: str
    round: int
    model: nn.Module
    received: Params  # the broadcast model, on the training device
    groups: dict[str, Params]  # the broadcast's and the personal message's groups
    scalars: dict[str, float]  # the broadcast's scalars
    state: Any  # this client's algorithm state (None the first time)
    steps: int = 0
    out_groups: dict[str, Params] = field(default_factory=dict)
    out_state: Any = None


class ClientHooks:
    """How an algorithm changes the client step. The defaults are FedAvg's.

    ``group_policies`` maps each group a client sends to the codec policy that
    encodes it (float32 when absent)."""

    group_policies: Mapping[str, CodecPolicy] = {}

    def start(self, ctx: ClientContext) -> None:
        """Before training (the model holds the received weights)."""

    def objective(self, ctx: ClientContext, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimize for one batch, given the task's loss."""
        return loss

    def weights_objective(self, weights: Mapping[str, torch.Tensor], received: Params,
                          loss: torch.Tensor) -> torch.Tensor:
        """:meth:`objective` as a function of the weights being trained (one
        client's, by parameter name) instead of ``ctx.model``: what clients
        trained together (:mod:`fedzip.algorithms.batched`) differentiate.
        Hooks that override ``objective`` override this too, or their clients
        train one at a time."""
        return loss

    def before_step(self, ctx: ClientContext) -> None:
        """After ``backward``, before the optimizer steps (gradients may be changed)."""

    def finish(self, ctx: ClientContext, delta: Params) -> None:
        """After training: set ``ctx.out_groups`` (sent) and ``ctx.out_state`` (kept)."""


class ClientWork:
    """What one client does in a round: decode the broadcast, train, encode the
    delta. Picklable, so executors can ship it to other processes; the model
    is built once per process and reused."""

    def __init__(
        self,
        task: Task,
        client_optimizer: OptimizerFn,
        preprocess: Preprocess,
        aggregator: Aggregator,
        broadcast_policy: CodecPolicy,
        seed: int,
        device: torch.device | None = None,
        hooks: ClientHooks | None = None,
        space: UpdateSpace | None = None,
    ) -> None:
        self.task = task
        self.device = device
        self.client_optimizer = client_optimizer
        self.preprocess = preprocess
        self.aggregator = aggregator
        self.broadcast_policy = broadcast_policy
        self.seed = seed
        self.hooks = hooks or ClientHooks()
        self.space = space or UpdateSpace()
        self._model: nn.Module | None = None
        self._received: tuple[bytes, Params, dict[str, Params], dict[str, float]] | None = None
        self._template: dict[str, tuple[int, ...]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_model"] = None
        d["_received"] = None
        return d

    def model(self) -> nn.Module:
        if self._model is None:
            model = self.task.model_fn()
            self._model = model.to(self.device) if self.device is not None else model
        return self._model

    def template(self) -> dict[str, tuple[int, ...]]:
        if self._template is None:
            self._template = {k: tuple(v.shape) for k, v in self.model().named_parameters()}
        return self._template

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device (unchanged without one)."""
        return t.to(self.device, non_blocking=True) if self.device is not None else t

    def receive(self, broadcast: bytes) -> tuple[Params, dict[str, Params], dict[str, float]]:
        """Decode the broadcast (once per round per process): model, groups, scalars."""
        if self._received is not None and self._received[0] is broadcast:
            return self._received[1], self._received[2], self._received[3]
        msg = decode_message(broadcast, expect=Kind.BROADCAST)
        params, groups = _decode_with_groups(msg, self.template(), self.broadcast_policy)
        params = {k: self.on_device(v) for k, v in params.items()}
        self._received = (broadcast, params, groups, msg.scalars)
        return params, groups, msg.scalars

    def run_batch(self, data: FederatedData, tasks: list[ClientTask]) -> list[Any]:
        """The clients of ``tasks`` trained together, one result or
        :class:`~fedzip.errors.ClientFailure` per task
        (:func:`fedzip.algorithms.batched.run_batch`)."""
        from fedzip.algorithms.batched import run_batch  # torch.func loads only when asked for

        return run_batch(self, data, tasks)

    def __call__(self, data: FederatedData, task: ClientTask) -> ClientResult:
        t0 = time.perf_counter()
        received, groups, scalars = self.receive(task.broadcast)
        if task.personal:
            pmsg = decode_message(task.personal, expect=Kind.BROADCAST)
            groups = {**groups, **_decode_groups_only(pmsg, self.broadcast_policy)}
        t_decode = time.perf_counter() - t0
        examples = data.client(task.client_id)
        base = self.model()
        if received:
            with torch.no_grad():
                for name, p in base.named_parameters():
                    p.copy_(received[name])
        elif "model" in groups:  # a personal model (federated dropout): the space builds it
            received = {k: self.on_device(v) for k, v in groups.pop("model").items()}
        ctx = ClientContext(task.client_id, task.round, base, received, groups, dict(scalars),
                            task.client_state.get("algorithm"))
        model, trainable = self.space.prepare(base, received, ctx)
        ctx.model = model
        hooks = self.hooks
        hooks.start(ctx)
        opt = self.client_optimizer(trainable)
        order_rng = numpy_rng(self.seed, task.round, task.client_id, "shuffle")
        sums: dict[str, torch.Tensor] = {}
        n_examples = n_batches = 0
        t_data = time.perf_counter() - t0
        model.train()
        with torch.random.fork_rng(devices=[]):
            # dropout and other in-model randomness: keyed by (seed, round, client).
            # The CPU generator only: torch.manual_seed also queues lazy CUDA/XPU/MTIA
            # seeding, which formats a stack trace each call (about 1 ms per client).
            torch.default_generator.manual_seed(derive_seed(self.seed, task.round, task.client_id, "train"))
            for x, y in self.preprocess.batches(examples, order_rng):
                x, y = self.on_device(x), self.on_device(y)
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = self.task.loss_fn(logits, y)
                # the metrics before backward: the same values (backward changes neither
                # logits nor loss), read while they are in cache (measured: about 0.4 ms a
                # client less than after the optimizer step, on the seed CNN)
                for k, v in self.task.metrics.batch_sums(logits, y, loss).items():
                    sums[k] = sums[k] + v if k in sums else v
                hooks.objective(ctx, loss).backward()
                hooks.before_step(ctx)
                opt.step()
                ctx.steps += 1
                n_examples += len(y)
                n_batches += 1
        # back on the CPU (a no-op there): the stages, codecs and per-client state live on it
        delta = self.space.update(model, base, received, ctx)
        hooks.finish(ctx, delta)
        t_train = time.perf_counter() - t0 - t_data
        message, states = self.encode_update(task, scalars, examples, ctx, delta, sums, n_examples, n_batches)
        t_total = time.perf_counter() - t0
        timings = {"decode": t_decode, "data": t_data - t_decode, "train": t_train,
                   "encode": t_total - t_data - t_train}
        return ClientResult(task.client_id, message, states, timings)

    def encode_update(self, task: ClientTask, scalars: Mapping[str, float], examples: Any, ctx: ClientContext,
                      delta: Params, sums: Mapping[str, Any], n_examples: int, n_batches: int
                      ) -> tuple[bytes, dict[str, Any]]:
        """A trained client's update message and its new states (by owner): the
        delta through the aggregator's chain (and secure aggregation's mask),
        the hooks' groups, the weight and the training sums."""
        rng = torch_rng(self.seed, task.round, task.client_id, "codec")
        codec_state = task.client_state.get("codec")
        space, policy = self.space, self.aggregator.policy
        if space.moves_residuals:  # the residuals are kept on the model's coordinates: gather this round's
            full_state = codec_state or {}
            codec_state = gather_codec_state(space, policy, full_state, delta, task.client_id, task.round,
                                             self.seed)
        records, reports, codec_state = self.aggregator.client_encode(scalars, delta, rng, codec_state)
        if space.moves_residuals:  # and scatter the new ones back; coordinates not sent keep theirs
            codec_state = scatter_codec_state(space, policy, full_state, codec_state, delta, self.template(),
                                              task.client_id, task.round, self.seed)
        if task.secagg:  # secure aggregation: the codes leave the client masked
            from fedzip.privacy.secagg import mask_update  # cryptography loads only when asked for

            records = mask_update(task.secagg, records, self.aggregator.policy, self.seed, task.round,
                                  task.client_id)
        for group, values in ctx.out_groups.items():
            policy = self.hooks.group_policies.get(group, CodecPolicy())
            named = {f"{group}{GROUP_SEP}{k}": v.detach().cpu() for k, v in values.items()}
            records += encode_params(named, _GroupPolicy(policy), torch_rng(
                self.seed, task.round, task.client_id, "codec", group))
        plain = {k: float(v) for k, v in sums.items()}
        out_scalars = {
            "weight": self.task.client_weight(examples, n_examples, plain),
            **{f"train/{k}": v for k, v in plain.items()},
            "train/num_examples": float(n_examples),
            "train/num_batches": float(n_batches),
            **reports,
        }
        message = encode_message(Kind.UPDATE, out_scalars, records)
        states: dict[str, Any] = {}
        if codec_state:
            states["codec"] = codec_state
        if ctx.out_state is not None:
            states["algorithm"] = ctx.out_state
        return message, states


@dataclass(frozen=True)
class _GroupPolicy:
    """A policy for ``group/tensor`` names: the group's policy sees the tensor's own name."""

    inner: CodecPolicy

    def for_tensor(self, name: str, numel: int):
        return self.inner.for_tensor(name.partition(GROUP_SEP)[2] or name, numel)


def group_policy(policy: CodecPolicy) -> _GroupPolicy:
    return _GroupPolicy(policy)


def _decode_with_groups(msg, template, policy: CodecPolicy) -> tuple[Params, dict[str, Params]]:
    """The model's tensors checked against ``template``; groups decoded as sent
    (float32 or the broadcast policy; their shapes are the algorithm's business)."""
    from fedzip.wire import Message

    model_records = [t for t in msg.tensors if GROUP_SEP not in t.name]
    group_msg = Message(msg.kind, {}, [t for t in msg.tensors if GROUP_SEP in t.name], 0)
    # no model tensors: each client gets its own model in its personal message
    params = decode_params(Message(msg.kind, msg.scalars, model_records, msg.nbytes), template, policy) \
        if model_records else {}
    return params, _decode_groups_only(group_msg, policy)


def _decode_groups_only(msg, policy: CodecPolicy) -> dict[str, Params]:
    records = [t for t in msg.tensors if GROUP_SEP in t.name]
    template = {t.name: t.shape for t in records}
    from fedzip.wire import Message

    flat = decode_params(Message(msg.kind, {}, records, 0), template, _GroupPolicy(policy))
    return split_groups(flat)[1]


__all__ = ["ClientContext", "ClientHooks", "ClientResult", "ClientTask", "ClientWork", "group_policy",
           "join_groups", "split_groups"]
