"""Executors: map the round's client work over the sampled clients.

An executor takes a picklable ``work(data, task)`` callable, the federated
data and the round's tasks, and yields one result per task **in task order**
(so the server folds updates in the same order on every backend, which keeps
float sums, and therefore runs, bit-identical). A task that raises yields a
:class:`~fedzip.errors.ClientFailure` instead of stopping the round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from fedzip.errors import ClientFailure


class Executor(Protocol):
    def map(
        self, work: Callable[[Any, Any], Any], data: Any, tasks: Sequence[Any]
    ) -> Iterator[Any]: ...


class LocalExecutor:
    """In-process and sequential: the default, with no extra dependency."""

    def map(self, work, data, tasks):
        for task in tasks:
            try:
                yield work(data, task)
            except Exception as e:  # a client's failure is reported, not fatal
                yield ClientFailure(task.client_id, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        pass
