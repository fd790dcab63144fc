"""Executors: map the round's client work over the sampled clients.

An executor takes a picklable ``work(data, task)`` callable, the federated
data and the round's tasks, and yields one result per task **in task order**
(so the server folds updates in the same order on every backend, which keeps
float sums, and therefore runs, bit-identical). A task that raises yields a
:class:`~fedzip.errors.ClientFailure` instead of stopping the round.

``map`` is a generator: the server folds each result into running sums as it
comes, so no executor ever holds a round's results in a list.

One module per concept:

* :mod:`~fedzip.execution.base`: the :class:`Executor` protocol and the
  explicit torch thread count that makes the backends bit-identical;
* :mod:`~fedzip.execution.local`: :class:`LocalExecutor` (the default),
  in-process, one client after another;
* :mod:`~fedzip.execution.processes`: :class:`ProcessExecutor`
  (``backend="processes"``), client work in worker processes on this
  machine, no extra dependency; :func:`default_layout` (processes x threads
  for the free cores) and the :class:`OversubscriptionWarning`;
* :mod:`~fedzip.execution.ray`: :class:`RayExecutor` (``pip install
  'fedzip[ray]'``, ``backend="ray"``), client work on Ray actors;
* :mod:`~fedzip.execution.factory`: :func:`make_executor`, the executor a
  :class:`~fedzip.config.RunConfig` asks for.
"""

from fedzip.execution.base import Executor, torch_threads
from fedzip.execution.factory import make_executor
from fedzip.execution.local import LocalExecutor
from fedzip.execution.processes import (
    OversubscriptionWarning,
    ProcessExecutor,
    available_cores,
    busy_cores,
    check_oversubscription,
    default_layout,
    free_cores,
)
from fedzip.execution.ray import RayExecutor, ray_available

__all__ = ["Executor", "LocalExecutor", "OversubscriptionWarning", "ProcessExecutor", "RayExecutor",
           "available_cores", "busy_cores", "check_oversubscription", "default_layout", "free_cores",
           "make_executor", "ray_available", "torch_threads"]
