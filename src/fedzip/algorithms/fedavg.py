"""Weighted federated averaging with a server optimizer.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017), in the generalized form of Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021): clients train from the
broadcast model with their own optimizer, the server averages their deltas
(weighted by example count, through the aggregator) and hands minus the mean
delta to a torch.optim optimizer as a pseudo-gradient. Server SGD with lr 1.0
is plain FedAvg; momentum or Adam work unchanged (FedAvgM, FedAdam).

The algorithm is ``init() -> ServerState`` and ``next(state, data, client_ids)
-> (ServerState, metrics)``; it holds no state of its own, and ``next`` never
changes the state it is given, so a failed round leaves it as it was.

``device="cuda"`` trains the clients and evaluates on that device; the
server state, the aggregator, the codecs and the wire stay on the CPU (a
client's delta comes back to the CPU before its stages and codec run).
Randomness drawn on the device inside the model (dropout on CUDA) is not
keyed by client: only CPU generators are, so bit-identical runs need the CPU.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedzip import tree
from fedzip.aggregators import Aggregator, mean
from fedzip.codecs import Codec, CodecPolicy, as_policy
from fedzip.data.federated import ClientExamples, FederatedData, Preprocess
from fedzip.errors import ClientFailure, ConfigError, DataError, PayloadError, RoundFailedError
from fedzip.execution import Executor, LocalExecutor
from fedzip.payload import decode_params, encode_params
from fedzip.seeding import derive_seed, numpy_rng, torch_rng
from fedzip.tree import Params
from fedzip.wire import Kind, bit_account, decode_message, encode_message

OptimizerFn = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from round to round, as one plain value."""

    params: Params
    optimizer_state: dict[str, Any]
    aggregator_state: dict[str, Any]
    round: int = 0  # rounds completed


@dataclass(frozen=True)
class ClientTask:
    client_id: str
    round: int
    broadcast: bytes
    client_state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    client_id: str
    message: bytes
    client_state: dict[str, Any]


def _check_optimizer_fn(fn: Any, name: str) -> None:
    if not callable(fn):
        raise ConfigError(f"{name} must be a callable taking parameters, e.g. partial(torch.optim.SGD, lr=0.02)")
    probe = fn([torch.zeros(1, requires_grad=True)])
    if not isinstance(probe, torch.optim.Optimizer):
        raise ConfigError(f"{name} must return a torch.optim.Optimizer, got {type(probe).__name__}")


class ClientWork:
    """What one client does in a round: decode the broadcast, train, encode the
    delta. Picklable, so executors can ship it to other processes; the model
    is built once per process and reused."""

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        client_optimizer: OptimizerFn,
        loss_fn: LossFn,
        preprocess: Preprocess,
        aggregator: Aggregator,
        broadcast_policy: CodecPolicy,
        seed: int,
        device: torch.device | None = None,
    ) -> None:
        self.model_fn = model_fn
        self.device = device
        self.client_optimizer = client_optimizer
        self.loss_fn = loss_fn
        self.preprocess = preprocess
        self.aggregator = aggregator
        self.broadcast_policy = broadcast_policy
        self.seed = seed
        self._model: nn.Module | None = None
        self._received: tuple[bytes, Params, dict[str, float]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_model"] = None
        d["_received"] = None
        return d

    def model(self) -> nn.Module:
        if self._model is None:
            model = self.model_fn()
            self._model = model.to(self.device) if self.device is not None else model
        return self._model

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device (unchanged without one)."""
        return t.to(self.device, non_blocking=True) if self.device is not None else t

    def receive(self, broadcast: bytes) -> tuple[Params, dict[str, float]]:
        """Decode the broadcast (once per round per process)."""
        if self._received is not None and self._received[0] is broadcast:
            return self._received[1], self._received[2]
        msg = decode_message(broadcast, expect=Kind.BROADCAST)
        template = {k: tuple(v.shape) for k, v in self.model().named_parameters()}
        params = decode_params(msg, template, self.broadcast_policy)
        self._received = (broadcast, params, msg.scalars)
        return params, msg.scalars

    def __call__(self, data: FederatedData, task: ClientTask) -> ClientResult:
        received, scalars = self.receive(task.broadcast)
        examples = data.client(task.client_id)
        model = self.model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(received[name])
        opt = self.client_optimizer(model.parameters())
        order_rng = numpy_rng(self.seed, task.round, task.client_id, "shuffle")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = 0
        n_examples = n_batches = 0
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
                loss = self.loss_fn(logits, y)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().double() * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                n_examples += len(y)
                n_batches += 1
        # back on the CPU (a no-op there): the stages, codecs and per-client state live on it
        delta = {name: (p.detach() - received[name].to(p.device)).cpu() for name, p in model.named_parameters()}
        rng = torch_rng(self.seed, task.round, task.client_id, "codec")
        records, reports, client_state = self.aggregator.client_encode(
            scalars, delta, rng, task.client_state
        )
        out_scalars = {
            "weight": float(n_examples),
            "train/loss_sum": float(loss_sum),
            "train/correct": float(correct),
            "train/num_examples": float(n_examples),
            "train/num_batches": float(n_batches),
            **reports,
        }
        return ClientResult(task.client_id, encode_message(Kind.UPDATE, out_scalars, records), client_state)


class WeightedFedAvg:
    """Weighted FedAvg. Build it with :func:`weighted_fedavg`.

    Keyword options: ``broadcast_codec`` (downlink), ``preprocess``,
    ``loss_fn``, ``seed``, ``executor``, ``min_clients`` (clients that must
    succeed for a round to count; default all), ``max_client_states``
    (per-client codec state kept, least recently used dropped first),
    ``device`` (where clients train and evaluation runs; see the module doc).
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        client_optimizer: OptimizerFn,
        server_optimizer: OptimizerFn,
        aggregator: Aggregator | None = None,
        broadcast_codec: Codec | CodecPolicy | None = None,
        preprocess: Preprocess | None = None,
        loss_fn: LossFn = F.cross_entropy,
        seed: int = 0,
        executor: Executor | None = None,
        min_clients: int | None = None,
        max_client_states: int = 10_000,
        device: str | torch.device | None = None,
    ) -> None:
        if not callable(model_fn):
            raise ConfigError("model_fn must be a callable returning a torch.nn.Module")
        _check_optimizer_fn(client_optimizer, "client_optimizer")
        _check_optimizer_fn(server_optimizer, "server_optimizer")
        aggregator = mean() if aggregator is None else aggregator
        if not isinstance(aggregator, Aggregator):
            raise ConfigError(f"aggregator must be a fedzip Aggregator, got {type(aggregator).__name__}")
        if min_clients is not None and (not isinstance(min_clients, int) or min_clients < 1):
            raise ConfigError(f"min_clients must be a positive integer or None, got {min_clients!r}")
        if not isinstance(max_client_states, int) or max_client_states < 0:
            raise ConfigError(f"max_client_states must be a non-negative integer, got {max_client_states!r}")
        self.model_fn = model_fn
        self.server_optimizer = server_optimizer
        self.aggregator = aggregator
        self.broadcast_policy = as_policy(broadcast_codec)
        self.seed = int(seed)
        self.executor = executor or LocalExecutor()
        self.min_clients = min_clients
        # per-client codec state (error feedback) kept for at most this many
        # clients, least recently used dropped first (they start afresh)
        self.max_client_states = max_client_states
        self.loss_fn = loss_fn
        self.work = ClientWork(
            model_fn, client_optimizer, loss_fn, preprocess or Preprocess(),
            aggregator, self.broadcast_policy, self.seed, resolve_device(device),
        )

    # -- state -------------------------------------------------------------

    def init(self) -> ServerState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "init"))
            model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = self.server_optimizer([v.clone().requires_grad_(True) for v in params.values()])
        return ServerState(params, opt.state_dict(), self.aggregator.init(), 0)

    # -- one round ----------------------------------------------------------

    def next(
        self, state: ServerState, data: FederatedData, client_ids: Sequence[str]
    ) -> tuple[ServerState, dict[str, Any]]:
        """Run one round on ``client_ids`` of ``data``; returns the new state and metrics.

        Raises :class:`RoundFailedError` (and ``state`` stays valid and unchanged)
        when fewer than ``min_clients`` clients succeed (default: all must).
        """
        if not client_ids:
            raise ConfigError("a round needs at least one client id")
        round_num = state.round + 1
        agg = self.aggregator
        scalars = agg.broadcast_scalars(state.aggregator_state)
        records = encode_params(state.params, self.broadcast_policy, torch_rng(self.seed, round_num, "broadcast"))
        broadcast = encode_message(Kind.BROADCAST, scalars, records)
        b_acc = bit_account(decode_message(broadcast))

        client_states = state.aggregator_state.get("client_states", {})
        tasks = [ClientTask(cid, round_num, broadcast, client_states.get(cid, {})) for cid in client_ids]
        acc = agg.accumulator(state.params)
        up = {"total": 0, "framing": 0, "scalars": 0, "tensors": 0}
        new_client_states: dict[str, Any] = {}
        failures: list[ClientFailure] = []
        for res in self.executor.map(self.work, data, tasks):
            if isinstance(res, ClientFailure):
                failures.append(res)
                continue
            try:
                msg = decode_message(res.message, expect=Kind.UPDATE)
                acc.fold(msg)
            except PayloadError as e:
                failures.append(ClientFailure(res.client_id, f"PayloadError: {e}"))
                continue
            ba = bit_account(msg)
            for k in up:
                up[k] += getattr(ba, k)
            if res.client_state:
                new_client_states[res.client_id] = res.client_state

        needed = len(client_ids) if self.min_clients is None else min(self.min_clients, len(client_ids))
        if acc.count < needed:
            why = "; ".join(f"{f.client_id}: {f.reason}" for f in failures[:5])
            raise RoundFailedError(
                f"round {round_num}: {acc.count} of {len(client_ids)} clients succeeded, "
                f"{needed} needed; the server state is unchanged. Failures: {why}"
            )
        mean_update, agg_state, measurements = agg.finalize(state.aggregator_state, acc)
        if new_client_states:
            agg_state["client_states"] = _lru_update(client_states, new_client_states, self.max_client_states)
        params, opt_state = self._server_step(state, mean_update)
        if not tree.all_finite(params):
            raise RoundFailedError(
                f"round {round_num}: the server step produced NaN or Inf; the state is unchanged"
            )
        n = len(client_ids) - len(failures)
        train = {k: acc.report_sums.get(f"train/{k}", 0.0)
                 for k in ("loss_sum", "correct", "num_examples", "num_batches")}
        metrics: dict[str, Any] = {
            "round": round_num,
            "train/loss": train["loss_sum"] / max(train["num_examples"], 1.0),
            "train/accuracy": train["correct"] / max(train["num_examples"], 1.0),
            "train/num_examples": int(train["num_examples"]),
            "train/num_batches": int(train["num_batches"]),
            "train/diverged_clients": int(acc.report_sums.get("train/diverged_clients", 0)),
            "clients/succeeded": n,
            "clients/failed": len(failures),
            # every client receives the broadcast: its bits times the cohort
            "broadcasted_bits": b_acc.total * len(client_ids),
            "broadcasted_bits/tensors": b_acc.tensors * len(client_ids),
            "broadcasted_bits/scalars": b_acc.scalars * len(client_ids),
            "broadcasted_bits/framing": b_acc.framing * len(client_ids),
            "aggregated_bits": up["total"],
            "aggregated_bits/tensors": up["tensors"],
            "aggregated_bits/scalars": up["scalars"],
            "aggregated_bits/framing": up["framing"],
            **{f"aggregator/{k}": v for k, v in measurements.items()},
            # per-client state (error-feedback residuals, warm starts): bounded by
            # max_client_states, and its memory reported so growth is visible
            "aggregator/client_states": len(agg_state.get("client_states", ())),
            "aggregator/client_state_bytes": tree.nbytes(agg_state.get("client_states", {})),
        }
        if failures:
            metrics["failures"] = [{"client_id": f.client_id, "reason": f.reason} for f in failures]
        return ServerState(params, opt_state, agg_state, round_num), metrics

    def _server_step(self, state: ServerState, mean_update: Params) -> tuple[Params, dict[str, Any]]:
        # Fresh tensors and a copy of the optimizer state: ``state`` is never mutated.
        params = {k: v.detach().clone().requires_grad_(True) for k, v in state.params.items()}
        opt = self.server_optimizer(list(params.values()))
        opt.load_state_dict(copy.deepcopy(state.optimizer_state))
        for k, p in params.items():
            p.grad = -mean_update[k].to(p.dtype)
        opt.step()
        return {k: p.detach() for k, p in params.items()}, opt.state_dict()

    # -- evaluation ----------------------------------------------------------

    def evaluate(
        self,
        params: Params,
        data: FederatedData | ClientExamples,
        client_ids: Sequence[str] | None = None,
        batch_size: int = 500,
    ) -> dict[str, float]:
        """Loss and accuracy of ``params`` over the clients of ``data`` (all by default)."""
        model = self.work.model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        sources = [data] if isinstance(data, ClientExamples) else (
            data.client(cid) for cid in (client_ids if client_ids is not None else data.client_ids)
        )
        with torch.no_grad():
            for ex in sources:
                for start in range(0, len(ex), batch_size):
                    x, y = ex.x[start : start + batch_size], ex.y[start : start + batch_size]
                    x, y = self.work.on_device(x), self.work.on_device(y)
                    logits = model(x)
                    loss_sum += float(self.loss_fn(logits, y)) * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    n += len(y)
        if n == 0:
            raise DataError("evaluation data has no examples")
        return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": n}


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Where clients train and the model is evaluated (None: where ``model_fn``
    puts it, the CPU by default). The server state, the codecs and the wire
    stay on the CPU whatever it is."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available on this machine")
    return dev


def _lru_update(old: Mapping[str, Any], new: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``old`` updated with ``new`` (moved to the end: most recent), then cut to
    the ``limit`` most recent entries. Returns a new dict; ``old`` is not changed."""
    merged = {k: v for k, v in old.items() if k not in new}
    merged.update(new)
    for k in list(itertools.islice(merged, max(0, len(merged) - limit))):
        del merged[k]
    return merged


def weighted_fedavg(
    model_fn: Callable[[], nn.Module],
    client_optimizer: OptimizerFn,
    server_optimizer: OptimizerFn,
    aggregator: Aggregator | None = None,
    **kwargs: Any,
) -> WeightedFedAvg:
    """Weighted FedAvg (TFF's ``build_weighted_fed_avg``): see :class:`WeightedFedAvg`."""
    return WeightedFedAvg(model_fn, client_optimizer, server_optimizer, aggregator, **kwargs)


__all__ = ["ClientResult", "ClientTask", "ClientWork", "ServerState", "WeightedFedAvg", "weighted_fedavg"]
