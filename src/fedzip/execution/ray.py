"""The Ray backend: client work on Ray actors that keep the model built.

``pip install 'fedzip[ray]'``, ``backend="ray"``. The broadcast goes through
Ray's object store once per round, the work and the data once per executor;
small clients go several to an actor call; at most ``max_in_flight`` tasks
are submitted ahead of the one the server waits for. A worker that dies (a
crash, ``os._exit``, the OOM killer, a timeout) is reported as the failure of
the client it was running and is replaced; the clients queued behind it are
run again elsewhere.

Every worker runs its clients under an explicit number of torch threads (see
:mod:`fedzip.execution.base`), so results are bit-identical to
:class:`~fedzip.execution.LocalExecutor` with the same ``threads``.

The pieces, in order: :class:`_RayWorker` (the body of an actor),
:class:`_Slot` (one worker place and its queue), :class:`RayExecutor`
(settings, chunk sizing, starting or joining Ray, workers' lifecycle) and
:class:`_Round` (the scheduling of one ``map``). Ray itself is imported only
when an executor first needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import importlib.util
import math
import os
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fedzip.errors import ClientFailure, ConfigError, RoundFailedError
from fedzip.execution.base import check_threads

__all__ = ["RayExecutor", "ray_available"]


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A client's failure as it crosses from a worker (exceptions with custom
    ``__init__`` do not survive pickling; this does)."""

    client_id: str
    reason: str


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:limit]


class _RayWorker:
    """The body of a Ray actor: keeps the client work (and so the built model)
    and the data across tasks, and the current broadcast across a round."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self._work: Callable[[Any, Any], Any] | None = None
        self._data: Any = None
        self._setup_error: str | None = None
        self._broadcast_key: bytes | None = None
        self._broadcast: bytes | None = None

    def ping(self) -> int:
        return os.getpid()

    def setup(self, blob: bytes) -> str | None:
        """Unpickle ``(work, data)``; return None, or why it failed."""
        self._work = self._data = None
        self._broadcast_key = self._broadcast = None
        try:
            self._work, self._data = pickle.loads(blob)
            self._setup_error = None
        except Exception as e:
            self._setup_error = (
                f"{_one_line(e)} (unpickling the client work and data on a Ray worker; the model "
                "and data code must be importable there: install it on every node or pass "
                "runtime_env={'working_dir': ...})"
            )
        return self._setup_error

    def run(self, tasks: list[Any], broadcast_refs: list[Any]) -> tuple[list[Any], float]:
        """Run a chunk of clients in order; returns their results and the seconds taken."""
        t0 = time.perf_counter()
        out = [self._one(task, ref) for task, ref in zip(tasks, broadcast_refs, strict=True)]
        return out, time.perf_counter() - t0

    def _one(self, task: Any, ref: Any) -> Any:
        try:
            if self._setup_error is not None or self._work is None:
                return _Failed(task.client_id, f"worker setup failed: {self._setup_error}")
            if ref is not None:
                key = ref.binary()
                if key != self._broadcast_key:  # once per round per worker
                    import ray

                    self._broadcast_key = self._broadcast = None  # free last round's first
                    self._broadcast = ray.get(ref)
                    self._broadcast_key = key
                task = dataclasses.replace(task, broadcast=self._broadcast)
            return self._work(self._data, task)
        except Exception as e:  # a client's failure is reported, not fatal
            return _Failed(task.client_id, f"{type(e).__name__}: {e}")


class _Slot:
    """One worker place: its actor and the chunks queued on it, oldest first."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.queue: deque[tuple[tuple[int, ...], Any]] = deque()  # (task indices, ObjectRef)
        self.head_since = time.monotonic()
        self.ready = False  # has the current payload


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


class RayExecutor:
    """Client work on Ray actors, results in task order.

    Args:
        num_workers: actors (each keeps the model built between tasks).
        address: a running cluster to join (``"auto"``, ``"ray://host:10001"``,
            ``"host:6379"``); None starts a new local Ray instance with
            ``num_workers * threads`` CPUs (and no dashboard) on first use,
            even if a cluster runs on this machine (``"auto"`` joins that).
            If this process already called ``ray.init``, that instance is used.
        threads: intra-op torch threads per worker; each actor reserves that
            many CPUs from Ray. Default ``max(1, os.cpu_count() // num_workers)``.
        max_in_flight: clients submitted past the oldest one not yet yielded
            (default ``2 * num_workers * chunk``): bounds the results buffered
            on the driver while an earlier client is still training.
        chunk_size: clients per actor call. Each call costs the driver about
            half a millisecond, so for small clients several go together;
            None adapts it: about 25 ms of training per call, at most 32
            clients and 8 MiB of results (1 for a client of 25 ms or more).
            Chunking changes no result: each client's work depends only on
            its task, and results are folded in task order.
        task_timeout: seconds a client may run; past it its worker is killed,
            replaced, and the client reported failed (None: no limit).
        startup_timeout: seconds to wait for the workers to start.
        runtime_env: passed to ``ray.init`` when this executor calls it.
        object_store_memory: bytes of Ray's shared-memory object store when
            this executor starts Ray locally (default 1 GiB; None: Ray's
            default, 30% of the RAM). The store holds the broadcast, the
            payload and results in flight; its pages count in the resident
            memory of every process that touched them, so an unbounded store
            shows as memory creeping up over a long run until it is full.

    The broadcast bytes of the round's tasks (a ``broadcast`` field of a
    dataclass task, shared by every task) go to the object store once per
    round; ``(work, data)`` once per executor (again only if another work or
    data object is given). Call :meth:`close` (or use ``with``) at the end.
    """

    def __init__(
        self,
        num_workers: int = 2,
        address: str | None = None,
        threads: int | None = None,
        max_in_flight: int | None = None,
        chunk_size: int | None = None,
        task_timeout: float | None = None,
        startup_timeout: float = 300.0,
        runtime_env: dict[str, Any] | None = None,
        object_store_memory: int | None = 2**30,
    ) -> None:
        if not ray_available():
            raise ConfigError("the Ray backend needs Ray: pip install 'fedzip[ray]'")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        check_threads(threads)
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ConfigError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ConfigError(f"task_timeout must be > 0 seconds or None, got {task_timeout!r}")
        self.num_workers = num_workers
        self.address = address
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // num_workers)
        self.max_in_flight = max_in_flight
        self.chunk_size = chunk_size
        self._client_s: float | None = None  # seconds per client on a worker (moving average)
        self._result_bytes: float | None = None  # bytes per result (moving average)
        self.task_timeout = task_timeout
        self.startup_timeout = startup_timeout
        self.runtime_env = runtime_env
        self.object_store_memory = object_store_memory
        self._owns_ray = False
        self._slots: list[_Slot] = []
        self._payload_of: tuple[Any, Any] | None = None
        self._payload_ref: Any = None
        self._actor_cls: Any = None
        #: counters for tests and benchmarks
        self.stats = {"workers_replaced": 0, "tasks_resubmitted": 0, "peak_outstanding": 0,
                      "payload_shipments": 0, "broadcast_puts": 0, "calls": 0}

    # -- chunks and window ---------------------------------------------------

    TARGET_CALL_S = 0.025
    MAX_CHUNK = 32
    MAX_CHUNK_BYTES = 8 * 2**20

    def _chunk(self) -> int:
        if self.chunk_size is not None:
            c = self.chunk_size
        elif self._client_s is None:
            c = 1
        else:
            c = math.ceil(self.TARGET_CALL_S / max(self._client_s, 1e-6))
            if self._result_bytes:
                c = min(c, int(self.MAX_CHUNK_BYTES // max(self._result_bytes, 1.0)))
            c = max(1, min(c, self.MAX_CHUNK))
        return c if self.max_in_flight is None else min(c, self.max_in_flight)

    def _window(self, chunk: int) -> int:
        return self.max_in_flight if self.max_in_flight is not None else 2 * self.num_workers * chunk

    def _observe(self, client_s: float, result_sizes: list[int]) -> None:
        a = 0.3
        self._client_s = client_s if self._client_s is None else (1 - a) * self._client_s + a * client_s
        if result_sizes:
            b = sum(result_sizes) / len(result_sizes)
            self._result_bytes = b if self._result_bytes is None else (1 - a) * self._result_bytes + a * b

    # -- lifecycle -----------------------------------------------------------

    def _ray(self):
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"runtime_env": self.runtime_env} if self.runtime_env else {}
            if self.address is not None:
                try:
                    ray.init(address=self.address, **kw)
                except Exception as e:  # noqa: BLE001 - whatever stops the join, one clear error
                    # Ray >= 2.59 starts clusters with token authentication; a
                    # driver without the token gets only "failed to connect"
                    raise ConfigError(
                        f"ray_address {self.address!r}: {_one_line(e)}. Is the cluster up (`ray status` on "
                        "its head)? If it uses token authentication (the default of `ray start` since "
                        "Ray 2.59), set RAY_AUTH_MODE=token here and give the cluster's token in "
                        "RAY_AUTH_TOKEN or ~/.ray/auth_token"
                    ) from None
            else:
                if self.object_store_memory is not None:
                    kw["object_store_memory"] = self.object_store_memory
                # address="local": always a new instance of our own, never a cluster
                # some other program left running on this machine (join one with an address)
                ray.init(address="local", num_cpus=self.num_workers * self.threads, include_dashboard=False, **kw)
            self._owns_ray = True
        return ray

    def _new_actor(self) -> Any:
        ray = self._ray()
        if self._actor_cls is None:
            self._actor_cls = ray.remote(_RayWorker).options(
                num_cpus=self.threads, max_restarts=0, max_task_retries=0
            )
        return self._actor_cls.remote(self.threads)

    def _replace(self, slot: _Slot) -> None:
        ray = self._ray()
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        slot.actor = self._new_actor()
        slot.ready = False
        self.stats["workers_replaced"] += 1
        if self._payload_ref is not None:  # queued before any task sent to it
            slot.actor.setup.remote(self._payload_ref)
            slot.ready = True

    def _prepare(self, work: Any, data: Any) -> None:
        """Start the workers (or replace dead ones) and ship ``(work, data)`` if new."""
        ray = self._ray()
        while len(self._slots) < self.num_workers:
            self._slots.append(_Slot(self._new_actor()))
        # a worker that died between rounds is replaced before it gets a task
        pings = [(s, s.actor.ping.remote()) for s in self._slots if s.ready]
        for slot, ref in pings:
            try:
                ray.get(ref, timeout=self.startup_timeout)
            except ray.exceptions.RayError:
                self._replace(slot)
        if self._payload_of is None or self._payload_of[0] is not work or self._payload_of[1] is not data:
            from ray import cloudpickle

            self._payload_ref = None
            blob = cloudpickle.dumps((work, data), protocol=5)
            try:
                self._payload_ref = ray.put(blob)
            except ray.exceptions.ObjectStoreFullError as e:
                raise RoundFailedError(
                    f"the client work and data pickle to {len(blob) / 2**20:.0f} MiB, more than Ray's "
                    "object store holds: use a lazy data set (e.g. H5ClientData) or a larger "
                    f"object_store_memory ({_one_line(e)})"
                ) from None
            self._payload_of = (work, data)
            self.stats["payload_shipments"] += 1
            for s in self._slots:
                s.ready = False
        pending = [(s, s.actor.setup.remote(self._payload_ref)) for s in self._slots if not s.ready]
        deadline = time.monotonic() + self.startup_timeout
        for slot, ref in pending:
            try:
                err = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RoundFailedError(
                    f"Ray workers did not start within {self.startup_timeout:.0f} s: {self.num_workers} "
                    f"workers of {self.threads} CPUs each were asked of a cluster with "
                    f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
                    f"{ray.available_resources().get('CPU', 0):.0f} of them free"
                ) from None
            except ray.exceptions.RayError as e:
                raise RoundFailedError(f"a Ray worker failed to start: {_one_line(e)}") from None
            if err is not None:
                raise RoundFailedError(f"Ray worker setup failed: {err}")
            slot.ready = True

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for memory measurements)."""
        if not self._slots:
            return []
        ray = self._ray()
        return list(ray.get([s.actor.ping.remote() for s in self._slots]))

    def close(self) -> None:
        """Stop the workers, and Ray itself if this executor started it."""
        if not self._slots and not self._owns_ray:
            return
        import ray

        if ray.is_initialized():
            for s in self._slots:
                with contextlib.suppress(Exception):
                    ray.kill(s.actor, no_restart=True)
        self._slots = []
        self._payload_ref = None
        self._payload_of = None
        self._actor_cls = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one round -----------------------------------------------------------

    def map(self, work, data, tasks):
        if not tasks:
            return
        ray = self._ray()
        self._prepare(work, data)
        shared: dict[int, Any] = {}  # id(broadcast bytes) -> ObjectRef, for this round only
        run = _Round(self, ray, tasks, shared)
        try:
            yield from run.results()
        finally:
            run.cancel_outstanding()
            shared.clear()  # the last reference to the broadcast: the store frees it


class _Round:
    """The scheduling of one ``map``: chunks of consecutive tasks over the slots,
    at most a window of tasks submitted past the oldest one not yet yielded,
    results buffered until they can be yielded in task order."""

    def __init__(self, ex: RayExecutor, ray: Any, tasks: Sequence[Any], shared: dict[int, Any]) -> None:
        self.ex, self.ray, self.tasks, self.shared = ex, ray, tasks, shared
        self.done: dict[int, Any] = {}
        self.pending: dict[Any, tuple[tuple[int, ...], _Slot]] = {}
        self.retry: list[tuple[int, ...]] = []  # a heap: lowest task index first
        # every task submitted and not yet yielded has an index in [next_yield, next_new)
        self.next_new = 0
        self.next_yield = 0

    def _strip(self, task: Any) -> tuple[Any, Any]:
        b = getattr(task, "broadcast", None)
        if not (isinstance(b, bytes) and b and dataclasses.is_dataclass(task)):
            return task, None
        ref = self.shared.get(id(b))
        if ref is None:  # the tasks hold ``b`` alive for the round, so its id is stable
            ref = self.shared[id(b)] = self.ray.put(b)
            self.ex.stats["broadcast_puts"] += 1
        return dataclasses.replace(task, broadcast=b""), ref

    def _submit(self, idxs: tuple[int, ...]) -> None:
        slot = min(self.ex._slots, key=lambda s: len(s.queue))
        stripped, refs = zip(*(self._strip(self.tasks[i]) for i in idxs), strict=True)
        ref = slot.actor.run.remote(list(stripped), list(refs))
        if not slot.queue:
            slot.head_since = time.monotonic()
        slot.queue.append((idxs, ref))
        self.pending[ref] = (idxs, slot)
        stats = self.ex.stats
        stats["calls"] += 1
        stats["peak_outstanding"] = max(stats["peak_outstanding"], self.next_new - self.next_yield)

    def _top_up(self) -> None:
        while self.retry:
            self._submit(heapq.heappop(self.retry))
        n = len(self.tasks)
        while self.next_new < n:
            c = min(self.ex._chunk(), n - self.next_new)
            if self.next_new + c - self.next_yield > self.ex._window(c):
                break
            self.next_new += c
            self._submit(tuple(range(self.next_new - c, self.next_new)))
        s = self.ex.stats
        s["peak_outstanding"] = max(s["peak_outstanding"], self.next_new - self.next_yield)

    def _accept(self, idxs: tuple[int, ...], value: Any) -> None:
        results, elapsed = value
        sizes = []
        for i, res in zip(idxs, results, strict=True):
            if isinstance(res, _Failed):
                res = ClientFailure(res.client_id, res.reason)
            else:
                sizes.append(len(getattr(res, "message", b"")))
            self.done[i] = res
        self.ex._observe(elapsed / len(idxs), sizes)

    def _fail(self, idxs: tuple[int, ...], reason: str) -> None:
        for i in idxs:
            self.done[i] = ClientFailure(self.tasks[i].client_id, reason)

    def _finish(self, ref: Any) -> None:
        idxs, slot = self.pending.pop(ref)
        was_head = bool(slot.queue) and slot.queue[0][1] == ref
        slot.queue = deque(item for item in slot.queue if item[1] != ref)
        if was_head:
            slot.head_since = time.monotonic()

    def _handle(self, ref: Any) -> None:
        ray = self.ray
        idxs, slot = self.pending[ref]
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._worker_died(slot, f"the worker died while running this client ({_one_line(e)})")
            return
        except ray.exceptions.RayError as e:
            self._finish(ref)
            self._fail(idxs, _one_line(e))
            return
        self._finish(ref)
        self._accept(idxs, value)

    def _worker_died(self, slot: _Slot, reason: str) -> None:
        """A worker runs its chunks in order, so its oldest unfinished chunk is the
        one it died in. A single client there is reported failed; a chunk of
        several is run again one client per call, to find which one it was.
        The chunks queued behind never started: they are run again elsewhere."""
        ray = self.ray
        queued = list(slot.queue)
        slot.queue.clear()
        for _, r in queued:
            self.pending.pop(r, None)
        self.ex._replace(slot)
        blamed = False
        for idxs, r in queued:
            try:
                value = ray.get(r, timeout=60)
            except ray.exceptions.RayActorError:
                if blamed:
                    heapq.heappush(self.retry, idxs)
                    self.ex.stats["tasks_resubmitted"] += len(idxs)
                elif len(idxs) == 1:
                    self._fail(idxs, reason + "; the worker was replaced")
                else:
                    for i in idxs:
                        heapq.heappush(self.retry, (i,))
                    self.ex.stats["tasks_resubmitted"] += len(idxs)
                blamed = True
            except ray.exceptions.GetTimeoutError:
                with contextlib.suppress(Exception):
                    ray.cancel(r)
                heapq.heappush(self.retry, idxs)
            except ray.exceptions.RayError as e:
                if blamed:  # queued behind the chunk it died in: never ran, whatever Ray calls its loss
                    heapq.heappush(self.retry, idxs)
                    self.ex.stats["tasks_resubmitted"] += len(idxs)
                else:
                    self._fail(idxs, _one_line(e))
                    blamed = True
            else:
                self._accept(idxs, value)

    def _check_timeouts(self) -> None:
        limit = self.ex.task_timeout
        now = time.monotonic()
        for slot in list(self.ex._slots):
            if slot.queue and now - slot.head_since > limit * len(slot.queue[0][0]):
                with contextlib.suppress(Exception):
                    self.ray.kill(slot.actor, no_restart=True)
                self._worker_died(slot, f"timed out after {limit:g} s (task_timeout)")

    def _wait_timeout(self) -> float | None:
        limit = self.ex.task_timeout
        if limit is None:
            return None
        ends = [s.head_since + limit * len(s.queue[0][0]) for s in self.ex._slots if s.queue]
        if not ends:
            return 0.0
        return max(0.0, min(ends) - time.monotonic()) + 0.01

    def results(self) -> Iterator[Any]:
        n = len(self.tasks)
        while self.next_yield < n:
            self._top_up()
            if self.next_yield in self.done:
                res = self.done.pop(self.next_yield)
                self.next_yield += 1
                yield res
                del res
                continue
            if not self.pending:  # cannot happen: the task awaited is queued somewhere
                raise RuntimeError(f"RayExecutor lost track of task {self.next_yield}")
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=self._wait_timeout())
            for ref in ready:
                if ref in self.pending:  # not already handled with its dead worker
                    self._handle(ref)
            if not ready and self.ex.task_timeout is not None:
                self._check_timeouts()

    def cancel_outstanding(self) -> None:
        """On an early exit: drop what is still queued (results are not wanted)."""
        for ref in list(self.pending):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        self.pending.clear()
        self.done.clear()
        for slot in self.ex._slots:
            slot.queue.clear()
