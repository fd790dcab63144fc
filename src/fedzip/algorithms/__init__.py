"""Federated algorithms: ``init() -> state``, ``next(state, data, client_ids) -> (state, metrics)``."""

from fedzip.algorithms.fedavg import ClientWork, ServerState, WeightedFedAvg, weighted_fedavg

__all__ = ["ClientWork", "ServerState", "WeightedFedAvg", "weighted_fedavg"]
