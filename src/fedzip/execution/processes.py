"""The processes backend: client work in worker processes on this machine, no Ray.

``backend="processes"``. Each worker is a process of its own (started with
``spawn``: never ``fork`` a process that already runs OpenMP threads) with
its own torch thread count; it keeps the client work, and so the model the
:class:`~fedzip.algorithms.client.ClientWork` builds once per process, and
the data across rounds. ``(work, data)`` is pickled once per executor and
sent to each worker; the round's broadcast goes to each worker once per
round (``ClientTask.broadcast`` is shared by every task of a round), each
task carries only its own part (``personal``, the client's state).

Scheduling: tasks go, in task order, to the worker with the fewest queued
(at most ``queue_depth`` each: one running, the next already there), never
more than ``max_in_flight`` past the oldest one not yet yielded; results are
yielded in task order, so the server folds them in the same order as on any
other backend and runs are **bit-identical** to
:class:`~fedzip.execution.LocalExecutor` and :class:`~fedzip.execution.RayExecutor`
with the same ``threads`` (see :mod:`fedzip.execution.base`).

A worker that dies (a crash, ``os._exit``, the OOM killer, ``task_timeout``)
is reported as the failure of the client it was running and is replaced; the
clients queued behind it run again elsewhere.

Cores: :func:`available_cores` counts the cores this process may use (CPU
affinity and the cgroup quota), :func:`free_cores` those of them other
processes do not keep busy right now. Without arguments the executor picks
:func:`default_layout` for the free cores; a layout with more threads in all
than free cores warns once (:class:`OversubscriptionWarning`): OpenMP threads
that share a core spin against each other and a round can take several times
as long (measured: 11x for one process of 2 threads on 2 cores that other
processes keep busy, ``benchmarks/round_time.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import multiprocessing
import os
import pickle
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait as _wait
from pathlib import Path
from typing import Any

from fedzip.errors import ClientFailure, ConfigError, RoundFailedError
from fedzip.execution.base import check_threads

__all__ = ["OversubscriptionWarning", "ProcessExecutor", "available_cores", "busy_cores",
           "check_oversubscription", "default_layout", "free_cores"]


class OversubscriptionWarning(UserWarning):
    """More torch threads in all than the cores this process may use."""


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU
    quota (containers), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs of the cgroup's quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def busy_cores(samples: int = 5, interval: float = 0.01) -> float:
    """Cores other processes keep busy now: the median over a few samples of the
    runnable threads (``procs_running`` of ``/proc/stat``, less this one);
    elsewhere the 1-minute load average."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
            counts.append(max(0, int(line.split()[1]) - 1))
        except (OSError, StopIteration, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return float(sorted(counts)[len(counts) // 2])
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def free_cores(cores: int | None = None, busy: float | None = None) -> int:
    """Available cores less those other processes keep busy (:func:`busy_cores`), at least 1."""
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, round(cores - busy)))


def default_layout(cores: int | None = None) -> tuple[int, int]:
    """``(workers, threads per worker)`` for ``cores`` (default :func:`free_cores`):
    one single-threaded worker per core. Measured on 2 cores that other
    processes shared (load 9 to 12), seconds per round: the seed workload
    (``benchmarks/round_time.py --threads 1``) 2 processes x 1 thread 3.72,
    1 process x 2 threads 47.97 (in process, 1 thread: 4.68); 100 clients a
    round (``benchmarks/scale.py --backends local,processes --clients 10,100``)
    1.80 against 83.7 (in process: 3.26). Clients are independent, while
    intra-op threads scale poorly on batches of 20 small images and wait for
    each other at every operation when a core is taken away from one of them."""
    cores = free_cores() if cores is None else cores
    return max(1, cores), 1


def check_oversubscription(workers: int, threads: int, cores: int | None = None,
                           what: str = "client workers", busy: float | None = None) -> bool:
    """Warn (:class:`OversubscriptionWarning`) and return True when ``workers *
    threads`` torch threads are more than the free cores: ``cores`` (default
    :func:`available_cores`) less ``busy`` (default :func:`busy_cores`, 0 when
    ``cores`` is given)."""
    if cores is None:
        cores = available_cores()
        busy = busy_cores() if busy is None else busy
    busy = busy or 0.0
    free = free_cores(cores, busy)
    if workers * threads <= free:
        return False
    others = f", other processes keep {busy:.0f} busy" if busy >= 0.5 else ""
    warnings.warn(OversubscriptionWarning(
        f"{workers} {what} x {threads} torch threads = {workers * threads} threads on {free} free "
        f"core{'s' if free != 1 else ''} "
        f"({cores} available{others}): threads that share a core spin against each other and rounds "
        f"can take several times as long. Use workers x threads <= {free} (threads=1, num_workers={free})"),
        stacklevel=3)
    return True


# --------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A client's failure as it crosses the pipe (exceptions with custom
    ``__init__`` do not survive pickling; this does)."""

    client_id: str
    reason: str


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


def _reader(conn: Any, inbox: queue.Queue) -> None:
    """Drain the pipe into ``inbox`` (so the driver's sends never wait on a
    worker busy sending a result back: two full pipes would deadlock)."""
    try:
        while True:
            msg = conn.recv()
            if msg[0] in ("setup", "broadcast"):
                msg = (*msg, conn.recv_bytes())
            inbox.put(msg)
            if msg[0] == "stop":
                return
    except (EOFError, OSError):
        inbox.put(("stop",))


def _worker_main(conn: Any, threads: int) -> None:
    """The body of a worker process: setup, broadcasts and tasks, in order."""
    import torch

    from fedzip.allocator import RoundTrim, keep_heap, limit_arenas

    limit_arenas(2)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # once per process, before any parallel work
        torch.set_num_interop_threads(1)
    keep_heap()
    trim = RoundTrim()  # a worker's resident memory stays flat too
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(conn, inbox), daemon=True).start()
    work: Callable[[Any, Any], Any] | None = None
    data: Any = None
    setup_error: str | None = "no setup received"
    bkey: int | None = None
    bbytes: bytes | None = None
    while True:
        msg = inbox.get()
        op = msg[0]
        if op == "stop":
            return
        if op == "setup":
            work = data = None
            try:
                work, data = pickle.loads(msg[1])
                setup_error = None
            except Exception as e:  # noqa: BLE001 - reported to the driver
                setup_error = (f"{_one_line(e)} (unpickling the client work and data in a worker "
                               "process: the model and data code must be importable by module name)")
            msg = None
            conn.send(("setup", setup_error))
        elif op == "broadcast":
            bkey = bbytes = None  # free last round's first
            bkey, bbytes = msg[1], msg[2]
        elif op == "task":
            _, seq, task, key = msg
            msg = None
            t0 = time.perf_counter()
            try:
                if setup_error is not None or work is None:
                    raise RuntimeError(f"worker setup failed: {setup_error}")
                if key is not None:
                    if key != bkey:
                        raise RuntimeError("the round's broadcast did not reach this worker")
                    task = dataclasses.replace(task, broadcast=bbytes)
                res = work(data, task)
            except Exception as e:  # a client's failure is reported, not fatal
                res = _Failed(task.client_id, f"{type(e).__name__}: {e}")
            elapsed = time.perf_counter() - t0
            try:
                conn.send(("done", seq, res, elapsed))
            except Exception as e:  # noqa: BLE001 - an unpicklable result
                if isinstance(e, (BrokenPipeError, EOFError, OSError)):
                    return
                conn.send(("done", seq, _Failed(task.client_id, f"the result does not pickle: {_one_line(e)}"),
                           elapsed))
            res = task = None
            trim()


# --------------------------------------------------------------------------
# The driver's side
# --------------------------------------------------------------------------


class _Worker:
    """One worker process, its pipe and the tasks sent to it, oldest first."""

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.queue: deque[tuple[int, int | None]] = deque()  # (seq, task index; None: stale)
        self.bkey: int | None = None  # the broadcast it holds
        self.ready = False  # has the current (work, data)
        self.head_since = time.monotonic()

    def alive(self) -> bool:
        return self.proc.is_alive()


def _stop(workers: list[_Worker]) -> None:
    """Ask every worker to stop, then make sure (used by close and at exit)."""
    for w in workers:
        with contextlib.suppress(Exception):
            w.conn.send(("stop",))
    deadline = time.monotonic() + 5.0
    for w in workers:
        with contextlib.suppress(Exception):
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5.0)
        with contextlib.suppress(Exception):
            w.conn.close()
    workers.clear()


class ProcessExecutor:
    """Client work in worker processes on this machine, results in task order.

    Args:
        num_workers: worker processes (default: :func:`default_layout`, one
            per free core; with ``threads``, ``free cores // threads``).
        threads: intra-op torch threads in each worker (default 1, the
            faster layout measured, and one that does not depend on the
            machine: results depend on the thread count, never on the number
            of workers).
        max_in_flight: tasks sent past the oldest one not yet yielded (default
            ``4 * num_workers``): bounds the results buffered in the driver.
        queue_depth: tasks queued on a worker (1 running, the rest waiting, so
            it never waits for the driver between clients).
        task_timeout: seconds a client may run; past it its worker is killed,
            replaced and the client reported failed (None: no limit).
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        startup_timeout: seconds for workers to start and unpickle the work.
        cores: the free cores to plan for (default :func:`free_cores`: the
            available ones less those other processes keep busy).

    Warns once (:class:`OversubscriptionWarning`) when ``num_workers * threads``
    exceeds the free cores. Call :meth:`close` (or use ``with``) at the end; the
    workers are daemon processes, stopped at exit anyway.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        threads: int | None = None,
        max_in_flight: int | None = None,
        queue_depth: int = 2,
        task_timeout: float | None = None,
        start_method: str = "spawn",
        startup_timeout: float = 300.0,
        cores: int | None = None,
    ) -> None:
        if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool)
                                        or num_workers < 1):
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        check_threads(threads)
        for name, value in (("max_in_flight", max_in_flight), ("queue_depth", queue_depth)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ConfigError(f"task_timeout must be > 0 seconds or None, got {task_timeout!r}")
        if start_method not in ("spawn", "forkserver"):
            raise ConfigError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        busy = busy_cores() if cores is None else 0.0
        self.available = available_cores() if cores is None else cores
        self.cores = free_cores(self.available, busy)
        layout_workers, layout_threads = default_layout(self.cores)
        if num_workers is None and threads is None:
            num_workers, threads = layout_workers, layout_threads
        elif num_workers is None:
            num_workers = max(1, self.cores // threads)
        elif threads is None:
            threads = layout_threads
        self.num_workers: int = num_workers
        self.threads: int = threads
        self.max_in_flight = max_in_flight if max_in_flight is not None else 4 * num_workers
        self.queue_depth = queue_depth
        self.task_timeout = task_timeout
        self.start_method = start_method
        self.startup_timeout = startup_timeout
        self.oversubscribed = check_oversubscription(num_workers, threads, self.available, "worker processes",
                                                     busy)
        self._ctx = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._payload_of: tuple[Any, Any] | None = None
        self._payload: bytes | None = None
        self._seq = 0
        self._bseq = 0
        # the workers stop when the executor is collected or at exit, close() or not
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        #: counters for tests and benchmarks
        self.stats = {"workers_started": 0, "workers_replaced": 0, "payload_shipments": 0,
                      "broadcast_sends": 0, "tasks_resubmitted": 0, "peak_outstanding": 0}

    # -- workers' lifecycle --------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True,
                                 name="fedzip-worker")
        proc.start()
        child.close()  # the worker's end lives in the worker only: its death is EOF here
        self.stats["workers_started"] += 1
        return _Worker(proc, parent)

    def _setup(self, workers: list[_Worker]) -> None:
        """Send ``(work, data)`` to ``workers`` and wait for each to have it."""
        for w in workers:
            w.conn.send(("setup",))
            w.conn.send_bytes(self._payload)
        deadline = time.monotonic() + self.startup_timeout
        for w in workers:
            ready = _wait([w.conn], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RoundFailedError(f"a worker process did not start within {self.startup_timeout:.0f} s")
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                raise RoundFailedError(f"a worker process died while starting (exit code "
                                       f"{w.proc.exitcode})") from None
            if msg[1] is not None:
                raise RoundFailedError(f"worker setup failed: {msg[1]}")
            w.ready = True
            w.bkey = None

    def _prepare(self, work: Any, data: Any) -> None:
        if self._payload_of is None or self._payload_of[0] is not work or self._payload_of[1] is not data:
            try:
                self._payload = pickle.dumps((work, data), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - one clear error
                raise ConfigError(
                    f"the client work and data must pickle to go to worker processes: {_one_line(e)} "
                    "(define model, loss and data functions at module level, not as lambdas or closures)"
                ) from None
            self._payload_of = (work, data)
            self.stats["payload_shipments"] += 1
            for w in self._workers:
                w.ready = False
        dead = [w for w in self._workers if not w.alive()]
        for w in dead:  # died between rounds: replaced before it gets a task
            self._workers.remove(w)
            self.stats["workers_replaced"] += 1
            with contextlib.suppress(Exception):
                w.conn.close()
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())
        self._setup([w for w in self._workers if not w.ready])

    def _replace(self, w: _Worker) -> _Worker:
        with contextlib.suppress(Exception):
            w.proc.kill()
            w.proc.join(5.0)
        with contextlib.suppress(Exception):
            w.conn.close()
        new = self._start_worker()
        self._workers[self._workers.index(w)] = new
        self.stats["workers_replaced"] += 1
        self._setup([new])
        return new

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for memory measurements)."""
        return [w.proc.pid for w in self._workers if w.alive()]

    def close(self) -> None:
        """Stop the workers (the executor starts new ones if used again)."""
        _stop(self._workers)
        self._payload_of = None
        self._payload = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one round -----------------------------------------------------------------

    def map(self, work, data, tasks):
        if not tasks:
            return
        self._prepare(work, data)
        run = _Round(self, tasks)
        try:
            yield from run.results()
        finally:
            run.abandon()


class _Round:
    """The scheduling of one ``map``."""

    def __init__(self, ex: ProcessExecutor, tasks: Sequence[Any]) -> None:
        self.ex, self.tasks = ex, tasks
        self.done: dict[int, Any] = {}
        self.where: dict[int, int] = {}  # seq -> task index, for this round's tasks in flight
        self.retry: list[int] = []  # a heap of task indices to send again
        self.keys: dict[int, int] = {}  # id(broadcast bytes) -> key, for this round
        self.next_new = 0
        self.next_yield = 0

    # sending

    def _strip(self, task: Any) -> tuple[Any, int | None, bytes | None]:
        b = getattr(task, "broadcast", None)
        if not (isinstance(b, bytes) and b and dataclasses.is_dataclass(task)):
            return task, None, None
        key = self.keys.get(id(b))
        if key is None:  # the tasks hold ``b`` alive for the round: its id is stable
            self.ex._bseq += 1
            key = self.keys[id(b)] = self.ex._bseq
        return dataclasses.replace(task, broadcast=b""), key, b

    def _send(self, idx: int, w: _Worker) -> None:
        ex = self.ex
        task, key, b = self._strip(self.tasks[idx])
        if key is not None and w.bkey != key:
            w.conn.send(("broadcast", key))
            w.conn.send_bytes(b)
            w.bkey = key
            ex.stats["broadcast_sends"] += 1
        ex._seq += 1
        w.conn.send(("task", ex._seq, task, key))
        if not w.queue:
            w.head_since = time.monotonic()
        w.queue.append((ex._seq, idx))
        self.where[ex._seq] = idx

    def _free_worker(self) -> _Worker | None:
        w = min(self.ex._workers, key=lambda w: len(w.queue))
        return w if len(w.queue) < self.ex.queue_depth else None

    def _top_up(self) -> None:
        ex = self.ex
        while self.retry and (w := self._free_worker()) is not None:
            self._send(heapq.heappop(self.retry), w)
        while (not self.retry and self.next_new < len(self.tasks)
               and self.next_new - self.next_yield < ex.max_in_flight
               and (w := self._free_worker()) is not None):
            self._send(self.next_new, w)
            self.next_new += 1
        ex.stats["peak_outstanding"] = max(ex.stats["peak_outstanding"], self.next_new - self.next_yield)

    # receiving

    def _accept(self, w: _Worker, msg: tuple) -> None:
        _, seq, res, _elapsed = msg
        head_seq, idx = w.queue.popleft()
        if head_seq != seq:  # cannot happen: a worker runs its tasks in order
            raise RuntimeError(f"ProcessExecutor: result {seq} arrived before {head_seq}")
        w.head_since = time.monotonic()
        self.where.pop(seq, None)
        if idx is None:  # a task of an abandoned round
            return
        if isinstance(res, _Failed):
            res = ClientFailure(res.client_id, res.reason)
        self.done[idx] = res

    def _drain(self, w: _Worker) -> bool:
        """Read what ``w`` has sent; False when its pipe is closed (it died)."""
        try:
            while w.queue and w.conn.poll():
                self._accept(w, w.conn.recv())
        except (EOFError, OSError):
            return False
        return True

    def _died(self, w: _Worker, reason: str) -> None:
        """``w`` runs its tasks in order: the oldest unanswered one is the one it
        died in (reported failed); those queued behind it go to the others."""
        with contextlib.suppress(Exception):
            self._drain(w)  # results it sent before dying count
        with contextlib.suppress(Exception):
            w.proc.join(2.0)  # its pipe closed: it has ended or is ending (for the exit code)
        blamed = False
        for seq, idx in w.queue:
            self.where.pop(seq, None)
            if idx is None:
                blamed = True
                continue
            if not blamed:
                code = w.proc.exitcode
                why = reason + (f" (exit code {code})" if code is not None else "")
                self.done[idx] = ClientFailure(self.tasks[idx].client_id, why + "; the worker was replaced")
                blamed = True
            else:
                heapq.heappush(self.retry, idx)
                self.ex.stats["tasks_resubmitted"] += 1
        w.queue.clear()
        self.ex._replace(w)

    def _wait_timeout(self) -> float | None:
        limit = self.ex.task_timeout
        if limit is None:
            return None
        ends = [w.head_since + limit for w in self.ex._workers if w.queue]
        return max(0.0, min(ends) - time.monotonic()) + 0.01 if ends else 0.0

    def _check_timeouts(self) -> None:
        limit = self.ex.task_timeout
        now = time.monotonic()
        for w in list(self.ex._workers):
            if w.queue and now - w.head_since > limit:
                with contextlib.suppress(Exception):
                    w.proc.kill()
                    w.proc.join(5.0)
                self._died(w, f"timed out after {limit:g} s (task_timeout)")

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
            busy = [w for w in self.ex._workers if w.queue]
            if not busy:  # cannot happen: the task awaited is queued somewhere
                raise RuntimeError(f"ProcessExecutor lost track of task {self.next_yield}")
            by_conn = {w.conn: w for w in busy}
            ready = _wait([*by_conn, *(w.proc.sentinel for w in busy)], timeout=self._wait_timeout())
            dead: list[_Worker] = []
            for obj in ready:
                w = by_conn.get(obj)
                if w is None:  # a sentinel: the process ended; read what it sent first
                    w = next((x for x in busy if x.proc.sentinel == obj), None)
                    if w is not None and w not in dead:
                        dead.append(w)
                    continue
                if not self._drain(w) and w not in dead:
                    dead.append(w)
            for w in dead:
                if w in self.ex._workers:
                    self._died(w, "the worker process died while running this client")
            if not ready and self.ex.task_timeout is not None:
                self._check_timeouts()

    def abandon(self) -> None:
        """The round ends (done or left early): results still to come are stale."""
        for w in self.ex._workers:
            w.queue = deque((seq, None) for seq, _ in w.queue)
        self.done.clear()
        self.where.clear()
