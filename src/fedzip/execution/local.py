"""The default executor: client work in the calling process, one client after another."""

from __future__ import annotations

from fedzip.errors import ClientFailure
from fedzip.execution.base import check_threads, torch_threads

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """In-process and sequential: the default, with no extra dependency.

    ``threads``: intra-op torch threads while a client trains (restored after
    each client, so evaluation and the server keep theirs); None leaves torch's
    setting alone. Give the Ray workers' count to get bit-identical runs.
    """

    def __init__(self, threads: int | None = None) -> None:
        check_threads(threads)
        self.threads = threads

    def map(self, work, data, tasks):
        for task in tasks:
            try:
                with torch_threads(self.threads):
                    res = work(data, task)
            except Exception as e:  # a client's failure is reported, not fatal
                res = ClientFailure(task.client_id, f"{type(e).__name__}: {e}")
            yield res

    def close(self) -> None:
        pass
