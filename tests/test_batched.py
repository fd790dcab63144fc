"""Clients trained together (``batch_clients``: torch.func.vmap over stacked weights)
against one client at a time."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import pytest
import torch

import fedzip
from fedzip.algorithms.batched import _sgd_step, sgd_settings
from fedzip.algorithms.client import ClientTask
from fedzip.config import RunConfig
from fedzip.data.federated import ClientExamples
from fedzip.errors import ClientFailure, ConfigError
from fedzip.execution import LocalExecutor
from fedzip.execution.factory import make_executor
from tests.fakes import TensorClients, TinyCNN, deterministic


def tanh_mlp() -> torch.nn.Module:
    """Smooth (no ReLU kinks or max-pool ties), so one client at a time and
    clients together agree to float rounding over several steps."""
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


class UnevenClients:
    """8 clients of 0 to 13 vectors: with batches of 4 they take 0 to 4 steps,
    and their last batches differ in size (the batched step groups them)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        sizes = (3, 5, 8, 9, 11, 4, 13, 0)  # the last one has nothing to train on
        self.examples = {f"u{i}": ClientExamples(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
                         for i, n in enumerate(sizes)}
        self.client_ids = list(self.examples)

    def client(self, cid):
        if cid not in self.examples:
            raise KeyError(cid)
        return self.examples[cid]


def fedavg(batch_clients: int, optimizer=None, model_fn=tanh_mlp, aggregator=None,
           algorithm=fedzip.weighted_fedavg, **kw):
    return algorithm(
        model_fn, optimizer or functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01),
        functools.partial(torch.optim.SGD, lr=1.0), aggregator,
        executor=LocalExecutor(batch_clients=batch_clients),
        preprocess=fedzip.Preprocess(batch_size=4, epochs=1, shuffle_buffer=100), **kw)


def run(algo, data, rounds=2):
    state, history = algo.init(), []
    for _ in range(rounds):
        state, m = algo.next(state, data, data.client_ids)
        history.append(m)
    return state, history


AGGREGATORS = {
    "mean": lambda: None,
    "compression": lambda: fedzip.compression_aggregator(threshold=10),
    # per-client codec state (the residuals) carried from round to round
    "error feedback": lambda: fedzip.mean(fedzip.codecs.ErrorFeedback(fedzip.codecs.SignSGD())),
}


@pytest.mark.parametrize("aggregator", list(AGGREGATORS))
def test_clients_together_train_as_one_at_a_time(aggregator):
    data = UnevenClients()
    agg = AGGREGATORS[aggregator]
    ref_state, ref = run(fedavg(1, aggregator=agg()), data)
    for k in (3, 8):  # batches of 3, 3 and 2 clients; all 8 at once
        state, hist = run(fedavg(k, aggregator=agg()), data)
        for name, w in ref_state.params.items():
            assert torch.allclose(state.params[name], w, rtol=0, atol=2e-6), (k, name)
        for m, r in zip(deterministic(hist), deterministic(ref), strict=True):
            assert m.keys() == r.keys()
            for key, v in r.items():
                if "bits" in key or key.endswith(("num_examples", "num_batches", "clients")):
                    assert m[key] == v, (k, key)  # the same bits on the wire, the same counts
                else:
                    assert math.isclose(m[key], v, rel_tol=1e-4, abs_tol=1e-5), (k, key, m[key], v)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedprox_clients_together_train_as_one_at_a_time(mu):
    """FedProx's proximal term, differentiated as a function of the weights."""
    data = UnevenClients()

    def prox(k):
        return fedavg(k, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5),
                      algorithm=fedzip.fedprox, mu=mu)

    (ref, ref_m), (got, got_m) = run(prox(1), data), run(prox(8), data)
    for name, w in ref.params.items():
        assert torch.allclose(got.params[name], w, rtol=0, atol=2e-6), name
    assert got_m[-1]["train/loss"] == pytest.approx(ref_m[-1]["train/loss"], rel=1e-5)  # the task's loss
    if mu:  # the term moves the weights: not FedAvg's
        fedavg_state = run(fedavg(8, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5)), data)[0]
        assert max(float((fedavg_state.params[k] - got.params[k]).abs().max()) for k in got.params) > 1e-4


def test_clients_together_are_repeatable():
    data = UnevenClients()
    a, b = run(fedavg(4), data)[0], run(fedavg(4), data)[0]
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("settings", [
    {"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}, {"lr": 0.1, "maximize": True},
])
def test_sgd_step_is_torchs_bit_for_bit(settings):
    """The stacked step against torch.optim.SGD stepping each client's tensor."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 5, generator=g)
    grads = [torch.randn(3, 5, generator=g) for _ in range(3)]
    ref = []
    for k in range(3):
        p = torch.nn.Parameter(w0[k].clone())
        opt = torch.optim.SGD([p], **settings)
        for gr in grads:
            p.grad = gr[k].clone()
            opt.step()
        ref.append(p.detach())
    full = sgd_settings(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **settings))
    w = w0.clone()
    buf = torch.zeros_like(w)
    for t, gr in enumerate(grads):
        _sgd_step(w, gr, buf, first=t == 0, **full)
    assert torch.equal(w, torch.stack(ref))


def test_what_cannot_train_together_is_one_clear_error():
    data = UnevenClients()
    cases = [
        (fedzip.scaffold(tanh_mlp, functools.partial(torch.optim.SGD, lr=0.1), functools.partial(
            torch.optim.SGD, lr=1.0), num_clients=8, executor=LocalExecutor(batch_clients=2)),
         r"changes the client step \(ControlVariates: start, before_step, finish\)"),
        (fedavg(2, optimizer=functools.partial(torch.optim.Adam, lr=0.1)), "torch.optim.SGD"),
        (fedavg(2, model_fn=lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))),
         "buffers"),
    ]
    for algo, match in cases:
        with pytest.raises(ConfigError, match=f"batch_clients.*{match}"):
            algo.next(algo.init(), data, data.client_ids)
    with pytest.raises(ConfigError, match="batch_clients"):
        LocalExecutor(batch_clients=0)
    with pytest.raises(ConfigError, match="batch_clients > 1 works with backend 'local' only"):
        RunConfig(batch_clients=2, backend="processes")
    ex = make_executor(RunConfig(batch_clients=3))
    assert isinstance(ex, LocalExecutor) and ex.batch_clients == 3


class CaptureTasks:
    """An in-process executor that keeps the round's work orders."""

    def __init__(self) -> None:
        self.tasks: list[ClientTask] = []

    def map(self, work, data, tasks):
        self.tasks = list(tasks)
        return LocalExecutor().map(work, data, self.tasks)


def round_tasks(model_fn, client_ids) -> tuple[object, list[ClientTask]]:
    """A FedAvg's client work and its first round's work orders for ``client_ids``
    (the ids need not exist: the orders are built, not run)."""
    capture = CaptureTasks()
    algo = fedzip.weighted_fedavg(model_fn, functools.partial(torch.optim.SGD, lr=0.1),
                                  functools.partial(torch.optim.SGD, lr=1.0), executor=capture,
                                  preprocess=fedzip.Preprocess(batch_size=4, epochs=1, shuffle_buffer=100))
    algo.next(algo.init(), UnevenClients(), ["u0"])
    return algo.work, [dataclasses.replace(capture.tasks[0], client_id=c) for c in client_ids]


def test_a_client_fails_alone_and_randomness_fails_the_batch():
    data = UnevenClients()
    work, tasks = round_tasks(tanh_mlp, ["u1", "missing", "u2"])
    results = work.run_batch(data, tasks)
    assert isinstance(results[1], ClientFailure) and "missing" in results[1].reason
    assert [r.client_id for r in results] == ["u1", "missing", "u2"]
    alone = [work(data, t) for t in (tasks[0], tasks[2])]  # trained one at a time
    for together, one in zip((results[0], results[2]), alone, strict=True):
        assert not isinstance(together, ClientFailure) and len(together.message) == len(one.message)

    work, tasks = round_tasks(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)),
                              ["u1", "u2"])
    results = work.run_batch(data, tasks)
    assert all(isinstance(r, ClientFailure) and "batched training" in r.reason and "random" in r.reason
               for r in results)


def test_images_with_the_tiny_cnn_run_together():
    """A convolutional model (max pooling, ReLU) on images: the same counts and
    bits, a model within float tolerance of one client at a time after a round."""
    data = TensorClients(n_clients=5, per_client=13)
    algos = [fedzip.weighted_fedavg(
        TinyCNN, functools.partial(torch.optim.SGD, lr=0.05),
        functools.partial(torch.optim.SGD, lr=1.0), executor=LocalExecutor(batch_clients=k),
        preprocess=fedzip.Preprocess(batch_size=4, epochs=1, shuffle_buffer=100)) for k in (1, 5)]
    (s1, (m1,)), (s5, (m5,)) = (run(a, data, rounds=1) for a in algos)
    assert {k: v for k, v in m1.items() if "bits" in k} == {k: v for k, v in m5.items() if "bits" in k}
    assert m1["train/num_examples"] == m5["train/num_examples"] == 65
    assert m1["train/loss"] == pytest.approx(m5["train/loss"], rel=1e-5)
    for name, w in s1.params.items():
        assert torch.allclose(s5.params[name], w, atol=1e-5), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_clients_together_on_cuda_train_as_on_the_cpu():
    data = UnevenClients()
    cpu_state, (cpu_m, _) = run(fedavg(1), data)
    state, (m, _) = run(fedavg(7, device="cuda"), data)
    for name, w in cpu_state.params.items():
        assert state.params[name].device.type == "cpu"
        assert torch.allclose(state.params[name], w, atol=1e-5), name
    assert m["train/loss"] == pytest.approx(cpu_m["train/loss"], rel=1e-4)


@pytest.mark.parametrize("metrics", [{}, {"ignore": (0,)}, {"ignore": (0,), "accuracy_ignore": (1,)}])
def test_group_sums_are_each_clients_batch_sums(metrics):
    from fedzip.algorithms.batched import _GroupSums
    from fedzip.tasks.base import ClassificationMetrics

    m = ClassificationMetrics(**metrics)
    g = torch.Generator().manual_seed(0)
    logits, y, loss = torch.randn(3, 4, 5, 7, generator=g), torch.randint(0, 7, (3, 4, 5), generator=g), torch.rand(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap's note on isin's batching rule
        out = _GroupSums(m)(logits, y, loss)
    for j in range(3):
        ref = m.batch_sums(logits[j], y[j], loss[j])
        assert {k: float(v[j]) for k, v in out.items()} == {k: float(v) for k, v in ref.items()}
