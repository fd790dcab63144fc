"""Federated algorithms: ``init() -> state``, ``next(state, data, client_ids) -> (state, metrics)``."""

from fedzip.algorithms.adaptive import FedAdagradAlgorithm, FedAdamAlgorithm, FedYogiAlgorithm
from fedzip.algorithms.base import FederatedAlgorithm, resolve_device
from fedzip.algorithms.client import (
           ClientContext,
           ClientHooks,
           ClientResult,
           ClientTask,
           ClientWork,
)
from fedzip.algorithms.dp import DPFedAvg, dp_fedavg
from fedzip.algorithms.dropout import FederatedDropout, federated_dropout, register_dropout_plan
from fedzip.algorithms.fedavg import WeightedFedAvg, weighted_fedavg
from fedzip.algorithms.fedprox import FedProx, fedprox
from fedzip.algorithms.fedsgd import FedSGD, fedsgd
from fedzip.algorithms.mime import MimeLite, mime_lite
from fedzip.algorithms.scaffold import Scaffold, scaffold
from fedzip.algorithms.space import FullSpace, ModelCoordinates, UpdateSpace
from fedzip.algorithms.state import ServerState
from fedzip.algorithms.structured import (
           LowRankUpdates,
           RandomMaskUpdates,
           lowrank_updates,
           random_mask_updates,
)

__all__ = ["FederatedDropout", "LowRankUpdates", "RandomMaskUpdates", "federated_dropout",
           "lowrank_updates", "random_mask_updates", "register_dropout_plan", "DPFedAvg", "dp_fedavg", "FedAdagradAlgorithm", "FedAdamAlgorithm", "FedSGD", "FedYogiAlgorithm", "FullSpace",
           "MimeLite", "ModelCoordinates", "Scaffold", "UpdateSpace", "fedsgd", "mime_lite", "scaffold",
           "ClientContext", "ClientHooks", "ClientResult", "ClientTask", "ClientWork", "FedProx",
           "FederatedAlgorithm", "ServerState", "WeightedFedAvg", "fedprox", "resolve_device",
           "weighted_fedavg"]
