"""TFF's tutorial "model and update compression", in fedzip.

FedAvg on federated handwriting, once with a plain weighted mean and once
with the compression aggregator; TensorBoard shows both under runs/example.

    python examples/tutorial.py            # offline default data
    python examples/tutorial.py emnist     # the real federated EMNIST (downloads once)
"""

import functools
import sys

import torch

import fedzip
from fedzip.data import load_dataset
from fedzip.metrics import TensorBoardWriter, format_round

train, test, info = load_dataset(sys.argv[1] if len(sys.argv) > 1 else "mnist5k")
print(f"data: {info.description}")


def train_with(aggregator: fedzip.Aggregator, logdir: str, rounds: int = 10) -> None:
    fedavg = fedzip.weighted_fedavg(
        model_fn=functools.partial(fedzip.FedAvgCNN, info.num_classes),
        client_optimizer=functools.partial(torch.optim.SGD, lr=0.02),
        server_optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        aggregator=aggregator,
        preprocess=fedzip.Preprocess(batch_size=20, epochs=1, shuffle_buffer=418),
    )
    writer = TensorBoardWriter(logdir)
    state = fedavg.init()
    for round_num in range(1, rounds + 1):
        clients = fedzip.sample_clients(train.client_ids, 10, round_num, seed=0)
        state, metrics = fedavg.next(state, train, clients)
        print(format_round(metrics))
        writer.write(metrics)
    writer.close()
    print("test:", fedavg.evaluate(state.params, test))


train_with(fedzip.mean(), "runs/example/mean")
train_with(fedzip.compression_aggregator(), "runs/example/compression")
