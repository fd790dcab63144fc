"""Seconds per FedAvg round on the seed workload: fedzip against a plain PyTorch loop.

Workload (the TFF tutorial's): 10 clients of about 100 examples, batch 20,
one local epoch, client SGD 0.02, the original FedAvg CNN (1,663,370
parameters). Each contender runs a warm-up round, then ``--rounds`` timed
rounds; the table shows the median. The plain loop is the naive one a
researcher would write (deepcopy the global model per client, a DataLoader,
average the deltas); it runs in the same process on the same data, so the
ratio is fair on a noisy machine. Contenders are interleaved round by round.

    python benchmarks/round_time.py [--rounds 7] [--threads 2]

``--task shakespeare``: the same comparison on TFF's Shakespeare baseline: 10
(play, role) clients of the offline Shakespeare data (the clients seed 0
samples for round 1: 502 sequences of 80 characters, 130 batches of 4), one
local epoch, client SGD ``--client-lr`` (default 1.0, the accuracy
benchmark's), the character LSTM (822,570 parameters). The plain loop trains
the same architecture on the same clients' sequences with the same batch size
and optimizer (DataLoader, ``ignore_index`` for the padding, deltas weighted
by real characters as fedzip's task weights them). Contenders: fedzip with
float32, TFF's compression aggregator, and EDEN at 1 bit on every tensor
(information: it costs two Hadamard rotations of 822,570 coordinates per client).

    python benchmarks/round_time.py --task shakespeare [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedzip
from fedzip.data.federated import ClientExamples


class Clients:
    """10 clients of 80-120 examples of 28x28 images (random pixels, random labels:
    the compute per example is what matters here, not what is learned)."""

    def __init__(self, n: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(80, 121, (n,), generator=g).tolist()
        self.data = {
            f"c{i}": ClientExamples(torch.rand(s, 28, 28, generator=g), torch.randint(0, 10, (s,), generator=g))
            for i, s in enumerate(sizes)
        }

    @property
    def client_ids(self):
        return list(self.data)

    def client(self, cid):
        return self.data[cid]


def plain_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def plain_round(global_model: nn.Module, clients: Clients) -> None:
    """The naive FedAvg round."""
    total = 0
    sums = [torch.zeros_like(p) for p in global_model.parameters()]
    for cid in clients.client_ids:
        ex = clients.client(cid)
        model = copy.deepcopy(global_model)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        for x, y in DataLoader(TensorDataset(ex.x.unsqueeze(1), ex.y), batch_size=20, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        n = len(ex)
        total += n
        for s, p, g in zip(sums, model.parameters(), global_model.parameters(), strict=True):
            s += n * (p.detach() - g.detach())
    with torch.no_grad():
        for s, g in zip(sums, global_model.parameters(), strict=True):
            g += s / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", choices=("images", "shakespeare"), default="images",
                    help="images: the seed workload (default); shakespeare: the char LSTM")
    ap.add_argument("--client-lr", type=float, default=1.0, help="client SGD lr (shakespeare only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "shakespeare":
        shakespeare_main(args)
        return
    clients = Clients()
    sgd = functools.partial(torch.optim.SGD, lr=0.02)
    server = functools.partial(torch.optim.SGD, lr=1.0)
    contenders = {}
    for name, agg in (("fedzip mean", fedzip.mean()), ("fedzip compression", fedzip.compression_aggregator())):
        algo = fedzip.weighted_fedavg(fedzip.fedavg_cnn, sgd, server, agg)
        holder = {"state": algo.init()}

        def step(algo=algo, holder=holder):
            holder["state"], _ = algo.next(holder["state"], clients, clients.client_ids)

        contenders[name] = step
    torch.manual_seed(0)
    plain_model = plain_cnn()
    contenders["plain PyTorch loop"] = lambda: plain_round(plain_model, clients)

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds + 1):
        for name, step in contenders.items():
            t0 = time.perf_counter()
            step()
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    n_examples = sum(len(clients.client(c)) for c in clients.client_ids)
    print(f"seed workload: 10 clients, {n_examples} examples, batch 20, 1 epoch, FedAvg CNN; "
          f"{args.threads} threads, median of {args.rounds} rounds after a warm-up")
    print(f"{'contender':24s} {'median s/round':>15s} {'min':>8s} {'max':>8s}")
    for name, ts in times.items():
        print(f"{name:24s} {statistics.median(ts):15.3f} {min(ts):8.3f} {max(ts):8.3f}")
    plain = statistics.median(times["plain PyTorch loop"])
    print()
    for name, goal in (("fedzip mean", 1.0), ("fedzip compression", 1.10)):
        ratio = statistics.median(times[name]) / plain
        print(f"ratio {name} / plain = {ratio:.3f} (goal <= {goal:.2f}: {'met' if ratio <= goal else 'MISSED'})")


# -- --task shakespeare ----------------------------------------------------------


class ShakespeareClients(Clients):
    """The 10 clients seed 0 samples for round 1, tokenized once (both
    contenders get the same tensors; neither pays the tokenizer)."""

    def __init__(self, n: int = 10, seed: int = 0) -> None:
        from fedzip.data import load_dataset
        from fedzip.seeding import sample_clients

        train, _, _ = load_dataset("shakespeare")
        self.data = {cid: train.client(cid) for cid in sample_clients(train.client_ids, n, 1, seed)}


class PlainCharLSTM(nn.Module):
    """TFF's character LSTM in plain PyTorch: embedding 8, two LSTM layers of 256, dense."""

    def __init__(self, vocab: int = 90) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 8)
        self.lstm = nn.LSTM(8, 256, num_layers=2, batch_first=True)
        self.fc = nn.Linear(256, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.embedding(x))[0])


def plain_char_round(global_model: nn.Module, clients: Clients, lr: float, pad: int = 0) -> None:
    """The naive FedAvg round for the char LSTM: padding ignored in the loss,
    clients weighted by their real characters."""
    total = 0
    sums = [torch.zeros_like(p) for p in global_model.parameters()]
    for cid in clients.client_ids:
        ex = clients.client(cid)
        model = copy.deepcopy(global_model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        n = 0
        for x, y in DataLoader(TensorDataset(ex.x, ex.y), batch_size=4, shuffle=True):
            opt.zero_grad()
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=pad).backward()
            opt.step()
            n += int((y != pad).sum())
        total += n
        for s, p, g in zip(sums, model.parameters(), global_model.parameters(), strict=True):
            s += n * (p.detach() - g.detach())
    with torch.no_grad():
        for s, g in zip(sums, global_model.parameters(), strict=True):
            g += s / total


def shakespeare_main(args: argparse.Namespace) -> None:
    from fedzip.codecs import EDEN, above_threshold
    from fedzip.tasks.shakespeare import shakespeare_task

    clients = ShakespeareClients()
    sgd = functools.partial(torch.optim.SGD, lr=args.client_lr)
    server = functools.partial(torch.optim.SGD, lr=1.0)
    contenders = {}
    for name, agg in (("fedzip mean", fedzip.mean()), ("fedzip compression", fedzip.compression_aggregator()),
                      ("fedzip eden1", fedzip.mean(above_threshold(EDEN(bits=1), 0)))):
        algo = fedzip.weighted_fedavg(task=shakespeare_task(), client_optimizer=sgd, server_optimizer=server,
                                      aggregator=agg, preprocess=fedzip.Preprocess(batch_size=4, epochs=1))
        holder = {"state": algo.init()}

        def step(algo=algo, holder=holder):
            holder["state"], _ = algo.next(holder["state"], clients, clients.client_ids)

        contenders[name] = step
    torch.manual_seed(0)
    plain_model = PlainCharLSTM()
    contenders["plain PyTorch loop"] = lambda: plain_char_round(plain_model, clients, args.client_lr)

    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds + 1):
        for name, step in contenders.items():
            t0 = time.perf_counter()
            step()
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    n_seq = sum(len(clients.client(c)) for c in clients.client_ids)
    n_batches = sum(-(-len(clients.client(c)) // 4) for c in clients.client_ids)
    n_params = sum(p.numel() for p in plain_model.parameters())
    print(f"shakespeare workload: 10 (play, role) clients, {n_seq} sequences of 80, batch 4 ({n_batches} batches), "
          f"1 epoch, char LSTM ({n_params:,} parameters), client SGD lr {args.client_lr:g}; "
          f"{args.threads} threads, median of {args.rounds} rounds after a warm-up")
    print(f"{'contender':24s} {'median s/round':>15s} {'min':>8s} {'max':>8s}")
    for name, ts in times.items():
        print(f"{name:24s} {statistics.median(ts):15.3f} {min(ts):8.3f} {max(ts):8.3f}")
    plain = statistics.median(times["plain PyTorch loop"])
    print()
    for name, goal in (("fedzip mean", 1.0), ("fedzip compression", 1.10), ("fedzip eden1", None)):
        ratio = statistics.median(times[name]) / plain
        verdict = "no goal" if goal is None else f"goal <= {goal:.2f}: {'met' if ratio <= goal else 'MISSED'}"
        print(f"ratio {name} / plain = {ratio:.3f} ({verdict})")


if __name__ == "__main__":
    main()
