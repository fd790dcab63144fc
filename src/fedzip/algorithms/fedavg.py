"""Federated averaging: weighted (by examples, TFF's default) or unweighted.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data" (AISTATS 2017), in the
generalized form of Reddi et al., "Adaptive Federated Optimization" (ICLR
2021): clients train from the broadcast model with their own optimizer, the
server averages their deltas through the aggregator and hands minus the mean
delta to a torch.optim optimizer as a pseudo-gradient. Server SGD with lr
1.0 is FedAvg; with momentum it is FedAvgM (Hsu, Qi, Brown 2019):
``server_optimizer=partial(torch.optim.SGD, lr=1.0, momentum=0.9)``.

Unweighted FedAvg gives every client weight 1: ``aggregator=mean(weighted=False)``
(or any aggregator built with ``weighted=False``).
"""

from __future__ import annotations

from typing import Any

from fedzip.aggregators import Aggregator
from fedzip.algorithms.base import FederatedAlgorithm


class WeightedFedAvg(FederatedAlgorithm):
    """Weighted FedAvg. Build it with :func:`weighted_fedavg`; the arguments
    are :class:`~fedzip.algorithms.base.FederatedAlgorithm`'s."""

    name = "fedavg"


def weighted_fedavg(
    model_fn: Any = None,
    client_optimizer: Any = None,
    server_optimizer: Any = None,
    aggregator: Aggregator | None = None,
    **kwargs: Any,
) -> WeightedFedAvg:
    """Weighted FedAvg (TFF's ``build_weighted_fed_avg``): see :class:`WeightedFedAvg`.
    ``task=`` replaces ``model_fn`` for any task (:mod:`fedzip.tasks`)."""
    return WeightedFedAvg(model_fn, client_optimizer, server_optimizer, aggregator, **kwargs)


__all__ = ["WeightedFedAvg", "weighted_fedavg"]
