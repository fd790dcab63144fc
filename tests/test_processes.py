"""The processes backend: worker processes on this machine, without Ray.

Bit-identical to the in-process backend and to Ray with the same thread
count; results in task order; failures, crashes and timeouts reported with
the round going on; the model built once per worker; the oversubscription
warning exactly when workers x threads exceeds the cores.

One executor of 2 single-threaded workers serves the module (starting a
worker process costs seconds: it imports torch). Nothing here measures speed.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakes import TensorClients, TinyCNN, deterministic, two_worker_processes
from fakes import run_rounds as _run
from fakes import small_fedavg as _fedavg

import fedzip
from fedzip.codecs import ErrorFeedback, UniformQuantization
from fedzip.config import RunConfig
from fedzip.errors import ConfigError
from fedzip.execution import (
    LocalExecutor,
    OversubscriptionWarning,
    ProcessExecutor,
    RayExecutor,
    available_cores,
    check_oversubscription,
    default_layout,
    free_cores,
    make_executor,
    ray_available,
)
from fedzip.execution import processes as processes_mod

SGD = torch.optim.SGD
TESTS_DIR = str(Path(__file__).resolve().parent)


def _same(a, b):
    (sa, ha), (sb, hb) = a, b
    assert deterministic(ha) == deterministic(hb)
    assert all(torch.equal(sa.params[k], sb.params[k]) for k in sa.params)


@pytest.fixture(scope="module")
def executor():
    with two_worker_processes() as ex:
        yield ex


# --------------------------------------------------------------------------
# Bit-identical
# --------------------------------------------------------------------------


def _quantized_with_feedback():
    # stochastic rounding (the codec rng matters) and a per-client residual (client state)
    return fedzip.mean(ErrorFeedback(UniformQuantization(bits=4)))


def test_processes_and_in_process_runs_are_bit_identical(executor):
    data = TensorClients(n_clients=8, per_client=12)
    shipped = executor.stats["payload_shipments"]
    sends = executor.stats["broadcast_sends"]
    seed_cnn = fedzip.fedavg_cnn  # the seed's CNN: oneDNN convolutions, 1.6 M parameters
    local = _run(_fedavg(_quantized_with_feedback(), LocalExecutor(threads=1), seed_cnn, seed=3), data, 3, 5,
                 seed=3)
    procs = _run(_fedavg(_quantized_with_feedback(), executor, seed_cnn, seed=3), data, 3, 5, seed=3)
    _same(local, procs)
    assert procs[1][-1]["aggregator/client_states"] > 0  # the residuals went to and fro
    assert executor.stats["payload_shipments"] == shipped + 1  # (work, data) once for the run
    # the broadcast: at most once per worker per round, never once per client
    assert executor.stats["broadcast_sends"] - sends <= 2 * 3


def test_one_worker_and_many_give_the_same_bits(executor):
    data = TensorClients(n_clients=6, per_client=10)
    with ProcessExecutor(num_workers=1, threads=1) as one:
        a = _run(_fedavg(executor=one), data, 2, 6)
    _same(a, _run(_fedavg(executor=executor), data, 2, 6))


@pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'fedzip[ray]')")
def test_processes_and_ray_runs_are_bit_identical(executor):
    import ray

    data = TensorClients(n_clients=8, per_client=12)
    procs = _run(_fedavg(_quantized_with_feedback(), executor, seed=5), data, 2, 5, seed=5)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}})
    try:
        with RayExecutor(num_workers=2, threads=1) as rex:
            on_ray = _run(_fedavg(_quantized_with_feedback(), rex, seed=5), data, 2, 5, seed=5)
    finally:
        ray.shutdown()
    _same(procs, on_ray)


TIME_SPLIT = ("time/round_s", "time/per_client_s", "time/client_data_s", "time/client_decode_s",
              "time/client_train_s", "time/client_encode_s", "time/broadcast_encode_s", "time/client_wait_s",
              "time/server_fold_s", "time/server_update_s")


def test_run_with_backend_processes_end_to_end(tmp_path):
    """``fedzip run --backend processes``: the config's executor runs the rounds,
    the same bits as in process with the same threads, and is closed at the end.
    Every round's wall time and its split are in the metrics and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedzip.run import run

    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    data = (TensorClients(6, 10, seed=1), TensorClients(2, 10, seed=2), info)
    cfg = RunConfig(rounds=2, clients_per_round=3, batch_size=5, backend="processes", num_workers=2, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversubscriptionWarning)
        res = run(cfg, logdir=tmp_path, data=data, console=False)
    local = run(cfg.replace(backend="local"), data=data, console=False)
    assert deterministic(res.history) == deterministic(local.history)
    assert all(torch.equal(res.state.params[k], local.state.params[k]) for k in local.state.params)
    for m in res.history:
        assert all(m[k] >= 0 for k in TIME_SPLIT) and m["time/round_s"] > 0
    assert "time/eval_s" in res.history[-1]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for key in (*TIME_SPLIT, "time/eval_s"):
        assert key in events.Tags()["scalars"], key
    assert [e.step for e in events.Scalars("time/round_s")] == [1, 2]


# --------------------------------------------------------------------------
# Scheduling, failures
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    client_id: str
    delay: float = 0.0
    broadcast: bytes = b""


def sleepy(data, task):
    time.sleep(task.delay)
    return (task.client_id, len(task.broadcast), os.getpid())


def test_results_come_in_task_order_and_the_broadcast_goes_once_per_worker(executor):
    shared = b"x" * 100_000
    # every fourth task is slow: completions come out of order
    tasks = [_Task(f"t{i}", 0.2 if i % 4 == 0 else 0.0, shared) for i in range(12)]
    sends = executor.stats["broadcast_sends"]
    executor.stats["peak_outstanding"] = 0
    out = list(executor.map(sleepy, None, tasks))
    assert [o[0] for o in out] == [t.client_id for t in tasks]
    assert all(o[1] == len(shared) for o in out)  # every task saw the broadcast
    assert executor.stats["broadcast_sends"] - sends <= 2
    assert 0 < executor.stats["peak_outstanding"] <= executor.max_in_flight
    assert set(o[2] for o in out) <= set(executor.worker_pids())


def test_a_round_left_early_does_not_leak_into_the_next(executor):
    tasks = [_Task(f"a{i}", 0.05) for i in range(8)]
    gen = executor.map(sleepy, None, tasks)
    assert next(gen)[0] == "a0"
    gen.close()  # the others are still queued on the workers: their results are dropped
    again = [_Task(f"b{i}") for i in range(5)]
    assert [o[0] for o in executor.map(sleepy, None, again)] == [t.client_id for t in again]


class Faulty:
    """Client work that raises for some clients and kills its process for others."""

    def __init__(self, inner, raise_ids=(), exit_ids=(), sleep_ids=(), really_exit=True):
        self.inner, self.raise_ids, self.exit_ids = inner, set(raise_ids), set(exit_ids)
        self.sleep_ids, self.really_exit = set(sleep_ids), really_exit

    def __call__(self, data, task):
        if task.client_id in self.exit_ids:
            if self.really_exit:
                os._exit(3)
            raise RuntimeError("worker died")
        if task.client_id in self.raise_ids:
            raise ValueError(f"bad data on {task.client_id}")
        if task.client_id in self.sleep_ids:
            time.sleep(60)
        return self.inner(data, task)


def test_failing_and_crashing_clients_are_reported_and_the_round_goes_on(executor):
    """A client that raises is reported; one that kills its worker is reported,
    the worker replaced and the clients queued behind it run elsewhere: the
    clients that succeeded fold to the in-process result, bit for bit."""
    data = TensorClients(n_clients=8, per_client=8)
    ids = data.client_ids
    replaced = executor.stats["workers_replaced"]
    results = {}
    for name, ex, really_exit in (("local", LocalExecutor(threads=1), False), ("procs", executor, True)):
        fa = _fedavg(executor=ex, min_clients=3)
        fa.work = Faulty(fa.work, raise_ids={ids[1]}, exit_ids={ids[4]}, really_exit=really_exit)
        state = fa.init()
        state, m1 = fa.next(state, data, ids)
        state, m2 = fa.next(state, data, ids[:4])  # the next round runs on the replacement too
        results[name] = (state, m1, m2)
    state, m1, m2 = results["procs"]
    reasons = {f["client_id"]: f["reason"] for f in m1["failures"]}
    assert m1["clients/failed"] == 2 and m1["clients/succeeded"] == 6
    assert "ValueError: bad data on c1" in reasons[ids[1]]
    assert "died" in reasons[ids[4]] and "exit code 3" in reasons[ids[4]] and "replaced" in reasons[ids[4]]
    assert m2["clients/failed"] == 1 and m2["clients/succeeded"] == 3
    assert executor.stats["workers_replaced"] >= replaced + 1
    assert len(executor.worker_pids()) == 2
    local_state = results["local"][0]
    assert all(torch.equal(state.params[k], local_state.params[k]) for k in state.params)


def test_a_client_past_the_timeout_is_reported_and_its_worker_replaced(executor):
    data = TensorClients(n_clients=4, per_client=4)
    replaced = executor.stats["workers_replaced"]
    executor.task_timeout = 3.0
    try:
        fa = _fedavg(executor=executor, min_clients=3)
        fa.work = Faulty(fa.work, sleep_ids={"c2"})
        _, m = fa.next(fa.init(), data, data.client_ids)
    finally:
        executor.task_timeout = None
    assert m["clients/succeeded"] == 3
    assert [f["client_id"] for f in m["failures"]] == ["c2"]
    assert "timed out after 3 s" in m["failures"][0]["reason"]
    assert executor.stats["workers_replaced"] == replaced + 1


def counted_model(log: str) -> torch.nn.Module:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return TinyCNN()


def test_each_worker_builds_the_model_once(executor, tmp_path):
    log = tmp_path / "built.log"
    data = TensorClients(n_clients=6, per_client=6)
    fa = _fedavg(executor=executor, model_fn=functools.partial(counted_model, str(log)))
    state = fa.init()
    log.write_text("")  # init built one in this process: only the workers' count
    for r in range(1, 4):
        state, _ = fa.next(state, data, fedzip.sample_clients(data.client_ids, 6, r, 0))
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) and set(map(int, pids)) <= set(executor.worker_pids())


def test_work_that_does_not_pickle_is_a_config_error(executor):
    with pytest.raises(ConfigError, match="must pickle"):
        list(executor.map(lambda d, t: t, None, [_Task("a")]))


# --------------------------------------------------------------------------
# Cores: the layout and the warning
# --------------------------------------------------------------------------


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, OversubscriptionWarning)]


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
def test_the_default_layout_fits_the_cores_and_does_not_warn(cores):
    ex, caught = _warnings_of(lambda: ProcessExecutor(cores=cores))
    assert (ex.num_workers, ex.threads) == default_layout(cores)
    assert 1 <= ex.num_workers * ex.threads <= cores and not caught
    ex, caught = _warnings_of(lambda: ProcessExecutor(num_workers=2, cores=cores))  # 1 thread each
    assert ex.threads == 1 and bool(caught) == (cores < 2)
    ex, caught = _warnings_of(lambda: ProcessExecutor(threads=2, cores=cores))  # workers fill the cores
    assert ex.num_workers == max(1, cores // 2) and bool(caught) == (cores < 2)


@pytest.mark.parametrize(("workers", "threads", "cores", "warns"), [
    (2, 1, 2, False), (1, 2, 2, False), (2, 2, 2, True), (3, 1, 2, True), (4, 4, 16, False), (1, 3, 2, True),
])
def test_oversubscription_warns_once_exactly_when_threads_exceed_cores(workers, threads, cores, warns):
    ex, caught = _warnings_of(lambda: ProcessExecutor(num_workers=workers, threads=threads, cores=cores))
    assert len(caught) == (1 if warns else 0) and ex.oversubscribed == warns
    if warns:
        msg = str(caught[0].message)
        assert f"{workers * threads} threads on {cores} free cores ({cores} available)" in msg


@pytest.mark.parametrize(("busy", "free", "warns"), [(0.0, 2, False), (0.4, 2, False), (1.0, 1, True),
                                                     (5.0, 1, True)])
def test_cores_other_processes_keep_busy_are_not_free(busy, free, warns):
    """Other processes' runnable threads (given here; measured by default) take
    cores: 2 single-threaded workers on 2 cores warn when one of them is busy."""
    assert free_cores(2, busy) == free and default_layout(free) == (free, 1)
    fired, caught = _warnings_of(lambda: check_oversubscription(2, 1, cores=2, busy=busy))
    assert fired == warns and len(caught) == int(warns)
    if warns:
        assert "other processes keep" in str(caught[0].message)


def test_make_executor_builds_the_processes_backend_and_warns_for_any_backend(monkeypatch):
    ex = make_executor(RunConfig(backend="processes", num_workers=1, threads=1))
    assert isinstance(ex, ProcessExecutor) and (ex.num_workers, ex.threads) == (1, 1)
    ex.close()  # never started: nothing to stop
    with pytest.raises(ConfigError, match="backend"):
        RunConfig(backend="threads")
    monkeypatch.setattr(processes_mod, "available_cores", lambda: 2)
    monkeypatch.setattr(processes_mod, "busy_cores", lambda: 0.0)  # an idle machine
    _, caught = _warnings_of(lambda: make_executor(RunConfig(backend="local", threads=4)))
    assert len(caught) == 1 and "4 threads on 2 free cores" in str(caught[0].message)
    _, caught = _warnings_of(lambda: make_executor(RunConfig(backend="local", threads=2)))
    assert not caught
    _, caught = _warnings_of(lambda: make_executor(RunConfig(backend="processes", num_workers=2, threads=2)))
    assert len(caught) == 1
    _, caught = _warnings_of(lambda: make_executor(RunConfig()))  # in process, torch's own threads
    assert not caught


def test_available_and_free_cores_are_at_least_one_and_at_most_the_machine():
    assert 1 <= free_cores() <= available_cores() <= (os.cpu_count() or 1)


# --------------------------------------------------------------------------
# Memory between rounds
# --------------------------------------------------------------------------


def test_round_trim_gives_memory_back_only_when_a_round_left_more_than_the_slack():
    from fedzip.allocator import RoundTrim

    readings = iter([500, 400,  # first round: trims, 400 after
                     430,  # within 400 + 50: nothing
                     460, 410,  # past it: trims, 410 after
                     455])  # within 410 + 50: nothing
    calls = []
    trim = RoundTrim(slack=50, rss=lambda: next(readings), trim=calls.append)
    assert [trim() for _ in range(4)] == [True, False, True, False]
    assert calls == [0, 0] and trim.trims == 2
    assert RoundTrim(trim=False)() is False  # no allocator to trim: nothing
    assert isinstance(RoundTrim()(), bool)  # the real one, whatever the platform
