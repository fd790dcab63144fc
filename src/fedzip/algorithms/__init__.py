"""Federated algorithms: ``init() -> state``, ``next(state, data, client_ids) -> (state, metrics)``."""

from fedzip.algorithms.base import FederatedAlgorithm, resolve_device
from fedzip.algorithms.client import (
           ClientContext,
           ClientHooks,
           ClientResult,
           ClientTask,
           ClientWork,
)
from fedzip.algorithms.fedavg import WeightedFedAvg, weighted_fedavg
from fedzip.algorithms.fedprox import FedProx, fedprox
from fedzip.algorithms.state import ServerState

__all__ = ["ClientContext", "ClientHooks", "ClientResult", "ClientTask", "ClientWork", "FedProx",
           "FederatedAlgorithm", "ServerState", "WeightedFedAvg", "fedprox", "resolve_device",
           "weighted_fedavg"]
