"""The default executor: client work in the calling process, one client after
another, or several at once (``batch_clients``)."""

from __future__ import annotations

from fedzip.errors import ClientFailure, ConfigError
from fedzip.execution.base import check_threads, torch_threads

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """In-process and sequential: the default, with no extra dependency.

    ``threads``: intra-op torch threads while a client trains (restored after
    each client, so evaluation and the server keep theirs); None leaves torch's
    setting alone. Give the Ray workers' count to get bit-identical runs.

    ``batch_clients``: train that many clients at a time in one vectorized
    step (``work.run_batch``: :mod:`fedzip.algorithms.batched`, FedAvg's
    client step; for GPUs, where a small model's step leaves the device idle).
    Runs are then bit-identical for the same ``batch_clients``, and differ
    from one client at a time by float rounding (batched kernels sum in
    another order; ReLU and max pooling can enlarge it over many steps).
    """

    def __init__(self, threads: int | None = None, batch_clients: int = 1) -> None:
        check_threads(threads)
        if not isinstance(batch_clients, int) or isinstance(batch_clients, bool) or batch_clients < 1:
            raise ConfigError(f"batch_clients must be a positive integer, got {batch_clients!r}")
        self.threads = threads
        self.batch_clients = batch_clients

    def map(self, work, data, tasks):
        if self.batch_clients > 1:
            yield from self._map_batched(work, data, list(tasks))
            return
        for task in tasks:
            try:
                with torch_threads(self.threads):
                    res = work(data, task)
            except Exception as e:  # a client's failure is reported, not fatal
                res = ClientFailure(task.client_id, f"{type(e).__name__}: {e}")
            yield res

    def _map_batched(self, work, data, tasks):
        run = getattr(work, "run_batch", None)
        if run is None:
            raise ConfigError(f"batch_clients: {type(work).__name__} trains one client at a time")
        for start in range(0, len(tasks), self.batch_clients):
            with torch_threads(self.threads):
                yield from run(data, tasks[start:start + self.batch_clients])

    def close(self) -> None:
        pass
