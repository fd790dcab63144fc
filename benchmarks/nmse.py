"""Rate and distortion of every codec, against the bounds; and codec throughput.

For each codec and target rate ``b`` in {0.1, 0.5, 1, 2, 4, 8} bits per
coordinate (where the codec allows it), on three sources:

* a Gaussian vector (``d = 2^16``),
* a Student-t vector with 3 degrees of freedom (heavy tails),
* real client updates: the seed's FedAvg CNN (``--model small``: a small
  CNN, faster) trained a few local SGD steps on each of 10 writers of
  UNIPEN digits (``../shared/data/unipen/fed_unipen_digitsonly_tiny_train.h5``,
  read with h5py; skipped with a message when the file is absent), each
  tensor encoded on its own,

it prints

* ``bits``: the measured rate, ``8 * len(bytes) / d`` (all side information
  and padding included; for real updates summed over the tensors),
* ``NMSE``: ``||x_hat - x||^2 / ||x||^2``, averaged over 10 clients (10
  independent vectors for the synthetic sources),
* ``mean10``: the NMSE of the mean of the 10 clients' decoded updates,
  ``||mean x_hat - mean x||^2 / ||mean x||^2`` (what the server sees),
* the bounds at the measured rate: rate-distortion ``2^(-2b)`` (Gaussian
  source, any code) and unbiased ``1 / (4^b - 1)`` (the best an unbiased
  code can do for a Gaussian), and the row's ratio to each.

Then Kashin's representation against the rotation it refines (``--kashin``
runs only this part): randomized Hadamard rotation + ``b``-bit stochastic
min/max uniform quantization, against Kashin's representation at redundancy
2 (twice the coefficients) + ``b/2``-bit uniform quantization (at ``b = 1``:
a random half of the coefficients at 1 bit, Caldas et al.'s subsampling;
against the rotation with the same subsampling too),
i.e. at the same measured bits per coordinate, on the Gaussian and
Student-t vectors and on a Gaussian vector with one coordinate of
``sqrt(d)`` (half the energy in one spike); with TFF's settings (3
iterations, eta 0.9, delta 1) and with longer, lower levels (30 iterations,
eta 0.8, delta 8), and the ratio of each to the rotation's NMSE.

Then encode and decode throughput (M coordinates/s, best of several runs,
median in brackets) on a 2^20 tensor, with 1 and 2 torch threads (on a
shared machine two OpenMP threads can lose to one: every parallel op waits
for both), and a summary: the best unbiased codec per rate against the
unbiased bound, and where TFF's 8-bit min/max quantization stands.

    python benchmarks/nmse.py            # about a minute on 2 cores
    python benchmarks/nmse.py --quick    # d = 2^14, fewer rates and rounds
    python benchmarks/nmse.py --kashin   # only the Kashin rows (about 20 s)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import fedzip.codecs as C
from fedzip.codecs.kashin import Kashin, kashin_uniform
from fedzip.data.unipen import default_unipen_root
from fedzip.models import FedAvgCNN

UNIPEN = default_unipen_root() / "fed_unipen_digitsonly_tiny_train.h5"
RATES = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0)


# -- the contenders -----------------------------------------------------------


def _int(b: float) -> int | None:
    return int(b) if b >= 1 and float(b).is_integer() else None


def _topk_fraction(b: float) -> float:
    f = b / 40.0  # float32 values and about log2(d/k) + 1.5 bits of index each
    return b / (33.5 + math.log2(1.0 / f))


def _qsgd_levels(b: float) -> int | None:
    n = _int(b)
    return None if n is None or n < 2 else (1 << (n - 1)) - 1  # 2s + 1 symbols, just under 2^b


FAMILIES: dict[str, Callable[[float], C.Codec | None]] = {
    "tff-uniform (min/max)": lambda b: C.UniformQuantization(_int(b)) if _int(b) else None,
    "zstd(tff-uniform)": lambda b: C.zstd_uniform(int(b)) if b == 8 else None,
    "ans(tff-uniform)": lambda b: C.EntropyCoded(C.UniformQuantization(int(b))) if b in (4, 8) else None,
    "qsgd (bucket 512)": lambda b: C.QSGD(_qsgd_levels(b)) if _qsgd_levels(b) else None,
    "rotated uniform": lambda b: C.rotated_uniform(_int(b)) if _int(b) else None,
    "drive": lambda b: C.DRIVE() if b == 1 else None,
    "eden": lambda b: C.EDEN(_int(b) or b) if (b < 1 or _int(b)) else None,
    "rotated lloyd-max (biased)": lambda b: C.rotated_lloyd_max(_int(b)) if _int(b) else None,
    "eden + ans": lambda b: C.eden_ans(_int(b)) if _int(b) else None,
    "rotation + ecsq + ans": lambda b: C.ecsq(b),
    "rotation/1024 + ecsq + ans": lambda b: C.ecsq(b, block_size=1024),
    "top-k (float32 values)": lambda b: C.TopK(_topk_fraction(b)) if b <= 4 else None,
    "rand-k (float32 values)": lambda b: C.RandK(b / 32.0),
    "scaled sign": lambda b: C.ScaledSign() if b == 1 else None,
    "powersgd (rank 4b)": lambda b: C.PowerSGD(max(1, round(4 * b))) if b >= 0.5 else None,
}


# -- sources ------------------------------------------------------------------


def _as_matrix(v: torch.Tensor) -> torch.Tensor:
    """Synthetic vectors as a 256-row matrix: the same values for every codec,
    and a shape PowerSGD can factor."""
    return v.reshape(256, -1) if v.numel() % 256 == 0 else v


def gaussian(d: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": _as_matrix(torch.randn(d, generator=g))} for _ in range(n)]


def student_t(d: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    dist = torch.distributions.StudentT(3.0)
    return [{"x": _as_matrix(dist.sample((d,)))} for _ in range(n)]


def spiky(d: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Gaussian vectors with one coordinate of ``sqrt(d)``: half the energy in one spike."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(d, generator=g)
        v[int(torch.randint(0, d, (1,), generator=g))] = math.sqrt(d)
        out.append({"x": _as_matrix(v)})
    return out


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def unipen_updates(n: int, steps: int, seed: int, model_name: str = "fedavg") -> list[dict[str, torch.Tensor]] | None:
    if not UNIPEN.exists():
        print(f"real updates: skipped, {UNIPEN} is absent")
        return None
    import h5py

    torch.manual_seed(seed)
    model = FedAvgCNN(10) if model_name == "fedavg" else SmallCNN()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    with h5py.File(UNIPEN, "r") as f:
        ids = sorted(f["examples"].keys())[:n]
        # a few steps on the first writer first: updates from a model that has begun to learn
        for i, cid in enumerate([ids[0], *ids]):
            pixels = torch.from_numpy(np.asarray(f["examples"][cid]["pixels"], np.float32))
            labels = torch.from_numpy(np.asarray(f["examples"][cid]["label"], np.int64))
            model.load_state_dict(start)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            g = torch.Generator().manual_seed(seed + i)
            for _ in range(steps):
                idx = torch.randint(0, len(labels), (20,), generator=g)
                loss = nn.functional.cross_entropy(model(1.0 - pixels[idx, None]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if i == 0:
                start = {k: v.detach().clone() for k, v in model.state_dict().items()}
                continue
            out.append({k: (v.detach() - start[k]).clone() for k, v in model.state_dict().items()})
    sizes = {k: tuple(v.shape) for k, v in out[0].items()}
    print(f"real updates: {type(model).__name__}, {len(out)} UNIPEN writers, {steps} local steps each; "
          f"tensors {sizes}")
    return out


# -- measuring ----------------------------------------------------------------


def measure(codec: C.Codec, clients: list[dict[str, torch.Tensor]], seed: int) -> tuple[float, float, float]:
    """(bits per coordinate, mean NMSE over clients, NMSE of the mean)."""
    bits = coords = 0
    nmse = []
    sum_x: dict[str, torch.Tensor] = {}
    sum_hat: dict[str, torch.Tensor] = {}
    for i, update in enumerate(clients):
        err = ref = 0.0
        for name, x in update.items():
            shape = tuple(x.shape)
            data = codec.encode(x, torch.Generator().manual_seed(seed + 7919 * i))
            hat = codec.decode(data, shape).double()
            bits += 8 * len(data)
            coords += x.numel()
            err += float((hat - x.double()).square().sum())
            ref += float(x.double().square().sum())
            sum_x[name] = sum_x.get(name, 0) + x.double()
            sum_hat[name] = sum_hat.get(name, 0) + hat
        nmse.append(err / ref)
    num = sum(float((sum_hat[k] - sum_x[k]).square().sum()) for k in sum_x)
    den = sum(float(sum_x[k].square().sum()) for k in sum_x)
    return bits / coords, statistics.fmean(nmse), num / den


def rd_bound(b: float) -> float:
    return 2.0 ** (-2 * b)


def unbiased_bound(b: float) -> float:
    return 1.0 / (4.0**b - 1)


def table(title: str, clients: list[dict[str, torch.Tensor]], rates: tuple[float, ...], seed: int) -> list[dict]:
    print(f"\n== {title} ==")
    print(f"{'codec':30s} {'b':>5s} {'bits':>7s} {'NMSE':>10s} {'mean10':>10s} {'2^-2b':>10s} "
          f"{'1/(4^b-1)':>10s} {'xRD':>7s} {'xUnb':>7s}")
    rows = []
    for b in rates:
        for fam, make in FAMILIES.items():
            codec = make(b)
            if codec is None:
                continue
            bits, nmse, mean10 = measure(codec, clients, seed)
            rd, ub = rd_bound(bits), unbiased_bound(bits)
            row = dict(source=title, codec=fam, b=b, bits=bits, nmse=nmse, mean10=mean10,
                       rd=rd, ub=ub, x_rd=nmse / rd, x_ub=nmse / ub, unbiased=bool(codec.unbiased))
            rows.append(row)
            print(f"{fam:30s} {b:5g} {bits:7.3f} {nmse:10.4g} {mean10:10.4g} {rd:10.4g} {ub:10.4g} "
                  f"{nmse / rd:7.2f} {nmse / ub:7.2f}")
        print()
    return rows


# -- Kashin's representation against the rotation ------------------------------

KASHIN_SETTINGS = {
    "TFF: 3 it, eta .9, delta 1": dict(iterations=3, eta=0.9, delta=1.0),
    "30 it, eta .8, delta 8": dict(iterations=30, eta=0.8, delta=8.0),
}


def kashin_same_bits(b: int, **settings) -> C.Codec:
    """Kashin at redundancy 2 with ``b`` measured bits per coordinate: ``b/2``
    bits per coefficient, or at ``b = 1`` one bit for a random half of them."""
    if b == 1:
        return Kashin(C.RandK(0.5, inner=C.UniformQuantization(1)), redundancy=2.0, **settings)
    return kashin_uniform(b // 2, redundancy=2.0, **settings)


def kashin_table(sources: list[tuple[str, list[dict[str, torch.Tensor]]]], seed: int) -> list[dict]:
    """Rotation + b-bit uniform against Kashin + uniform at the same measured bits."""
    print("\n== Kashin's representation (redundancy 2) against the rotation, same measured bits ==")
    print("rotation: RandomRotation(UniformQuantization(b)); kashin: Kashin(UniformQuantization(b/2)),")
    print("at b = 1 Kashin(RandK(1/2, UniformQuantization(1))); ratio = NMSE / rotation's NMSE at that b")
    print(f"{'source':22s} {'b':>2s} {'codec':34s} {'bits':>7s} {'NMSE':>10s} {'ratio':>7s}")
    rows = []
    for title, clients in sources:
        for b in (1, 2, 4, 8):
            bits, base, _ = measure(C.rotated_uniform(b), clients, seed)
            print(f"{title:22s} {b:2d} {'rotation + ' + str(b) + '-bit uniform':34s} {bits:7.3f} {base:10.4g} {1:7.2f}")
            if b == 1:  # the same subsampling on the rotation's side
                sub = C.RandomRotation(C.RandK(0.5, inner=C.UniformQuantization(2)))
                sbits, snmse, _ = measure(sub, clients, seed)
                rows.append(dict(source=title, b=b, codec="rotation + rand-k 1/2 + 2-bit", bits=sbits, nmse=snmse,
                                 rot_bits=bits, rot_nmse=base, ratio=snmse / base))
                print(f"{'':22s} {'':2s} {'rotation + rand-k 1/2 + 2-bit':34s} {sbits:7.3f} {snmse:10.4g} "
                      f"{snmse / base:7.2f}")
            for name, settings in KASHIN_SETTINGS.items():
                kbits, nmse, _ = measure(kashin_same_bits(b, **settings), clients, seed)
                rows.append(dict(source=title, b=b, codec=name, bits=kbits, nmse=nmse, rot_bits=bits,
                                 rot_nmse=base, ratio=nmse / base))
                print(f"{'':22s} {'':2s} {'kashin (' + name + ')':34s} {kbits:7.3f} {nmse:10.4g} "
                      f"{nmse / base:7.2f}")
        print()
    for name in KASHIN_SETTINGS:
        ratios = {b: [r["ratio"] for r in rows if r["codec"] == name and r["b"] == b] for b in (1, 2, 4, 8)}
        print(f"kashin ({name}): NMSE / rotation's at the same bits, min-max over the sources: "
              + ", ".join(f"b={b} {min(v):.2f}-{max(v):.2f}" for b, v in ratios.items()))
    return rows


# -- throughput -----------------------------------------------------------------


def throughput(n: int, repeats: int, threads: list[int]) -> list[tuple[str, int, float, float, float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    contenders = {
        "rotation + 4-bit uniform + packing": C.rotated_uniform(4),
        "eden 4 bits (rotation + lloyd-max + packing)": C.EDEN(4),
        "drive (1 bit)": C.DRIVE(),
        "tff-uniform 8 bits": C.UniformQuantization(8),
        "qsgd s=7": C.QSGD(7),
        "rotation + ecsq 4 + ans": C.ecsq(4),
        "eden 4 + ans": C.eden_ans(4),
        "ans(tff-uniform 8)": C.EntropyCoded(C.UniformQuantization(8)),
        "top-k 1%": C.TopK(0.01),
        "rand-k 1%": C.RandK(0.01),
        "scaled sign": C.ScaledSign(),
        "powersgd rank 4 (1024x1024)": C.PowerSGD(4),
    }
    out = []
    before = torch.get_num_threads()
    for nt in threads:
        torch.set_num_threads(nt)
        print(f"\n== throughput: {n} coordinates, {nt} torch thread(s), load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs ==")
        print(f"{'codec':46s} {'encode M/s':>11s} {'decode M/s':>11s} {'(median enc/dec)':>18s} {'bits':>6s}")
        for name, codec in contenders.items():
            xin = x.view(1024, -1) if isinstance(codec, C.PowerSGD) else x
            shape = tuple(xin.shape)
            data = codec.encode(xin, g)
            codec.decode(data, shape)
            enc, dec = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                data = codec.encode(xin, g)
                enc.append(time.perf_counter() - t)
                t = time.perf_counter()
                codec.decode(data, shape)
                dec.append(time.perf_counter() - t)
            e, d = n / min(enc) / 1e6, n / min(dec) / 1e6
            em, dm = n / statistics.median(enc) / 1e6, n / statistics.median(dec) / 1e6
            out.append((name, nt, e, d, 8 * len(data) / n))
            print(f"{name:46s} {e:11.1f} {d:11.1f} {f'({em:.0f} / {dm:.0f})':>18s} {8 * len(data) / n:6.3f}")
    torch.set_num_threads(before)
    return out


# -- summary ------------------------------------------------------------------


def summary(rows: list[dict], speed: list[tuple[str, int, float, float, float]]) -> None:
    print("\n== summary ==")
    for source in dict.fromkeys(r["source"] for r in rows):
        print(f"\n{source}: best ratio to the unbiased bound 1/(4^b-1) per rate (unbiased codecs)")
        for b in dict.fromkeys(r["b"] for r in rows if r["source"] == source):
            cands = [r for r in rows if r["source"] == source and r["b"] == b and r["unbiased"]]
            if not cands:
                continue
            best = min(cands, key=lambda r: r["x_ub"])
            mark = "  <= 1.5x" if best["x_ub"] <= 1.5 else ""
            print(f"  b={b:<4g} {best['codec']:28s} {best['bits']:6.3f} bits  NMSE {best['nmse']:.4g}  "
                  f"{best['x_ub']:.2f}x unbiased bound, {best['x_rd']:.2f}x RD bound{mark}")
        if source.startswith("real"):
            print("  (the bounds are those of a Gaussian source of the same variance; real updates have lower\n"
                  "   entropy - exact zeros of dead units, mixed scales - so a codec that keeps their structure\n"
                  "   can go below them, while a rotation makes any input Gaussian-like, the worst case)")
        tff = [r for r in rows if r["source"] == source and r["codec"].startswith("tff") and r["b"] == 8]
        for r in tff:
            print(f"  TFF 8-bit min/max: {r['bits']:.3f} bits, NMSE {r['nmse']:.4g} = {r['x_ub']:.1f}x the "
                  f"unbiased bound, {r['x_rd']:.1f}x the RD bound")
    if speed:
        print("\nthroughput goal, rotation + 4-bit quantization + packing >= 50 M coords/s each way:")
        for name, nt, e, d, _ in speed:
            if name.startswith(("rotation + 4-bit", "eden 4 bits")):
                ok = "meets" if min(e, d) >= 50 else "misses"
                print(f"  {name} with {nt} thread(s): {e:.0f} / {d:.0f} M/s, {ok} it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d = 2^14, rates 1/2/4/8, fewer repeats")
    p.add_argument("--threads", default="1,2", help="torch thread counts for the throughput runs (default 1,2)")
    p.add_argument("--d", type=int, default=None, help="synthetic vector length (default 2^16)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="local SGD steps per writer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--model", choices=("fedavg", "small"), default="fedavg",
                   help="real updates from the seed's FedAvg CNN (default) or a small CNN (faster)")
    p.add_argument("--kashin", action="store_true", help="only Kashin's representation against the rotation")
    args = p.parse_args(argv)
    threads = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(threads[0])
    d = args.d or (1 << 14 if args.quick else 1 << 16)
    rates = (1.0, 2.0, 4.0, 8.0) if args.quick else RATES
    t0 = time.perf_counter()
    kashin_sources = [(f"Gaussian, d = {d}", gaussian(d, args.clients, args.seed)),
                      ("Student-t (3 dof)", student_t(d, args.clients, args.seed)),
                      ("one spike (sqrt d)", spiky(d, args.clients, args.seed))]
    if args.kashin:
        kashin_table(kashin_sources, args.seed)
        print(f"\n(total {time.perf_counter() - t0:.0f} s)")
        return 0
    rows = table(f"Gaussian, d = {d}", gaussian(d, args.clients, args.seed), rates, args.seed)
    rows += table(f"Student-t (3 dof), d = {d}", student_t(d, args.clients, args.seed), rates, args.seed)
    real = unipen_updates(args.clients, args.steps, args.seed, args.model)
    if real is not None:
        model_label = "FedAvg CNN" if args.model == "fedavg" else "small CNN"
        rows += table(f"real updates ({model_label}, UNIPEN digits)", real, rates, args.seed)
    kashin_table(kashin_sources, args.seed)
    speed = [] if args.no_throughput else throughput(1 << 20, 3 if args.quick else 9, threads)
    summary(rows, speed)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
