"""Executors: streaming, lazy data, bounded client state, and the Ray backend
(bit-identical to local, failures reported, dead workers replaced).

Ray is started once for the module (2 CPUs, no dashboard) and shut down at
the end; the tests that need it are skipped where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from fakes import TensorClients, deterministic
from fakes import run_rounds as _run
from fakes import small_fedavg as _fedavg

import fedzip
from fedzip.codecs import ErrorFeedback, UniformQuantization
from fedzip.config import RunConfig
from fedzip.data.h5 import H5ClientData
from fedzip.errors import ConfigError
from fedzip.execution import LocalExecutor, RayExecutor, make_executor, ray_available

SGD = torch.optim.SGD
TESTS_DIR = str(Path(__file__).resolve().parent)
needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'fedzip[ray]')")


class Faulty:
    """Client work that raises for some clients and kills its process for others
    (``exit_ids`` raise too when ``really_exit`` is False, e.g. on the local backend)."""

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


# --------------------------------------------------------------------------
# Lazy data: an h5 file of many clients, reads counted in a log file (so reads
# in Ray workers count too)
# --------------------------------------------------------------------------


class LoggedH5(H5ClientData):
    """fedzip's lazy HDF5 reader, logging each client read to a file (so reads
    in Ray workers, on their own copies of the object, count too)."""

    def __init__(self, path: Path, log: Path) -> None:
        super().__init__(path, num_classes=10)
        self.log = str(log)

    def client(self, client_id):
        ex = super().client(client_id)
        with open(self.log, "a") as fh:
            fh.write(client_id + "\n")
        return ex

    def logged(self) -> list[str]:
        p = Path(self.log)
        return p.read_text().split() if p.exists() else []


@pytest.fixture(scope="module")
def h5_clients(tmp_path_factory):
    path = tmp_path_factory.mktemp("h5") / "clients.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(2000):  # TFF's federated EMNIST layout
            g = f.create_group(f"examples/u{i:04d}")
            g["pixels"] = rng.random((4, 28, 28), dtype=np.float32)
            g["label"] = rng.integers(0, 10, 4).astype(np.int32)
    return path


# --------------------------------------------------------------------------
# Local
# --------------------------------------------------------------------------


def test_local_executor_sets_threads_around_each_client_only():
    seen = []

    def work(data, task):
        seen.append(torch.get_num_threads())
        return task

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    out = list(LocalExecutor(threads=target).map(work, None, [_Task("a"), _Task("b")]))
    assert [t.client_id for t in out] == ["a", "b"]
    assert seen == [target, target] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        LocalExecutor(threads=0)


def test_server_folds_each_result_as_it_arrives_and_shares_the_broadcast():
    """Streaming: while a client trains, at most the previous result is alive on
    the server; every task carries the same broadcast object (no per-task copy)."""
    data = TensorClients(n_clients=40, per_client=4)
    fa = _fedavg()
    inner = fa.work
    results: list[weakref.ref] = []
    live_at_start, broadcasts = [], set()

    def tracking(d, task):
        live_at_start.append(sum(r() is not None for r in results))
        broadcasts.add(id(task.broadcast))
        res = inner(d, task)
        results.append(weakref.ref(res))
        return res

    fa.work = tracking
    _, m = fa.next(fa.init(), data, data.client_ids)
    assert m["clients/succeeded"] == 40
    assert max(live_at_start) <= 1, live_at_start
    assert len(broadcasts) == 1
    assert isinstance(LocalExecutor().map(inner, data, []), type(x for x in ()))  # a generator


def test_lazy_h5_data_reads_only_the_sampled_clients(h5_clients, tmp_path):
    data = LoggedH5(h5_clients, tmp_path / "reads.log")
    assert len(pickle.dumps(data)) < 50_000  # ids and a path, not the examples
    fa = _fedavg(executor=LocalExecutor())
    _, hist = _run(fa, data, rounds=2, per_round=5)
    sampled = sorted(c for r in (1, 2) for c in fedzip.sample_clients(data.client_ids, 5, r, 0))
    assert data.reads == 10 and sorted(data.logged()) == sampled  # 10 of 2,000 clients, once each
    assert all(m["clients/succeeded"] == 5 for m in hist)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_client_states_are_bounded_least_recently_used_first():
    data = TensorClients(n_clients=12, per_client=4)
    fa = _fedavg(fedzip.mean(ErrorFeedback(UniformQuantization(bits=2))), max_client_states=6)
    state = fa.init()
    for r in range(1, 6):
        ids = fedzip.sample_clients(data.client_ids, 4, r, 0)
        state, m = fa.next(state, data, ids)
        kept = state.client_states["codec"]
        assert len(kept) == m["aggregator/client_states"] <= 6
        residual_bytes = sum(t.numel() * 4 for st in kept.values() for t in _tensors(st))
        assert m["aggregator/client_state_bytes"] == residual_bytes > 0
        assert set(ids) <= set(kept)  # this round's clients are the most recent
        assert list(kept)[-4:] == list(ids)
    with pytest.raises(ConfigError, match="max_client_states"):
        _fedavg(max_client_states=-1)


def test_make_executor_from_config():
    assert isinstance(make_executor(RunConfig()), LocalExecutor)
    assert make_executor(RunConfig(threads=1)).threads == 1
    with pytest.raises(ConfigError, match="threads"):
        RunConfig(threads=0)
    with pytest.raises(ConfigError, match="backend 'local' only"):
        RunConfig(backend="ray", device="meta")  # any device but the CPU
    if ray_available():
        ex = make_executor(RunConfig(backend="ray", num_workers=3))
        assert isinstance(ex, RayExecutor) and ex.num_workers == 3 and ex.threads >= 1
        ex.close()  # never started: nothing to stop
        assert make_executor(RunConfig(backend="ray", threads=3)).threads == 3


# --------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    if not ray_available():
        pytest.skip("Ray is not installed")
    import ray

    # the workers import this module and tests/fakes.py by name
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_executor(ray_session):
    ex = RayExecutor(num_workers=2, threads=1)
    yield ex
    ex.close()


@needs_ray
def test_run_with_backend_ray_end_to_end(ray_session):
    """``fedzip run --backend ray``: the config's executor runs the rounds and is
    closed at the end (its workers freed for the tests below)."""
    from fedzip.run import run

    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    data = (TensorClients(6, 10, seed=1), TensorClients(2, 10, seed=2), info)
    cfg = RunConfig(rounds=2, clients_per_round=3, batch_size=5, backend="ray", num_workers=2)
    res = run(cfg, data=data, console=False)
    local = run(cfg.replace(backend="local"), data=data, console=False)
    assert [m["clients/succeeded"] for m in res.history] == [3, 3] and "loss" in res.final_eval
    for k, v in local.state.params.items():  # the same up to the thread count (see execution/base.py)
        torch.testing.assert_close(res.state.params[k], v, rtol=0, atol=1e-5)


@needs_ray
def test_ray_and_local_runs_are_bit_identical(ray_session, ray_executor):
    data = TensorClients(n_clients=8, per_client=12)
    agg = fedzip.mean(UniformQuantization(bits=4))  # stochastic rounding: the codec rng matters
    runs = {}
    for name, ex in (("local", LocalExecutor(threads=1)), ("ray", ray_executor)):
        fa = _fedavg(agg, executor=ex, model_fn=fedzip.fedavg_cnn, seed=3)  # the seed's CNN
        runs[name] = _run(fa, data, rounds=3, per_round=5, seed=3)
    (s_local, h_local), (s_ray, h_ray) = runs["local"], runs["ray"]
    assert deterministic(h_local) == deterministic(h_ray)
    assert all(torch.equal(s_local.params[k], s_ray.params[k]) for k in s_local.params)
    assert ray_executor.stats["broadcast_puts"] == 3  # one object-store put per round
    assert ray_executor.stats["payload_shipments"] == 1  # (work, data) once for the run
    # after the rounds the driver holds one object ref, the payload: each round's
    # broadcast was freed (Ray's reference table is internal API; checked if there)
    core = getattr(ray_session._private.worker.global_worker, "core_worker", None)
    if core is not None and hasattr(core, "get_all_reference_counts"):
        assert set(core.get_all_reference_counts()) == {ray_executor._payload_ref.hex().encode()}


@dataclass(frozen=True)
class _Task:
    client_id: str
    delay: float = 0.0


def sleepy(data, task):
    time.sleep(task.delay)
    return task.client_id


@contextlib.contextmanager
def _settings(ex, **kw):
    old = {k: getattr(ex, k) for k in kw}
    for k, v in kw.items():
        setattr(ex, k, v)
    try:
        yield ex
    finally:
        for k, v in old.items():
            setattr(ex, k, v)


@needs_ray
@pytest.mark.parametrize("chunk", [1, 3])
def test_ray_yields_in_task_order_within_the_window(ray_executor, chunk):
    # every fourth task is slow: completions come out of order
    tasks = [_Task(f"t{i}", 0.25 if i % 4 == 0 else 0.0) for i in range(12)]
    ray_executor.stats["peak_outstanding"] = 0
    calls = ray_executor.stats["calls"]
    with _settings(ray_executor, max_in_flight=6, chunk_size=chunk):
        out = list(ray_executor.map(sleepy, None, tasks))
    assert out == [t.client_id for t in tasks]
    assert 0 < ray_executor.stats["peak_outstanding"] <= 6
    assert ray_executor.stats["calls"] - calls == 12 // chunk


@needs_ray
@pytest.mark.parametrize("chunk", [1, 4])
def test_failing_and_crashing_clients_are_reported_and_the_round_goes_on(ray_executor, chunk):
    """A client that raises is reported; one that kills its worker (os._exit) is
    reported, its worker replaced, and (in a chunk of several) the others of
    the chunk run again: the round's result is the local backend's, bit for bit."""
    data = TensorClients(n_clients=8, per_client=8)
    ids = data.client_ids
    replaced = ray_executor.stats["workers_replaced"]
    resubmitted = ray_executor.stats["tasks_resubmitted"]
    results = {}
    for name, ex, really_exit in (("local", LocalExecutor(threads=1), False), ("ray", ray_executor, True)):
        fa = _fedavg(executor=ex, min_clients=3)
        fa.work = Faulty(fa.work, raise_ids={ids[1]}, exit_ids={ids[4]}, really_exit=really_exit)
        state = fa.init()
        with _settings(ray_executor, chunk_size=chunk):
            state, m1 = fa.next(state, data, ids)
            state, m2 = fa.next(state, data, ids[:4])  # the next round runs on a fresh worker
        results[name] = (state, m1, m2)
    state, m1, m2 = results["ray"]
    reasons = {f["client_id"]: f["reason"] for f in m1["failures"]}
    assert m1["clients/failed"] == 2 and m1["clients/succeeded"] == 6, reasons
    assert "ValueError: bad data on c1" in reasons[ids[1]]
    assert "worker died" in reasons[ids[4]] and "replaced" in reasons[ids[4]]
    assert m2["clients/failed"] == 1 and m2["clients/succeeded"] == 3
    assert ray_executor.stats["workers_replaced"] >= replaced + 1
    if chunk > 1:  # the chunk the worker died in was run again one client per call
        assert ray_executor.stats["tasks_resubmitted"] >= resubmitted + chunk
    # the clients that succeeded were folded exactly as on the local backend
    local_state = results["local"][0]
    assert all(torch.equal(state.params[k], local_state.params[k]) for k in state.params)


@needs_ray
def test_ray_reads_only_the_sampled_clients(ray_executor, h5_clients, tmp_path):
    data = LoggedH5(h5_clients, tmp_path / "ray_reads.log")
    _, hist = _run(_fedavg(executor=ray_executor), data, rounds=2, per_round=6)
    sampled = sorted(c for r in (1, 2) for c in fedzip.sample_clients(data.client_ids, 6, r, 0))
    assert sorted(data.logged()) == sampled and data.reads == 0  # read on the workers only
    assert all(m["clients/succeeded"] == 6 for m in hist)


@needs_ray
def test_a_client_past_the_timeout_is_reported_and_its_worker_replaced(ray_executor):
    data = TensorClients(n_clients=4, per_client=4)
    replaced = ray_executor.stats["workers_replaced"]
    with _settings(ray_executor, task_timeout=4.0, chunk_size=1):
        fa = _fedavg(executor=ray_executor, min_clients=3)
        fa.work = Faulty(fa.work, sleep_ids={"c2"})
        t0 = time.monotonic()
        _, m = fa.next(fa.init(), data, data.client_ids)
        assert time.monotonic() - t0 < 40
    assert m["clients/succeeded"] == 3
    assert [f["client_id"] for f in m["failures"]] == ["c2"]
    assert "timed out after 4 s" in m["failures"][0]["reason"]
    assert ray_executor.stats["workers_replaced"] == replaced + 1
