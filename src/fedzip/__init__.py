"""fedzip: communication-efficient federated learning research in PyTorch.

The public API is flat::

    import fedzip
    fedavg = fedzip.weighted_fedavg(model_fn, client_optimizer, server_optimizer,
                                    aggregator=fedzip.compression_aggregator())
"""

from typing import Any

from fedzip import attacks, codecs, metrics, optim, privacy, robust, tasks
from fedzip.aggregators import (
    AdaptiveNorm,
    Aggregator,
    FixedNorm,
    StreamingMean,
    clipping,
    compression_aggregator,
    mean,
    robust_aggregator,
    zeroing,
)
from fedzip.algorithms import (
    ClientHooks,
    ClientWork,
    DPFedAvg,
    FedAdagradAlgorithm,
    FedAdamAlgorithm,
    FederatedAlgorithm,
    FederatedDropout,
    FedProx,
    FedSGD,
    FedYogiAlgorithm,
    LowRankUpdates,
    MimeLite,
    RandomMaskUpdates,
    Scaffold,
    ServerState,
    UpdateSpace,
    WeightedFedAvg,
    dp_fedavg,
    federated_dropout,
    fedprox,
    fedsgd,
    lowrank_updates,
    mime_lite,
    random_mask_updates,
    scaffold,
    weighted_fedavg,
)
from fedzip.clientstate import ClientStates, DiskStates, MemoryStates
from fedzip.data.federated import ClientExamples, FederatedData, Preprocess
from fedzip.errors import (
    ClientFailure,
    ConfigError,
    DataError,
    FedzipError,
    NonFiniteUpdateError,
    PayloadError,
    RoundFailedError,
)
from fedzip.execution import LocalExecutor
from fedzip.models import CharLSTM, FedAvgCNN, SmallCNN, fedavg_cnn
from fedzip.robust import geometric_median, krum, median, trimmed_mean
from fedzip.seeding import derive_seed, sample_clients
from fedzip.tasks import ClassificationMetrics, Task, image_task, resolve_task

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # secure aggregation loads the cryptography package on first use, not with fedzip
    if name == "secure_mean":
        from fedzip.privacy.secagg import secure_mean

        return secure_mean
    raise AttributeError(f"module 'fedzip' has no attribute {name!r}")

__all__ = [
    "ClassificationMetrics", "ClientHooks", "ClientStates", "DiskStates", "FedProx",
    "FederatedAlgorithm", "MemoryStates", "Task", "fedprox", "image_task", "metrics",
    "optim", "privacy", "resolve_task", "tasks", "CharLSTM", "SmallCNN", "secure_mean", "attacks", "robust",
    "geometric_median", "krum", "median", "trimmed_mean", "DPFedAvg", "dp_fedavg", "FederatedDropout",
    "LowRankUpdates", "RandomMaskUpdates", "federated_dropout", "lowrank_updates", "random_mask_updates", "FedAdagradAlgorithm", "FedAdamAlgorithm", "FedSGD",
    "FedYogiAlgorithm", "MimeLite", "Scaffold", "UpdateSpace", "fedsgd", "mime_lite", "scaffold",
    "AdaptiveNorm", "Aggregator", "ClientExamples", "ClientFailure", "ClientWork", "ConfigError",
    "DataError", "FedAvgCNN", "FederatedData", "FedzipError", "FixedNorm", "LocalExecutor",
    "NonFiniteUpdateError", "PayloadError", "Preprocess", "RoundFailedError", "ServerState",
    "StreamingMean", "WeightedFedAvg", "clipping", "codecs", "compression_aggregator",
    "derive_seed", "fedavg_cnn", "mean", "robust_aggregator", "sample_clients",
    "weighted_fedavg", "zeroing",
]
