"""FedAdam, FedYogi and FedAdagrad as algorithms: FedAvg with an adaptive server optimizer.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive
Federated Optimization" (ICLR 2021), Algorithm 2: clients train as in FedAvg,
the server treats the mean delta as a pseudo-gradient for
:class:`~fedzip.optim.FedAdam`, :class:`~fedzip.optim.Yogi` or
:class:`~fedzip.optim.FedAdagrad` (the paper's update, no bias correction,
``v`` starting at τ²).

The classes build the server optimizer from ``server_lr`` (η), ``tau`` (τ)
and ``betas`` (FedAdagrad: ``beta1``). Without ``server_lr`` they take the
learning rate of the ``server_optimizer`` they are given, which must then be
plain SGD (the run config's flat ``server_lr`` reaches them that way: note
its default, 1.0, is FedAvg's; adaptive servers usually want 10^-2 or so).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fedzip.algorithms.base import FederatedAlgorithm
from fedzip.errors import ConfigError
from fedzip.optim import DEFAULT_BETAS, DEFAULT_TAU, fed_adagrad, fed_adam, fed_yogi


def _bind(cls_name: str, server_lr: float | None, args: tuple, kwargs: dict) -> tuple[inspect.BoundArguments, float]:
    bound = inspect.signature(FederatedAlgorithm.__init__).bind(None, *args, **kwargs)
    given = bound.arguments.get("server_optimizer")
    if given is not None:
        probe = given([torch.zeros(1, requires_grad=True)])
        group = probe.param_groups[0]
        if type(probe) is not torch.optim.SGD or group.get("momentum", 0):
            raise ConfigError(f"{cls_name} builds its own server optimizer; the server_optimizer given "
                              f"({type(probe).__name__}) must be plain SGD (only its lr is used), or leave it out")
        if server_lr is None:
            server_lr = float(group["lr"])
    if server_lr is None:
        raise ConfigError(f"{cls_name} needs server_lr (or a plain SGD server_optimizer whose lr it takes)")
    return bound, server_lr


class _AdaptiveFedAvg(FederatedAlgorithm):
    def _start(self, bound: inspect.BoundArguments, server_optimizer: Any) -> None:
        bound.arguments["server_optimizer"] = server_optimizer
        super().__init__(*bound.args[1:], **bound.kwargs)


class FedAdamAlgorithm(_AdaptiveFedAvg):
    """FedAvg with the FedAdam server (see the module doc)."""

    name = "fedadam"

    def __init__(self, *args: Any, server_lr: float | None = None, tau: float = DEFAULT_TAU,
                 betas: tuple[float, float] = DEFAULT_BETAS, **kwargs: Any) -> None:
        bound, lr = _bind("FedAdam", server_lr, args, kwargs)
        self._start(bound, fed_adam(lr, betas=betas, tau=tau))


class FedYogiAlgorithm(_AdaptiveFedAvg):
    """FedAvg with the FedYogi server (see the module doc)."""

    name = "fedyogi"

    def __init__(self, *args: Any, server_lr: float | None = None, tau: float = DEFAULT_TAU,
                 betas: tuple[float, float] = DEFAULT_BETAS, **kwargs: Any) -> None:
        bound, lr = _bind("FedYogi", server_lr, args, kwargs)
        self._start(bound, fed_yogi(lr, betas=betas, tau=tau))


class FedAdagradAlgorithm(_AdaptiveFedAvg):
    """FedAvg with the FedAdagrad server (see the module doc); ``beta1`` is its
    momentum (0: Adagrad as such), it has no second beta."""

    name = "fedadagrad"

    def __init__(self, *args: Any, server_lr: float | None = None, tau: float = DEFAULT_TAU,
                 beta1: float = 0.0, **kwargs: Any) -> None:
        bound, lr = _bind("FedAdagrad", server_lr, args, kwargs)
        self._start(bound, fed_adagrad(lr, tau=tau, beta1=beta1))


__all__ = ["FedAdagradAlgorithm", "FedAdamAlgorithm", "FedYogiAlgorithm"]
