"""The executor contract, and the thread count that makes backends agree.

An executor is anything with ``map(work, data, tasks)`` that yields one
result (or :class:`~fedzip.errors.ClientFailure`) per task, in task order.

Determinism across backends: torch's CPU kernels (oneDNN convolutions, MKL
matrix products) give results that differ in the last bits with the number of
intra-op threads, and are bit-for-bit repeatable for a fixed number. Client
training therefore runs under an explicit ``threads`` count: Ray workers
always set it (default ``cpus // num_workers``, at least 1, so workers do not
oversubscribe the cores); :class:`~fedzip.execution.LocalExecutor` applies it
around each client's work when given (default: leave torch's setting alone).
Runs with the same seed and the same ``threads`` are bit-identical on either
backend, on machines of the same CPU type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from fedzip.errors import ConfigError

__all__ = ["Executor", "check_threads", "torch_threads"]


class Executor(Protocol):
    def map(
        self, work: Callable[[Any, Any], Any], data: Any, tasks: Sequence[Any]
    ) -> Iterator[Any]: ...


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (None: leave them as they are)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_threads(threads: int | None) -> None:
    """Raise :class:`~fedzip.errors.ConfigError` unless ``threads`` is a positive int or None."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
