"""Write your own compressor: rand-k in about twenty lines, checked against the contract.

    python examples/custom_compressor.py            # contract, NMSE, and 60 rounds of FedAvg
    python examples/custom_compressor.py --rounds 0 # contract and NMSE only

A codec subclasses :class:`fedzip.codecs.Codec` and defines ``encode`` (a
tensor and a seeded generator in, the bytes on the wire out) and ``decode``
(untrusted bytes and a shape in, a float32 tensor out). Here: keep ``k``
random coordinates, scaled by ``d/k`` so the mean is right; the indices are
not sent, only the 4-byte seed that regenerates them.
"""

import argparse
import functools

import numpy as np
import torch

import fedzip
from fedzip.codecs import EDEN, Codec
from fedzip.codecs.base import check_finite, draw_seed, numel_of
from fedzip.data.unipen import default_unipen_root
from fedzip.errors import PayloadError
from fedzip.metrics import format_bits
from fedzip.testing import check_compressor


class MyRandK(Codec):
    tag = "my-randk"
    unbiased = True

    def __init__(self, fraction: float = 0.1):
        self.fraction = fraction

    def _indices(self, seed: int, d: int) -> torch.Tensor:
        k = max(1, round(self.fraction * d)) if d else 0
        return torch.randperm(d, generator=torch.Generator().manual_seed(seed))[:k]

    def encode(self, x, rng):
        check_finite(x)  # NaN/Inf -> NonFiniteUpdateError
        v, seed = x.detach().cpu().float().reshape(-1), draw_seed(rng)
        idx = self._indices(seed, v.numel())
        values = v[idx] * (v.numel() / max(len(idx), 1))
        return seed.to_bytes(4, "little") + values.numpy().astype("<f4").tobytes()

    def decode(self, data, shape):
        d = numel_of(shape)
        if len(data) < 4:
            raise PayloadError(f"my-randk: {len(data)} bytes, the seed alone takes 4")
        idx = self._indices(int.from_bytes(data[:4], "little"), d)
        if len(data) != 4 + 4 * len(idx):
            raise PayloadError(f"my-randk: expected {4 + 4 * len(idx)} bytes for {d} values, got {len(data)}")
        values = np.frombuffer(data[4:], "<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise PayloadError("my-randk: non-finite values")
        out = torch.zeros(d)
        out[idx] = torch.from_numpy(values)
        return out.reshape(shape)


def nmse_and_bits(codec: Codec, x: torch.Tensor, trials: int = 5) -> tuple[float, float]:
    errs, bits = [], []
    for t in range(trials):
        data = codec.encode(x, torch.Generator().manual_seed(t))
        err = codec.decode(data, tuple(x.shape)) - x
        errs.append(float(err.square().sum() / x.square().sum()))
        bits.append(8 * len(data) / x.numel())
    return sum(errs) / trials, sum(bits) / trials


def real_update() -> torch.Tensor | None:
    """A real client update, if the UNIPEN digits are there: a few SGD steps of a small MLP."""
    path = default_unipen_root() / "fed_unipen_digitsonly_tiny_train.h5"
    if not path.exists():
        return None
    import h5py

    with h5py.File(path, "r") as f:
        client = f["examples"][sorted(f["examples"])[0]]
        x = torch.from_numpy(np.asarray(client["pixels"], np.float32)).reshape(-1, 784)
        y = torch.from_numpy(np.asarray(client["label"], np.int64))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(1.0 - x), y).backward()
        opt.step()
    return model[0].weight.detach() - before


def train(codec: Codec | None, rounds: int) -> tuple[float, int]:
    """FedAvg on the UNIPEN digits (by writer) with ``codec`` on every uplink tensor:
    (test accuracy, total uplink bits)."""
    from fedzip.data import load_dataset

    train_data, test_data, info = load_dataset("unipen-digits")
    fedavg = fedzip.weighted_fedavg(
        model_fn=functools.partial(fedzip.FedAvgCNN, info.num_classes),
        client_optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        server_optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        aggregator=fedzip.mean(codec),  # a codec for every tensor; None: float32
        preprocess=fedzip.Preprocess(batch_size=20, epochs=1, shuffle_buffer=418),
    )
    state, uplink = fedavg.init(), 0
    for round_num in range(1, rounds + 1):
        clients = fedzip.sample_clients(train_data.client_ids, 10, round_num, seed=0)
        state, metrics = fedavg.next(state, train_data, clients)
        uplink += metrics["aggregated_bits"]
    return fedavg.evaluate(state.params, test_data)["accuracy"], uplink


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60, help="FedAvg rounds per codec (0: skip training)")
    args = ap.parse_args()
    print(check_compressor(MyRandK(0.1)))
    gauss = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    for name, x in [("Gaussian d=65536", gauss), ("real update (784x128 layer)", real_update())]:
        if x is None:
            print(f"{name}: skipped (UNIPEN data absent)")
            continue
        for codec in (MyRandK(0.1), EDEN(3)):  # about 3.2 and 3 bits per value
            nmse, bits = nmse_and_bits(codec, x)
            print(f"{name:28s} {type(codec).__name__:8s} {bits:6.3f} bits/value  NMSE {nmse:.4g}")
    if args.rounds and (default_unipen_root() / "unipen_femnist_full.npz").exists():
        print(f"\nFedAvg, UNIPEN digits by writer, {args.rounds} rounds of 10 clients:")
        for label, codec in [("float32", None), ("MyRandK(0.1)", MyRandK(0.1)), ("EDEN(1)", EDEN(1))]:
            acc, bits = train(codec, args.rounds)
            print(f"  {label:13s} test accuracy {acc:.4f}  uplink {format_bits(bits)}")
