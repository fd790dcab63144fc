"""Small in-memory federated data for tests that need no files."""

from __future__ import annotations

import torch

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
