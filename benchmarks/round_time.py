"""Seconds per FedAvg round on the seed workload: fedzip against two plain PyTorch loops.

Workload (the TFF tutorial's): 10 clients of about 100 examples, batch 20,
one local epoch, client SGD 0.02, the original FedAvg CNN (1,663,370
parameters). Each contender runs a warm-up round, then ``--rounds`` timed
rounds, interleaved round by round (the order rotates), in one process on the
same data, so a change of load on the machine hits every contender alike.

Two references:

* **floor**: the fastest hand-written loop doing the same training: the same
  model (fedzip's FedAvg CNN) built once, the global weights copied in place
  into it per client, every client's batches prepared as tensors before the
  timing, one SGD optimizer, the weighted sum of the clients' weights folded
  in place; nothing else (no encoding, no metrics, no copies);
* **naive**: the loop a researcher would write (deepcopy the global model per
  client, a DataLoader, average the deltas).

fedzip's contenders run ``algorithm.next`` and write the round's metrics as
``fedzip run`` does (``metrics.jsonl`` and TensorBoard, in a temporary folder):
both are in their time. In process (``LocalExecutor``) with ``--threads``
torch threads, as the references; and, with ``--layouts``, on the processes
backend (``ProcessExecutor``: workers x threads per worker). Goals: fedzip
mean <= 1.02 x floor, compression <= 1.08 x floor, mean <= 0.85 x naive
(in process, the references' threads). The ratios are of the medians, and in
parentheses the median of the per-round ratios (paired rounds) with its 95%
distribution-free interval (order statistics, the sign test's), and the ratio
of CPU seconds per round (this process and its worker processes: on cores
that other processes share, wall time also counts the waits for a core). A
goal is met when the whole interval is under it, missed when it is over it,
and unresolved otherwise: rounds on a shared machine vary by several percent,
as much as the gaps the goals are about.

Where the time goes: the median per round of fedzip's ``time/...`` metrics
(client figures summed over the clients: on several processes their sum
exceeds the wall time), the writers, and what is left (the round's own
bookkeeping: bit accounting, metrics).

    python benchmarks/round_time.py [--rounds 7] [--threads 2] [--layouts 2x1,1x2]

``--device cuda``: every contender trains on the GPU (fedzip's clients with
``weighted_fedavg(device=...)``, its server, codecs and wire on the CPU; the
floor's batches on the device before the timing; the naive loop moves each
batch), each round timed to ``torch.cuda.synchronize()``; in process only.

``--batch-clients K``: one more contender, fedzip with the mean and K
clients trained together (``LocalExecutor(batch_clients=K)``: one
``torch.func.vmap`` step over their stacked weights), with its ratios to the
floor, the naive loop and fedzip one client at a time; for GPUs (on a CPU it
is slower). ``--clients N``: N clients a round (the goals are for 10).

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
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedzip
from fedzip.data.federated import ClientExamples


class Clients:
    """``n`` clients (10) of 80-120 examples of 28x28 images (random pixels, random labels:
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
    """The naive FedAvg round (on the model's device: each batch is moved there)."""
    total = 0
    device = next(global_model.parameters()).device
    sums = [torch.zeros_like(p) for p in global_model.parameters()]
    for cid in clients.client_ids:
        ex = clients.client(cid)
        model = copy.deepcopy(global_model)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        for x, y in DataLoader(TensorDataset(ex.x.unsqueeze(1), ex.y), batch_size=20, shuffle=True):
            x, y = x.to(device), y.to(device)
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


class Floor:
    """The fastest hand-written FedAvg round (see the module doc): built once,
    batches ready, nothing but the training and an in-place weighted sum."""

    def __init__(self, clients: Clients, batch: int = 20, seed: int = 0, device: str = "cpu") -> None:
        import numpy as np

        torch.manual_seed(seed)
        self.model = fedzip.fedavg_cnn().to(device)
        self.params = list(self.model.parameters())
        self.glob = [p.detach().clone() for p in self.params]
        self.sums = [torch.zeros_like(p) for p in self.params]
        self.opt = torch.optim.SGD(self.params, lr=0.02)
        rng = np.random.default_rng(seed)
        self.batches = []
        for cid in clients.client_ids:
            ex = clients.client(cid)
            order = torch.from_numpy(rng.permutation(len(ex)))
            self.batches.append([(ex.x[order[i:i + batch]].to(device), ex.y[order[i:i + batch]].to(device))
                                 for i in range(0, len(ex), batch)])  # on the device before the timing

    def round(self) -> None:
        total = 0
        for s in self.sums:
            s.zero_()
        for batches in self.batches:
            with torch.no_grad():
                for p, g in zip(self.params, self.glob, strict=True):
                    p.copy_(g)
            n = 0
            for x, y in batches:
                self.opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(x), y).backward()
                self.opt.step()
                n += len(y)
            total += n
            with torch.no_grad():
                for s, p in zip(self.sums, self.params, strict=True):
                    s.add_(p, alpha=n)  # sum n_k w_k; the mean of the weights is the FedAvg step
        with torch.no_grad():
            for g, s in zip(self.glob, self.sums, strict=True):
                torch.div(s, total, out=g)


SPLIT = (  # (label, metric key)
    ("client data", "time/client_data_s"),
    ("client decode", "time/client_decode_s"),
    ("client training", "time/client_train_s"),
    ("client encode", "time/client_encode_s"),
    ("broadcast encode", "time/broadcast_encode_s"),
    ("server decode+fold", "time/server_fold_s"),
    ("server update", "time/server_update_s"),
    ("waiting on clients", "time/client_wait_s"),
)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of other processes so far (Linux ``/proc``; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK") if pids else 0.0


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: order
    statistics ``k`` and ``n + 1 - k``, with the largest ``k`` whose binomial
    coverage is at least ``level`` (the sign test's interval). Too few values
    for the level: their min and max."""
    from scipy.stats import binom

    x = sorted(values)
    n = len(x)
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * binom.cdf(k, n, 0.5) >= level:
        k += 1  # P(X_(k+1) <= median <= X_(n-k)) = 1 - 2 P(Bin(n, 1/2) <= k)
    return (x[k - 1], x[n - k]) if k else (x[0], x[-1])


def verdict(goal: float | None, lo: float, hi: float, n: int = 6) -> str:
    """The goal against the interval of ``n`` paired ratios (under 6 rounds
    even their min..max covers the median with less than 95%)."""
    if goal is None:
        return "no goal"
    if n < 6:
        return f"goal <= {goal:.2f}: unresolved (too few rounds for a 95% interval)"
    if hi <= goal:
        return f"goal <= {goal:.2f}: met"
    if lo > goal:
        return f"goal <= {goal:.2f}: MISSED"
    return f"goal <= {goal:.2f}: unresolved at this noise (more --rounds)"


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        w, _, t = part.partition("x")
        out.append((int(w), int(t)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layouts", default=None,
                    help="processes-backend contenders, WORKERSxTHREADS,... (default: CORESx1,1xCORES; "
                         "'' for none)")
    ap.add_argument("--task", choices=("images", "shakespeare"), default="images",
                    help="images: the seed workload (default); shakespeare: the char LSTM")
    ap.add_argument("--client-lr", type=float, default=1.0, help="client SGD lr (shakespeare only)")
    ap.add_argument("--clients", type=int, default=10, help="clients a round (images only; the goals are for 10)")
    ap.add_argument("--batch-clients", type=int, default=0, metavar="K",
                    help="also fedzip mean with K clients trained together (torch.func.vmap; "
                         "LocalExecutor(batch_clients=K)); images only")
    ap.add_argument("--device", default="cpu",
                    help="where every contender trains (cpu, cuda): fedzip's clients (weighted_fedavg(device=...)), "
                         "the floor and the naive loop; images only, in process only (--layouts defaults to none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        if args.task != "images":
            ap.error("--device: the images task only")
        try:
            fedzip.algorithms.base.resolve_device(args.device)
        except fedzip.ConfigError as e:  # no such device here: one line, not a traceback
            ap.error(f"--device: {e}")
        if args.layouts is None:
            args.layouts = ""
    if args.task == "shakespeare":
        shakespeare_main(args)
        return
    from fedzip.execution import ProcessExecutor, available_cores
    from fedzip.metrics import JsonlWriter, MultiWriter, TensorBoardWriter

    cores = available_cores()
    layouts = parse_layouts(args.layouts if args.layouts is not None else f"{cores}x1,1x{cores}")
    clients = Clients(args.clients)
    sgd = functools.partial(torch.optim.SGD, lr=0.02)
    server = functools.partial(torch.optim.SGD, lr=1.0)
    tmp = tempfile.TemporaryDirectory(prefix="fedzip-round-time-")
    contenders = {}
    splits: dict[str, list[dict[str, float]]] = {}
    executors = []
    fedzip_setups = [("fedzip mean", fedzip.mean(), None), ("fedzip compression", fedzip.compression_aggregator(), None)]
    for w, t in layouts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layout past the cores is measured, not refused
            ex = ProcessExecutor(num_workers=w, threads=t)
        executors.append(ex)
        fedzip_setups.append((f"fedzip mean, processes {w}x{t}", fedzip.mean(), ex))
    if args.batch_clients > 1:
        from fedzip.execution import LocalExecutor

        fedzip_setups.append((f"fedzip mean, {args.batch_clients} clients together", fedzip.mean(),
                              LocalExecutor(batch_clients=args.batch_clients)))
    for name, agg, ex in fedzip_setups:
        algo = fedzip.weighted_fedavg(fedzip.fedavg_cnn, sgd, server, agg, executor=ex,
                                      device=None if args.device == "cpu" else args.device)
        logdir = Path(tmp.name) / name.replace(" ", "_").replace(",", "")
        logdir.mkdir()
        writers = MultiWriter([JsonlWriter(logdir / "metrics.jsonl"), TensorBoardWriter(logdir)])
        holder = {"state": algo.init()}
        splits[name] = []

        def step(algo=algo, holder=holder, writers=writers, split=splits[name]):
            holder["state"], m = algo.next(holder["state"], clients, clients.client_ids)
            t0 = time.perf_counter()
            writers.write(m)  # as fedzip run does: metrics.jsonl and TensorBoard
            split.append({**{k: v for k, v in m.items() if k.startswith("time/")},
                          "writers": time.perf_counter() - t0})

        contenders[name] = step
    floor = Floor(clients, device=args.device)
    contenders["floor (fastest loop)"] = floor.round
    torch.manual_seed(0)
    plain_model = plain_cnn().to(args.device)
    contenders["naive PyTorch loop"] = lambda: plain_round(plain_model, clients)

    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    pids = {name: ex for (name, _, ex) in fedzip_setups if isinstance(ex, ProcessExecutor)}
    try:
        for r in range(args.rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: no contender always first
            for name in order:
                workers = pids[name].worker_pids() if name in pids else []
                c0 = time.process_time() + cpu_seconds(workers)
                t0 = time.perf_counter()
                contenders[name]()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()  # the loops' kernels are asynchronous: time them done
                if r > 0:  # round 0 is the warm-up (and starts the worker processes)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() + cpu_seconds(workers) - c0)
    finally:
        for ex in executors:
            ex.close()
    for split in splits.values():
        del split[0]  # the warm-up
    n_examples = sum(len(clients.client(c)) for c in clients.client_ids)
    print(f"seed workload: {args.clients} clients, {n_examples} examples, batch 20, 1 epoch, FedAvg CNN, on {args.device}; "
          f"{args.threads} torch threads in process, {cores} cores; median of {args.rounds} rounds after a "
          f"warm-up, interleaved")
    print(f"{'contender':34s} {'median s/round':>15s} {'min':>8s} {'max':>8s} {'CPU s/round':>12s}")
    for name, ts in times.items():
        print(f"{name:34s} {statistics.median(ts):15.3f} {min(ts):8.3f} {max(ts):8.3f} "
              f"{statistics.median(cpu[name]):12.3f}")
    print("(CPU s: this process's CPU time and, on the processes backend, its workers'; on shared cores "
          "it leaves out the time spent waiting for a core)")

    def ratio(a: str, b: str) -> tuple[float, float, float, tuple[float, float]]:
        paired = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return (statistics.median(times[a]) / statistics.median(times[b]), statistics.median(paired),
                statistics.median(cpu[a]) / statistics.median(cpu[b]), median_interval(paired))

    print()
    floor_name, naive_name = "floor (fastest loop)", "naive PyTorch loop"
    goals = [("fedzip mean", floor_name, 1.02), ("fedzip compression", floor_name, 1.08),
             ("fedzip mean", naive_name, 0.85), ("fedzip compression", naive_name, None)]
    goals += [(f"fedzip mean, processes {w}x{t}", ref, None) for w, t in layouts for ref in (floor_name,)]
    if args.batch_clients > 1:
        goals += [(f"fedzip mean, {args.batch_clients} clients together", ref, None)
                  for ref in (floor_name, naive_name, "fedzip mean")]
    for a, b, goal in goals:
        r_med, r_pair, r_cpu, (lo, hi) = ratio(a, b)
        print(f"ratio {a} / {b} = {r_med:.3f} (paired {r_pair:.3f}, 95% interval [{lo:.3f}, {hi:.3f}]; "
              f"CPU time {r_cpu:.3f}; {verdict(goal, lo, hi, len(times[a]))})")
    print("(the interval: the paired per-round ratios' median, distribution-free; a goal is met when the "
          "whole interval is under it, missed when the whole interval is over it)")

    print("\nwhere the time goes, median s/round (client figures summed over the clients):")
    cols = list(splits)
    short = {c: c.replace("fedzip ", "").replace("processes ", "proc ") for c in cols}
    print(f"{'':22s}" + "".join(f"{short[c]:>22s}" for c in cols))
    rows = [*SPLIT, ("writers (jsonl + TB)", "writers")]
    for label, key in rows:
        print(f"{label:22s}" + "".join(f"{statistics.median(s.get(key, 0.0) for s in splits[c]):22.4f}"
                                       for c in cols))
    own = {c: statistics.median(s["time/round_s"] - sum(s.get(k, 0.0) for _, k in SPLIT if k.startswith(
        ("time/broadcast", "time/server", "time/client_wait"))) for s in splits[c]) for c in cols}
    print(f"{'round bookkeeping':22s}" + "".join(f"{own[c]:22.4f}" for c in cols))
    print(f"{'round wall (next)':22s}" + "".join(
        f"{statistics.median(s['time/round_s'] for s in splits[c]):22.4f}" for c in cols))
    print(f"{'measured step':22s}" + "".join(f"{statistics.median(times[c]):22.4f}" for c in cols))
    print(f"(floor for reference: {statistics.median(times[floor_name]):.4f} s/round)")
    tmp.cleanup()


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
