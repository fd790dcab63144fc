"""From a :class:`~fedzip.config.RunConfig` to an executor."""

from __future__ import annotations

from typing import Any

from fedzip.errors import ConfigError
from fedzip.execution.base import Executor
from fedzip.execution.local import LocalExecutor
from fedzip.execution.processes import ProcessExecutor, check_oversubscription
from fedzip.execution.ray import RayExecutor

__all__ = ["make_executor"]

BACKENDS = ("local", "processes", "ray")


def make_executor(config: Any) -> Executor:
    """The executor a :class:`~fedzip.config.RunConfig` asks for: ``backend``
    ``"local"`` (in process; ``batch_clients`` at a time), ``"processes"`` (worker processes on this
    machine: ``num_workers``, ``threads``; None picks them for the machine) or
    ``"ray"`` (with ``num_workers``, ``ray_address`` and, when the config has
    one, ``threads``). A layout with more torch threads than cores warns once
    (:class:`~fedzip.execution.processes.OversubscriptionWarning`)."""
    threads = getattr(config, "threads", None)
    backend = getattr(config, "backend", "local")
    if backend == "local":
        if threads is not None:
            check_oversubscription(1, threads, what="in-process client worker")
        return LocalExecutor(threads=threads, batch_clients=getattr(config, "batch_clients", 1))
    if backend == "processes":
        return ProcessExecutor(
            num_workers=getattr(config, "num_workers", None),
            threads=threads,
            task_timeout=getattr(config, "task_timeout", None),
        )
    if backend == "ray":
        ex = RayExecutor(
            num_workers=config.num_workers,
            address=getattr(config, "ray_address", None),
            threads=threads,
            task_timeout=getattr(config, "task_timeout", None),
        )
        if getattr(config, "ray_address", None) is None:  # a Ray of our own, on this machine's cores
            check_oversubscription(ex.num_workers, ex.threads, what="Ray workers")
        return ex
    raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
