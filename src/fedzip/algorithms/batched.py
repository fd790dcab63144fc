"""Many clients trained at once: ``torch.func.vmap`` over their stacked weights.

On a GPU a small model's training step is a few dozen kernel launches
whatever its batch, so clients of a few dozen examples leave the device idle
between launches. Training K clients in one vectorized step launches each
kernel once for all of them, the way JAX simulators train a cohort with
``vmap`` (FedJAX: Ro, Suresh, Wu, "FedJAX: Federated learning simulation with
JAX", 2021). Each client still sees its own examples in its own order
(the same shuffle as one client at a time), takes its own SGD steps and
sends its own update through the aggregator's chain: the same algorithm,
the same bits on the wire, with float results that differ from one client
after another by rounding (batched kernels sum in another order; ReLU and
max pooling can enlarge the difference over many steps, as a change of
thread count does).

Where the model allows: FedAvg's client step (the whole model trained;
hooks that change only the objective, as a function of the weights:
FedProx's proximal term), ``torch.optim.SGD`` as the client optimizer (its step is
redone on the stacked weights, as ``torch.optim.SGD`` computes it: weight
decay, momentum with dampening, Nesterov, maximize), a model without buffers
(BatchNorm's running statistics change in place) and without randomness
(``vmap`` is asked to refuse random operations: dropout would not draw each
client's own masks). Clients whose batches differ in shape at a step (the
last, shorter batch) are stepped in groups of equal shapes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedzip.algorithms.client import ClientContext, ClientHooks, ClientResult, ClientTask
from fedzip.algorithms.space import UpdateSpace
from fedzip.errors import ClientFailure, ConfigError
from fedzip.seeding import numpy_rng
from fedzip.tree import Params

__all__ = ["check_batchable", "run_batch", "sgd_settings"]

#: torch.optim.SGD's settings that the batched step reproduces
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def sgd_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The settings of a client optimizer the batched step can redo: a
    ``torch.optim.SGD`` with one parameter group. Anything else is a
    :class:`~fedzip.errors.ConfigError` naming ``batch_clients``."""
    if type(optimizer) is not torch.optim.SGD:
        raise ConfigError(f"batch_clients: the client optimizer must be torch.optim.SGD (its step is redone "
                          f"on the clients' stacked weights), got {type(optimizer).__name__}")
    if len(optimizer.param_groups) != 1:
        raise ConfigError("batch_clients: the client optimizer must have one parameter group")
    group = optimizer.param_groups[0]
    out = {k: group.get(k, False if k in ("nesterov", "maximize") else 0.0) for k in _SGD_KEYS}
    out["lr"] = float(out["lr"])  # a tensor lr steps the same
    return out


def check_batchable(work: Any) -> dict[str, Any]:
    """Raise :class:`~fedzip.errors.ConfigError` unless ``work``'s clients can
    be trained together (see the module doc); returns the SGD settings."""
    hooks = type(work.hooks)
    changed = [m for m in ("start", "before_step", "finish") if getattr(hooks, m) is not getattr(ClientHooks, m)]
    if hooks.objective is not ClientHooks.objective and hooks.weights_objective is ClientHooks.weights_objective:
        changed.append("objective")  # an objective of ctx.model alone: nothing to differentiate together
    if changed:
        raise ConfigError(f"batch_clients: the algorithm changes the client step ({hooks.__name__}: "
                          f"{', '.join(changed)}); only FedAvg's client step, with an objective of the "
                          "weights (FedProx), trains clients together")
    if type(work.space) is not UpdateSpace:
        raise ConfigError(f"batch_clients: clients train part of the model ({type(work.space).__name__}); "
                          "only whole-model clients train together")
    model = work.model()
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(f"batch_clients: the model has buffers ({', '.join(buffers[:3])}), which training "
                          "changes in place (BatchNorm); only models without buffers train together")
    return sgd_settings(work.client_optimizer(list(model.parameters())))


@dataclass
class _Client:
    """One client of a batch: its work order, examples, batches and sums."""

    task: ClientTask
    examples: Any
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    t_data: float
    sums: dict[str, Any] = field(default_factory=dict)
    n_examples: int = 0


def run_batch(work: Any, data: Any, tasks: Sequence[ClientTask]) -> list[ClientResult | ClientFailure]:
    """``work`` (a :class:`~fedzip.algorithms.client.ClientWork`) for every
    task, the clients trained together; one result or failure per task, in
    task order. A client whose data cannot be read, or whose update cannot be
    encoded (not finite), fails alone; a failure of the batched training fails
    the clients it trained."""
    settings = check_batchable(work)
    if any(t.personal for t in tasks) or len({t.broadcast for t in tasks}) > 1 or \
            len({t.round for t in tasks}) > 1:
        raise ConfigError("batch_clients: the clients of a batch must share the round's broadcast")
    out: dict[int, ClientResult | ClientFailure] = {}
    t0 = time.perf_counter()
    received, groups, scalars = work.receive(tasks[0].broadcast) if tasks else ({}, {}, {})
    t_decode = time.perf_counter() - t0
    clients: dict[int, _Client] = {}
    for i, task in enumerate(tasks):
        t1 = time.perf_counter()
        try:
            examples = data.client(task.client_id)
            order_rng = numpy_rng(work.seed, task.round, task.client_id, "shuffle")
            batches = [(work.on_device(x), work.on_device(y)) for x, y in work.preprocess.batches(examples, order_rng)]
        except Exception as e:  # this client's data: its failure alone
            out[i] = ClientFailure(task.client_id, f"{type(e).__name__}: {e}")
            continue
        clients[i] = _Client(task, examples, batches, time.perf_counter() - t1)
    t1 = time.perf_counter()
    try:
        weights = _train(work, received, list(clients.values()), settings)
    except Exception as e:  # the batch's training: every client in it
        for i, c in clients.items():
            out[i] = ClientFailure(c.task.client_id, f"batched training: {type(e).__name__}: {e}")
        clients = {}
        weights = {}
    t_train = (time.perf_counter() - t1) / max(len(clients), 1)
    for k, (i, c) in enumerate(clients.items()):
        t2 = time.perf_counter()
        try:
            delta = {name: (w[k] - received[name]).cpu() for name, w in weights.items()}  # UpdateSpace.update's
            ctx = ClientContext(c.task.client_id, c.task.round, work.model(), received, groups, dict(scalars),
                                c.task.client_state.get("algorithm"), steps=len(c.batches))
            work.hooks.finish(ctx, delta)
            message, states = work.encode_update(c.task, scalars, c.examples, ctx, delta, c.sums, c.n_examples,
                                                 len(c.batches))
        except Exception as e:  # e.g. a non-finite update: this client's failure alone
            out[i] = ClientFailure(c.task.client_id, f"{type(e).__name__}: {e}")
            continue
        timings = {"decode": t_decode if k == 0 else 0.0, "data": c.t_data, "train": t_train,
                   "encode": time.perf_counter() - t2}
        out[i] = ClientResult(c.task.client_id, message, states, timings)
    return [out[i] for i in range(len(tasks))]


def _train(work: Any, received: Params, clients: list[_Client], settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every client's local training from ``received``; returns the weights,
    stacked (client k at index k of each tensor)."""
    model: nn.Module = work.model()
    model.train()
    names = [name for name, _ in model.named_parameters()]
    n = len(clients)
    weights = {name: received[name].detach().unsqueeze(0).repeat(n, *([1] * received[name].dim()))
               for name in names}
    momentum = settings["momentum"]
    buffers = {name: torch.zeros_like(w) for name, w in weights.items()} if momentum else {}
    loss_fn, metrics = work.task.loss_fn, work.task.metrics

    hooks = work.hooks

    def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits = torch.func.functional_call(model, params, (x,))
        loss = loss_fn(logits, y)  # the task's loss: what the metrics report
        return hooks.weights_objective(params, received, loss), (loss.detach(), logits.detach())

    # randomness="error": a random operation in the model (dropout) is refused,
    # not silently drawn the same for every client
    step = torch.func.vmap(torch.func.grad(loss_of, has_aux=True), randomness="error")
    group_sums = _GroupSums(metrics)
    totals: dict[str, torch.Tensor] = {}  # per metric, every client's sum (float64, client k at k)
    for t in range(max((len(c.batches) for c in clients), default=0)):
        groups: dict[tuple, list[int]] = {}
        for k, c in enumerate(clients):
            if t < len(c.batches):
                x, y = c.batches[t]
                groups.setdefault((tuple(x.shape), x.dtype, tuple(y.shape), y.dtype), []).append(k)
        for members in groups.values():
            whole = len(members) == n
            index = None if whole else torch.tensor(members, device=next(iter(weights.values())).device)
            params = weights if whole else {name: w.index_select(0, index) for name, w in weights.items()}
            bufs = buffers if whole or not buffers else {name: b.index_select(0, index) for name, b in buffers.items()}
            x = torch.stack([clients[k].batches[t][0] for k in members])
            y = torch.stack([clients[k].batches[t][1] for k in members])
            grads, (loss, logits) = step(params, x, y)
            for key, v in group_sums(logits, y, loss).items():  # one op per metric, not per client
                total = totals.get(key)
                if total is None:
                    total = totals[key] = torch.zeros(n, dtype=torch.float64, device=v.device)
                if whole:
                    total += v
                else:
                    total.index_add_(0, index, v)
            for k in members:
                clients[k].n_examples += len(clients[k].batches[t][1])
            with torch.no_grad():
                for name in names:
                    _sgd_step(params[name], grads[name], bufs.get(name), first=t == 0, **settings)
            if not whole:
                for name in names:
                    weights[name].index_copy_(0, index, params[name])
                    if buffers:
                        buffers[name].index_copy_(0, index, bufs[name])
    for k, c in enumerate(clients):  # 0-dim views; read once each when the update is encoded
        # a client without a batch sends no sums, as one trained alone (the same bytes)
        c.sums = {key: total[k] for key, total in totals.items()} if c.batches else {}
    return weights


class _GroupSums:
    """The task's batch sums for each client of a group, stacked (float64, one
    value per client): the metrics vectorized with ``vmap`` where they allow it
    (one op per metric for the whole group: on a GPU, launches per client are
    what batching saves), else client by client."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.vectorized: Any = torch.func.vmap(self._as_tensors)

    def _as_tensors(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(v, dtype=torch.float64, device=y.device)
                for key, v in self.metrics.batch_sums(logits, y, loss).items()}

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.vectorized is not None:
            try:
                return self.vectorized(logits, y, loss)
            except Exception:  # metrics vmap cannot batch (data-dependent shapes): client by client
                self.vectorized = None
        each = [self._as_tensors(logits[j], y[j], loss[j]) for j in range(len(y))]
        return {key: torch.stack([e[key] for e in each]) for key in each[0]}


def _sgd_step(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, first: bool, lr: float,
              momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool) -> None:
    """``torch.optim.SGD``'s step (its single-tensor form), on stacked weights;
    ``first``: the clients' first step (the momentum buffer starts as the gradient)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    if momentum != 0:
        assert buf is not None
        if first:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    p.add_(grad, alpha=-lr)
