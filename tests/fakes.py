"""Small in-memory federated data, models and helpers shared by the tests."""

from __future__ import annotations

import contextlib
import functools
import textwrap
import warnings
from collections.abc import Iterator

import torch

import fedzip
from fedzip.data.federated import ClientExamples
from fedzip.errors import DataError


class TensorClients:
    """Clients of random or given images; ``poison`` makes a client's pixels NaN."""

    def __init__(self, n_clients: int = 4, per_client: int = 30, num_classes: int = 10, seed: int = 0,
                 poison: set[str] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.examples = {}
        for i in range(n_clients):
            x = torch.rand(per_client, 28, 28, generator=g)
            y = torch.randint(0, num_classes, (per_client,), generator=g)
            # a learnable signal: a bright square whose position encodes the label
            for j in range(per_client):
                r = int(y[j]) % 7
                x[j, 4 * r : 4 * r + 4, 2:8] = 0.0
            if poison and f"c{i}" in poison:
                x[:] = float("nan")
            self.examples[f"c{i}"] = ClientExamples(x, y)
        self.reads = 0

    @property
    def client_ids(self) -> list[str]:
        return list(self.examples)

    def client(self, client_id: str) -> ClientExamples:
        if client_id not in self.examples:
            raise DataError(f"unknown client id {client_id!r}")
        self.reads += 1
        return self.examples[client_id]


def deterministic(metrics):
    """A round's metrics (or a list of them) without the wall-clock timings
    (``time/...``), which differ from run to run by nature."""
    if isinstance(metrics, list):
        return [deterministic(m) for m in metrics]
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


# A tiny next-token task and its data, as a user's own module named by import
# path (tests write it to a temporary package): [B, T, V] logits, padding 0,
# 6 clients of 4 sequences of 5 tokens.
TINY_SEQ_MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from fedzip.data.federated import ClientExamples
    from fedzip.tasks import ClassificationMetrics, Task, classification_loss

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6)
            self.out = nn.Linear(6, 12)

        def forward(self, x):
            return self.out(torch.tanh(self.emb(x)))

    def task():
        return Task(name="tiny-seq", model_fn=Tiny, loss_fn=classification_loss(ignore_index=0),
                    metrics=ClassificationMetrics(ignore=(0,)), weighting="tokens", num_classes=12)

    class Clients:
        def __init__(self, seed):
            g = torch.Generator().manual_seed(seed)
            self.ex = {}
            for i in range(6):
                x = torch.randint(1, 12, (4, 5), generator=g)
                self.ex[f"u{i}"] = ClientExamples(x, (x + 1) % 12)

        @property
        def client_ids(self):
            return list(self.ex)

        def client(self, cid):
            return self.ex[cid]

    class Info:
        name = "tiny-seq"
        description = "tiny sequences of a user's own, named by import path"
        num_classes = 12
        task = "auto"

    def data():
        return Clients(0), Clients(1), Info()
''')


SGD = torch.optim.SGD


class TinyCNN(torch.nn.Module):
    """A small convolutional model for the tests where the model does not matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 5, padding=2)
        self.fc = torch.nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.relu(self.conv(x.unsqueeze(1))), 2).flatten(1))


def small_fedavg(aggregator=None, executor=None, model_fn=TinyCNN, **kw):
    return fedzip.weighted_fedavg(
        model_fn, functools.partial(SGD, lr=0.05), functools.partial(SGD, lr=1.0),
        aggregator, executor=executor,
        preprocess=fedzip.Preprocess(batch_size=8, epochs=1, shuffle_buffer=100), **kw,
    )


def run_rounds(fa, data, rounds, per_round, seed=0):
    state, history = fa.init(), []
    for r in range(1, rounds + 1):
        state, m = fa.next(state, data, fedzip.sample_clients(data.client_ids, per_round, r, seed))
        history.append(m)
    return state, history


def tiny_mlp() -> torch.nn.Module:
    """4 features, 6 hidden units, 3 classes: a model federated dropout and
    structured updates understand, small enough for hand computations."""
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


class VectorClients:
    """Two clients of 4-feature vectors, of different sizes (different weights)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.examples = {cid: ClientExamples(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
                         for cid, n in (("a", 7), ("b", 12))}
        self.client_ids = list(self.examples)

    def client(self, cid):
        return self.examples[cid]


class RecordingExecutor:
    """An in-process executor that keeps the clients' results."""

    def __init__(self) -> None:
        from fedzip.execution import LocalExecutor

        self.inner = LocalExecutor()
        self.results = []

    def map(self, work, data, tasks):
        for res in self.inner.map(work, data, tasks):
            self.results.append(res)
            yield res


@contextlib.contextmanager
def two_worker_processes() -> Iterator[fedzip.execution.ProcessExecutor]:
    """A processes backend of 2 workers x 1 thread, closed on exit; its
    oversubscription warning silenced (a 1-core runner still tests)."""
    from fedzip.execution import OversubscriptionWarning, ProcessExecutor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversubscriptionWarning)
        ex = ProcessExecutor(num_workers=2, threads=1)
    try:
        yield ex
    finally:
        ex.close()
