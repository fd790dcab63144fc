"""From a :class:`~fedzip.config.RunConfig` to an executor."""

from __future__ import annotations

from typing import Any

from fedzip.errors import ConfigError
from fedzip.execution.base import Executor
from fedzip.execution.local import LocalExecutor
from fedzip.execution.ray import RayExecutor

__all__ = ["make_executor"]


def make_executor(config: Any) -> Executor:
    """The executor a :class:`~fedzip.config.RunConfig` asks for: ``backend``
    ``"local"`` or ``"ray"`` (with ``num_workers``, ``ray_address`` and, when
    the config has one, ``threads``)."""
    threads = getattr(config, "threads", None)
    backend = getattr(config, "backend", "local")
    if backend == "local":
        return LocalExecutor(threads=threads)
    if backend == "ray":
        return RayExecutor(
            num_workers=config.num_workers,
            address=getattr(config, "ray_address", None),
            threads=threads,
            task_timeout=getattr(config, "task_timeout", None),
        )
    raise ConfigError(f"backend must be 'local' or 'ray', got {backend!r}")
