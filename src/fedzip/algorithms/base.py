"""The round every algorithm shares, and the places where algorithms differ.

A round (McMahan et al., AISTATS 2017, in the generalized form of Reddi et
al., "Adaptive Federated Optimization", ICLR 2021): the server broadcasts the
model (and the algorithm's tensor groups), each sampled client trains with
its own optimizer (:mod:`fedzip.algorithms.client`), the server folds each
update into running sums as it arrives, the aggregator's stages finish on the
way out, and a torch.optim server optimizer steps on minus the mean delta as
a pseudo-gradient. Server SGD with lr 1.0 is plain FedAvg.

:class:`FederatedAlgorithm` is ``init() -> ServerState`` and ``next(state,
data, client_ids) -> (ServerState, metrics)``; it holds no state of its own,
and ``next`` never changes the state it is given, so a failed round leaves it
as it was. Algorithms override a few methods:

* :meth:`client_hooks` — what changes on the client (objective, gradients,
  groups sent back, client state);
* :meth:`broadcast_groups` / :meth:`personal_groups` — tensor groups sent to
  every client / to one client;
* :meth:`update_groups` — the groups clients send back, with their shapes;
* :meth:`server_update` — the new state from the mean delta and the groups' means.

``device="cuda"`` trains the clients and evaluates on that device; the
server state, the aggregator, the codecs and the wire stay on the CPU.
Randomness drawn on the device inside the model (dropout on CUDA) is not
keyed by client: only CPU generators are, so bit-identical runs need the CPU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedzip import tree
from fedzip.aggregators import Aggregator, StreamingMean, client_scalars, mean
from fedzip.algorithms.client import (
    GROUP_SEP,
    ClientHooks,
    ClientTask,
    ClientWork,
    OptimizerFn,
    group_policy,
    join_groups,
)
from fedzip.algorithms.space import UpdateSpace
from fedzip.algorithms.state import ServerState
from fedzip.allocator import keep_heap
from fedzip.clientstate import ClientStates, DiskStates, MemoryStates
from fedzip.codecs import Codec, CodecPolicy, as_policy
from fedzip.data.federated import ClientExamples, FederatedData, Preprocess
from fedzip.errors import ClientFailure, ConfigError, DataError, PayloadError, RoundFailedError
from fedzip.execution import Executor, LocalExecutor
from fedzip.payload import decode_params, encode_params
from fedzip.seeding import derive_seed, torch_rng
from fedzip.tasks.base import Task
from fedzip.tasks.images import image_task
from fedzip.tree import Params
from fedzip.wire import Kind, Message, bit_account, decode_message, encode_message


def check_optimizer_fn(fn: Any, name: str) -> None:
    if not callable(fn):
        raise ConfigError(f"{name} must be a callable taking parameters, e.g. partial(torch.optim.SGD, lr=0.02)")
    probe = fn([torch.zeros(1, requires_grad=True)])
    if not isinstance(probe, torch.optim.Optimizer):
        raise ConfigError(f"{name} must return a torch.optim.Optimizer, got {type(probe).__name__}")


def as_task(task: Task | None, model_fn: Callable[[], nn.Module] | None, loss_fn: Any = None) -> Task:
    """A task from ``task`` or, for the classic signature, from ``model_fn`` (and ``loss_fn``)."""
    if task is not None:
        if not isinstance(task, Task):
            raise ConfigError(f"task must be a fedzip Task, got {type(task).__name__}")
        return task
    if not callable(model_fn):
        raise ConfigError("model_fn must be a callable returning a torch.nn.Module (or give task=)")
    base = image_task()
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    # the classic signature: any model, cross-entropy and accuracy, no image checks
    return Task(name="custom", model_fn=model_fn, metrics=base.metrics, **kw)


class FederatedAlgorithm:
    """The shared round; subclasses change what the client does and how the
    server steps. See the module doc.

    Args:
        task: what is learned (:class:`~fedzip.tasks.Task`); or, classic
            signature, ``model_fn`` (and ``loss_fn``) with cross-entropy and accuracy.
        client_optimizer, server_optimizer: ``params -> torch.optim.Optimizer``.
        aggregator: the uplink chain (default: float32 weighted mean).
        broadcast_codec: the downlink codec or policy (default float32).
        preprocess: how a client batches its examples.
        seed: keys every random draw.
        executor: where client work runs (default in process).
        min_clients: clients that must succeed for a round to count (default all).
        max_client_states: per-client *codec* state kept (error feedback),
            least recently used dropped first and reported; None keeps all.
        client_states: the store for the algorithm's own per-client state
            (default: in memory, never dropped; :class:`~fedzip.clientstate.DiskStates`
            keeps it on disk).
        device: where clients train and evaluation runs.
    """

    name = "fedavg"

    def __init__(
        self,
        model_fn: Callable[[], nn.Module] | None = None,
        client_optimizer: OptimizerFn | None = None,
        server_optimizer: OptimizerFn | None = None,
        aggregator: Aggregator | None = None,
        broadcast_codec: Codec | CodecPolicy | None = None,
        preprocess: Preprocess | None = None,
        loss_fn: Any = None,
        seed: int = 0,
        executor: Executor | None = None,
        min_clients: int | None = None,
        max_client_states: int | None = 10_000,
        device: str | torch.device | None = None,
        task: Task | None = None,
        client_states: ClientStates | None = None,
    ) -> None:
        self.task = as_task(task, model_fn, loss_fn)
        if client_optimizer is None or server_optimizer is None:
            raise ConfigError("client_optimizer and server_optimizer are required")
        check_optimizer_fn(client_optimizer, "client_optimizer")
        check_optimizer_fn(server_optimizer, "server_optimizer")
        aggregator = mean() if aggregator is None else aggregator
        if not isinstance(aggregator, Aggregator):
            raise ConfigError(f"aggregator must be a fedzip Aggregator, got {type(aggregator).__name__}")
        if min_clients is not None and (not isinstance(min_clients, int) or min_clients < 1):
            raise ConfigError(f"min_clients must be a positive integer or None, got {min_clients!r}")
        self.model_fn = self.task.model_fn
        self.client_optimizer = client_optimizer
        self.server_optimizer = server_optimizer
        self.aggregator = aggregator
        self.broadcast_policy = as_policy(broadcast_codec)
        self.seed = int(seed)
        self.executor = executor or LocalExecutor()
        keep_heap()  # clients free and reallocate the same large buffers: keep them (fedzip.allocator)
        self.min_clients = min_clients
        if max_client_states is not None and (not isinstance(max_client_states, int)
                                              or isinstance(max_client_states, bool) or max_client_states < 0):
            raise ConfigError(f"max_client_states must be a non-negative integer or None, got {max_client_states!r}")
        self.codec_states = MemoryStates(max_client_states)
        self.algorithm_states = client_states if client_states is not None else MemoryStates(None)
        # kept here too: executors may wrap self.work (tests inject faults that way)
        self.hooks = self.client_hooks()
        self.space = self.update_space()
        self.work = ClientWork(
            self.task, client_optimizer, preprocess or Preprocess(), aggregator,
            self.broadcast_policy, self.seed, resolve_device(device), self.hooks, self.space,
        )
        self._warned_drop = False

    # -- what algorithms override ------------------------------------------------

    def client_hooks(self) -> ClientHooks:
        return ClientHooks()

    def update_space(self) -> UpdateSpace:
        """How clients' updates are parametrized (:mod:`fedzip.algorithms.space`)."""
        return UpdateSpace()

    def init_groups(self, params: Params) -> dict[str, Params]:
        return {}

    def broadcast_groups(self, state: ServerState) -> dict[str, Params]:
        return {}

    def personal_groups(self, state: ServerState, client_id: str) -> dict[str, Params]:
        return {}

    def update_groups(self, state: ServerState) -> dict[str, dict[str, tuple[int, ...]]]:
        """Groups each client sends back: group → tensor name → shape."""
        return {}

    def server_update(
        self, state: ServerState, mean_delta: Params, group_means: dict[str, Params], cohort: int,
    ) -> tuple[Params, dict[str, Any], dict[str, Params]]:
        """(params, optimizer state, groups) after the round. FedAvg: the server
        optimizer steps on minus the mean delta."""
        params, opt_state = self.server_step(state, mean_delta)
        return params, opt_state, dict(state.groups)

    # -- state ---------------------------------------------------------------

    def init(self) -> ServerState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "init"))
            model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
        params = {k: v.detach().clone().cpu() for k, v in model.named_parameters()}
        opt = self.server_optimizer([v.clone().requires_grad_(True) for v in params.values()])
        return ServerState(params, opt.state_dict(), self.aggregator.init(), 0, self.init_groups(params),
                           {"codec": self.codec_states.empty(), "algorithm": self.algorithm_states.empty()})

    def restore(self, state: ServerState) -> ServerState:
        """``state`` (from a checkpoint, client states as plain dicts) with this
        algorithm's stores."""
        plain = state.client_states or {}
        stores = {"codec": _as_store(plain.get("codec"), self.codec_states),
                  "algorithm": _as_store(plain.get("algorithm"), self.algorithm_states)}
        return ServerState(state.params, state.optimizer_state, state.aggregator_state, state.round,
                           dict(state.groups), stores)

    # -- one round -----------------------------------------------------------

    def next(
        self, state: ServerState, data: FederatedData, client_ids: Sequence[str]
    ) -> tuple[ServerState, dict[str, Any]]:
        """Run one round on ``client_ids`` of ``data``; returns the new state and metrics.

        Raises :class:`RoundFailedError` (and ``state`` stays valid and unchanged)
        when fewer than ``min_clients`` clients succeed (default: all must).
        """
        if not client_ids:
            raise ConfigError("a round needs at least one client id")
        t_round = time.perf_counter()
        round_num = state.round + 1
        agg = self.aggregator
        scalars = agg.broadcast_scalars(state.aggregator_state)
        space = self.space
        to_send = {} if space.personal_model else dict(state.params)
        to_send.update(join_groups(self.broadcast_groups(state)))
        records = encode_params(to_send, _BroadcastPolicy(self.broadcast_policy),
                                torch_rng(self.seed, round_num, "broadcast"))
        broadcast = encode_message(Kind.BROADCAST, scalars, records)
        down = _Bits()
        down.add(decode_message(broadcast), times=len(client_ids))

        codec_store = _as_store(state.client_states.get("codec"), self.codec_states)
        algo_store = _as_store(state.client_states.get("algorithm"), self.algorithm_states)
        tasks = []
        for cid in client_ids:
            personal = self.personal_groups(state, cid)
            if space.personal_model:
                personal = {**personal, "model": space.client_model(state.params, cid, round_num, self.seed)}
            pbytes = b""
            if personal:
                precords = encode_params(join_groups(personal), _BroadcastPolicy(self.broadcast_policy),
                                         torch_rng(self.seed, round_num, cid, "personal"))
                pbytes = encode_message(Kind.BROADCAST, {}, precords)
                down.add(decode_message(pbytes))
            cs = {}
            if cid in codec_store:
                cs["codec"] = codec_store[cid]
            if cid in algo_store:
                cs["algorithm"] = algo_store[cid]
            tasks.append(ClientTask(cid, round_num, broadcast, cs, pbytes))

        t_broadcast = time.perf_counter() - t_round  # broadcast and personal messages encoded
        acc = agg.accumulator(state.params)
        full_space = type(space) is UpdateSpace
        if agg.secure is not None:  # secure aggregation (fedzip.privacy.secagg): keys first
            if not space.sends_model_coordinates:  # masks cancel only position by position
                raise ConfigError("secure aggregation sums the codes of the model's coordinates: each "
                                  "client must send its update on them (algorithms.space.ModelCoordinates)")
            tasks = acc.setup(self.seed, round_num, tasks)
        model_shapes = tree.shapes(state.params)
        expected = self.update_groups(state)
        group_accs = {g: StreamingMean(mean(as_policy(self.hooks.group_policies.get(g)),
                                             weighted=False), {k: (s, torch.device("cpu"))
                                                               for k, s in shapes.items()})
                      for g, shapes in expected.items()}
        up = _Bits()
        train: dict[str, float] = {}
        reports: dict[str, float] = {}
        new_codec: dict[str, Any] = {}
        new_algo: dict[str, Any] = {}
        failures: list[ClientFailure] = []
        timings: dict[str, float] = {}
        t_fold = 0.0
        t_clients = time.perf_counter()
        for res in self.executor.map(self.work, data, tasks):
            if isinstance(res, ClientFailure):
                failures.append(res)
                continue
            t0 = time.perf_counter()
            try:
                msg = decode_message(res.message, expect=Kind.UPDATE)
                weight, client_train, client_reports = client_scalars(msg.scalars)
                model_records = [t for t in msg.tensors if GROUP_SEP not in t.name]
                by_group = _records_by_group(msg, expected)
                # validate and decode everything before anything is added
                if agg.secure is not None:  # a masked input: the server knows its sender, not its content
                    # and, from (seed, round, client) alone, which coordinates it held
                    acc.fold_masked(res.client_id, model_records,
                                    space.coverage(model_shapes, res.client_id, round_num, self.seed))
                elif full_space:
                    acc.fold(model_records, weight)
                elif space.sends_model_coordinates:  # on the model's coordinates already: codes may be summed
                    acc.fold(model_records, weight, space.coverage(model_shapes, res.client_id, round_num,
                                                                   self.seed))
                else:
                    sent = decode_params(
                        Message(Kind.UPDATE, {}, model_records),
                        space.sent_shapes(model_shapes, res.client_id, round_num, self.seed), agg.policy)
                    delta, coverage = space.expand(sent, model_shapes, res.client_id, round_num, self.seed)
                    acc.fold_decoded(delta, weight, coverage)
                for g, recs in by_group.items():
                    group_accs[g].fold(recs, 1.0)
            except PayloadError as e:
                failures.append(ClientFailure(res.client_id, f"PayloadError: {e}"))
                continue
            t_fold += time.perf_counter() - t0
            up.add(msg)
            for k, v in client_train.items():
                train[k] = train.get(k, 0.0) + v
            agg.fold_reports(reports, client_reports)
            for k, v in res.timings.items():
                timings[k] = timings.get(k, 0.0) + v
            if "codec" in res.client_state:
                new_codec[res.client_id] = res.client_state["codec"]
            if "algorithm" in res.client_state:
                new_algo[res.client_id] = res.client_state["algorithm"]

        t_clients = time.perf_counter() - t_clients - t_fold  # waiting on the executor
        t_server = time.perf_counter()
        needed = len(client_ids) if self.min_clients is None else min(self.min_clients, len(client_ids))
        if acc.count < needed:
            why = "; ".join(f"{f.client_id}: {f.reason}" for f in failures[:5])
            raise RoundFailedError(
                f"round {round_num}: {acc.count} of {len(client_ids)} clients succeeded, "
                f"{needed} needed; the server state is unchanged. Failures: {why}"
            )
        mean_update, agg_state, measurements = agg.finalize(
            state.aggregator_state, acc, reports,
            lambda key: torch_rng(self.seed, round_num, "stage", key))
        group_means = {}
        for g, gacc in group_accs.items():
            if gacc.count:
                group_means[g] = {k: v.to(torch.float32) / gacc.count for k, v in gacc.result().sums.items()}
        params, opt_state, groups = self.server_update(state, mean_update, group_means, acc.count)
        if not tree.all_finite(params) or not all(tree.all_finite(g) for g in groups.values()):
            raise RoundFailedError(
                f"round {round_num}: the server step produced NaN or Inf; the state is unchanged"
            )
        t_server = time.perf_counter() - t_server
        codec_store, codec_dropped = codec_store.updated(new_codec) if new_codec else (codec_store, [])
        algo_store, algo_dropped = algo_store.updated(new_algo) if new_algo else (algo_store, [])
        if algo_dropped:
            raise RoundFailedError(f"round {round_num}: the algorithm's client-state store dropped "
                                   f"{len(algo_dropped)} clients; it must keep every client")
        if codec_dropped and not self._warned_drop:
            self._warned_drop = True
            import warnings

            warnings.warn(f"per-client codec state (error feedback, warm starts) is kept for at most "
                          f"{self.codec_states.max_clients} clients: {len(codec_dropped)} dropped this "
                          "round start again from a zero residual (metric client_states/codec_dropped)",
                          stacklevel=2)
        n = len(client_ids) - len(failures)
        summary = self.task.metrics.summarize(train)
        metrics: dict[str, Any] = {
            "round": round_num,
            **{f"train/{k}": v for k, v in summary.items()},
            "train/num_examples": int(train.get("num_examples", 0)),
            "train/num_batches": int(train.get("num_batches", 0)),
            "train/diverged_clients": int(train.get("diverged_clients", 0)),
            "clients/succeeded": n,
            "clients/failed": len(failures),
            **down.metrics("broadcasted_bits"),
            **up.metrics("aggregated_bits"),
            **{f"aggregator/{k}": v for k, v in measurements.items()},
            # per-client state: its count, memory and drops, so growth is visible
            "aggregator/client_states": len(codec_store),
            "aggregator/client_state_bytes": codec_store.nbytes(),
            "client_states/codec_dropped": len(codec_dropped),
        }
        if len(algo_store) or new_algo:
            metrics["client_states/algorithm"] = len(algo_store)
            metrics["client_states/algorithm_bytes"] = algo_store.nbytes()
            if isinstance(algo_store, DiskStates):
                metrics["client_states/algorithm_disk_bytes"] = algo_store.disk_bytes()
        wall = time.perf_counter() - t_round
        metrics["time/round_s"] = wall
        metrics["time/per_client_s"] = wall / max(len(client_ids), 1)
        for k, v in timings.items():
            metrics[f"time/client_{k}_s"] = v
        metrics["time/server_fold_s"] = t_fold
        metrics["time/broadcast_encode_s"] = t_broadcast
        metrics["time/client_wait_s"] = t_clients
        metrics["time/server_update_s"] = t_server
        if failures:
            metrics["failures"] = [{"client_id": f.client_id, "reason": f.reason} for f in failures]
        new_state = ServerState(params, opt_state, agg_state, round_num, groups,
                                {"codec": codec_store, "algorithm": algo_store})
        return new_state, metrics

    def server_step(self, state: ServerState, mean_update: Params) -> tuple[Params, dict[str, Any]]:
        """The server optimizer on minus ``mean_update``. Fresh tensors and a copy
        of the optimizer state: ``state`` is never mutated."""
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
        per_client: bool = False,
    ) -> dict[str, float]:
        """The task's metrics of ``params`` over the clients of ``data`` (all by
        default): pooled over every example (sums of counts), and with
        ``per_client`` each client's figures summarized too (mean and the 10th,
        50th and 90th percentiles of client accuracy, as ``clients/...``)."""
        model = self.work.model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        model.eval()
        pooled: dict[str, float] = {}
        per: list[dict[str, float]] = []
        n = 0
        if isinstance(data, ClientExamples):
            sources: Iterable[ClientExamples] = [data]
        else:
            ids = client_ids if client_ids is not None else data.client_ids
            sources = (data.client(cid) for cid in ids)
        with torch.no_grad():
            for ex in sources:
                mine: dict[str, float] = {}
                for start in range(0, len(ex), batch_size):
                    x, y = ex.x[start : start + batch_size], ex.y[start : start + batch_size]
                    x, y = self.work.on_device(x), self.work.on_device(y)
                    logits = model(x)
                    loss = self.task.loss_fn(logits, y)
                    for k, v in self.task.metrics.batch_sums(logits, y, loss).items():
                        mine[k] = mine.get(k, 0.0) + float(v)
                    n += len(y)
                for k, v in mine.items():
                    pooled[k] = pooled.get(k, 0.0) + v
                if per_client and len(ex):
                    per.append(self.task.metrics.summarize(mine))
        if n == 0:
            raise DataError("evaluation data has no examples")
        out = {**self.task.metrics.summarize(pooled), "num_examples": n}
        if per:
            for key in per[0]:
                values = np.array([p[key] for p in per])
                out[f"clients/{key}_mean"] = float(values.mean())
                for q in (10, 50, 90):
                    out[f"clients/{key}_q{q}"] = float(np.percentile(values, q))
            out["clients/count"] = len(per)
        return out


class _Bits:
    """Bits of messages added up, itemized (framing, scalars, tensors) and by group."""

    def __init__(self) -> None:
        self.parts = {"total": 0, "framing": 0, "scalars": 0, "tensors": 0}
        self.groups: dict[str, int] = {}

    def add(self, msg: Message, times: int = 1) -> None:
        ba = bit_account(msg)
        for k in self.parts:
            self.parts[k] += getattr(ba, k) * times
        for name, bits in ba.per_tensor.items():
            group, sep, _ = name.partition(GROUP_SEP)
            g = group if sep else "model"
            self.groups[g] = self.groups.get(g, 0) + bits * times

    def metrics(self, prefix: str) -> dict[str, int]:
        out = {prefix: self.parts["total"], **{f"{prefix}/{k}": v for k, v in self.parts.items() if k != "total"}}
        if set(self.groups) - {"model"}:  # itemized by group only when there is more than the model
            out.update({f"{prefix}/group/{g}": v for g, v in self.groups.items()})
        return out


class _BroadcastPolicy:
    """The broadcast policy for model tensors and group tensors alike (a group
    tensor is chosen for by its own name's size, as a model tensor would be)."""

    def __init__(self, inner: CodecPolicy) -> None:
        self.inner = inner

    def for_tensor(self, name: str, numel: int):
        return group_policy(self.inner).for_tensor(name, numel) if GROUP_SEP in name else \
            self.inner.for_tensor(name, numel)


def _as_store(value: Any, kind: ClientStates) -> ClientStates:
    """A store of ``kind``'s sort holding ``value`` (a store, a plain dict from a checkpoint, or None)."""
    if isinstance(value, ClientStates):
        return value
    return kind.from_plain(value or {})


def _records_by_group(msg: Message, expected: Mapping[str, Mapping[str, tuple[int, ...]]]):
    by_group: dict[str, list] = {g: [] for g in expected}
    for t in msg.tensors:
        group, sep, rest = t.name.partition(GROUP_SEP)
        if not sep:
            continue
        if group not in expected:
            raise PayloadError(f"unexpected tensor group {group!r} in the update")
        by_group[group].append(type(t)(rest, t.codec, t.shape, t.body))
    return by_group


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
