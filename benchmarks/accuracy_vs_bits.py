"""Accuracy against bits: FedAvg on the UNIPEN digits with and without compression.

Every setting trains the seed's FedAvg CNN on the UNIPEN digits, split
naturally by writer (284 writers, from ``../shared/data/unipen``), with the
same seed, so every run samples the same clients in the same order and only
the compression differs. It prints, per setting, the test accuracy at the
end, the mean of the last three evaluations (one test-set evaluation is noisy
to about +-0.3 points: 3,192 test examples), the cumulative uplink
(aggregated) and downlink (broadcasted) bits counted from the bytes on the
wire, and the uplink compression ratio against float32; it writes a plot of
accuracy against cumulative uplink bits, and ends with the goal: a codec
within 0.5 points of the uncompressed accuracy at 32x fewer uplink bits or
more.

Settings: ``float32`` (no compression), TFF's ``compression_aggregator()``
(8-bit min/max quantization of the tensors above 20,000 elements), and
codecs from :func:`fedzip.codecs.registry` applied to every tensor
(``threshold=0``: the small tensors too, or the 6,538 float32 biases alone
would hold the ratio under 32x at 1 bit): EDEN at 8, 4, 2, 1 and 0.5 bits,
rotation + entropy-coded scalar quantization (ECSQ) at about 1 bit, top-k
and sign with error feedback, PowerSGD, and one run with a compressed
downlink as well. The rotation works in blocks of 2^16 coordinates
(``block_size=65536``), so padding to a power of two costs at most one block
per tensor instead of up to doubling it.

Training: 10 clients a round, batch 20, one local epoch, client SGD, server
SGD lr 1.0 (the seed's settings), with client lr 0.05 rather than 0.02 so the
runs converge within the rounds a benchmark can afford.

    python benchmarks/accuracy_vs_bits.py [--rounds 300] [--eval-every 20]
                                          [--only float32,eden1] [--out runs/accuracy_vs_bits]
                                          [--replot]
    python benchmarks/accuracy_vs_bits.py --quick     # 30 rounds, a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedzip.config import RunConfig
from fedzip.data import load_dataset
from fedzip.data.unipen import default_unipen_root
from fedzip.metrics import format_bits
from fedzip.run import run

BLOCK = 65536
# (label, uplink aggregator spec, downlink broadcast spec)
SETTINGS: list[tuple[str, str, str]] = [
    ("float32", "mean", "float32"),
    ("tff8", "compression", "float32"),
    ("eden8", f"eden:bits=8,block_size={BLOCK},threshold=0", "float32"),
    ("eden4", f"eden:bits=4,block_size={BLOCK},threshold=0", "float32"),
    ("eden2", f"eden:bits=2,block_size={BLOCK},threshold=0", "float32"),
    ("eden1", f"eden:bits=1,block_size={BLOCK},threshold=0", "float32"),
    ("ecsq1", f"ecsq:bits=1,block_size={BLOCK},threshold=0", "float32"),
    ("ecsq0.75", f"ecsq:bits=0.75,block_size={BLOCK},threshold=0", "float32"),
    ("eden0.75", f"eden:bits=0.75,block_size={BLOCK},threshold=0", "float32"),
    ("eden0.5", f"eden:bits=0.5,block_size={BLOCK},threshold=0", "float32"),
    ("sign_ef", "sign_ef:threshold=0", "float32"),
    ("topk_ef1%", "topk_ef:fraction=0.01,threshold=0", "float32"),
    ("powersgd_ef2", "powersgd_ef:rank=2,threshold=0", "float32"),
    ("eden1+down8", f"eden:bits=1,block_size={BLOCK},threshold=0",
     f"rotated_uniform:bits=8,block_size={BLOCK},threshold=0"),
]
GOAL_POINTS, GOAL_RATIO = 0.5, 32.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--client-lr", type=float, default=0.05)
    ap.add_argument("--only", default="", help="comma-separated labels of the settings to run")
    ap.add_argument("--out", default="runs/accuracy_vs_bits", help="metrics, TensorBoard and the plot")
    ap.add_argument("--quick", action="store_true", help="30 rounds, evaluation every 10")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "summary.json").read_text()), Path(args.out) / "accuracy_vs_bits.png")
        return 0
    if args.quick:
        args.rounds, args.eval_every = 30, 10
    if not (default_unipen_root() / "unipen_femnist_full.npz").exists():
        print(f"skipped: the UNIPEN data is not at {default_unipen_root()} (see ../shared/data/unipen)")
        return 0
    wanted = [s for s in SETTINGS if not args.only or s[0] in args.only.split(",")]
    if not wanted:
        ap.error(f"--only matches no setting; labels: {[s[0] for s in SETTINGS]}")

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = load_dataset("unipen-digits")
    print(f"data: {data[2].description}")
    print(f"{args.rounds} rounds of 10 clients, batch 20, 1 epoch, client SGD lr {args.client_lr}, "
          f"server SGD lr 1.0; {torch.get_num_threads()} threads\n")
    out = Path(args.out)
    rows = []
    for label, aggregator, broadcast in wanted:
        cfg = RunConfig(dataset="unipen-digits", aggregator=aggregator, broadcast=broadcast,
                        rounds=args.rounds, eval_every=args.eval_every, client_lr=args.client_lr,
                        name=label)
        t0 = time.perf_counter()
        res = run(cfg, logdir=out / label, data=data, console=False)
        evals = [(m["round"], m["eval/accuracy"]) for m in res.history if "eval/accuracy" in m]
        last = res.history[-1]
        rows.append({
            "label": label, "aggregator": aggregator, "broadcast": broadcast,
            "final": evals[-1][1], "last3": sum(a for _, a in evals[-3:]) / len(evals[-3:]),
            "up": last["aggregated_bits/cumulative"], "down": last["broadcasted_bits/cumulative"],
            "curve": [(m["aggregated_bits/cumulative"], m["eval/accuracy"])
                      for m in res.history if "eval/accuracy" in m],
            "seconds": time.perf_counter() - t0,
        })
        r = rows[-1]
        print(f"  {label:13s} acc {r['final']:.4f} (last 3: {r['last3']:.4f})  up {format_bits(r['up'])}"
              f"  down {format_bits(r['down'])}  {r['seconds']:.0f} s", flush=True)

    base = next((r for r in rows if r["label"] == "float32"), None)
    print(f"\n{'setting':13s} {'final acc':>9s} {'last 3':>7s} {'uplink':>12s} {'x fewer':>8s}"
          f" {'downlink':>12s} {'x fewer':>8s}  {'d(last 3)':>9s}")
    for r in rows:
        up_ratio = base["up"] / r["up"] if base else float("nan")
        down_ratio = base["down"] / r["down"] if base else float("nan")
        delta = 100 * (r["last3"] - base["last3"]) if base else float("nan")
        print(f"{r['label']:13s} {r['final']:9.4f} {r['last3']:7.4f} {format_bits(r['up']):>12s} "
              f"{up_ratio:8.1f} {format_bits(r['down']):>12s} {down_ratio:8.1f}  {delta:+8.2f} pt")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "accuracy_vs_bits.png")
    print(f"\nplot: {out / 'accuracy_vs_bits.png'}")
    if base is None:
        return 0
    ok = [r for r in rows if base["up"] / r["up"] >= GOAL_RATIO
          and 100 * (base["last3"] - r["last3"]) <= GOAL_POINTS]
    best = max(ok, key=lambda r: base["up"] / r["up"]) if ok else None
    if best:
        print(f"goal (within {GOAL_POINTS} pt of float32 at >= {GOAL_RATIO:.0f}x fewer uplink bits): met by "
              f"{', '.join(r['label'] for r in ok)}; best ratio {base['up'] / best['up']:.1f}x ({best['label']}, "
              f"{100 * (best['last3'] - base['last3']):+.2f} pt)")
    else:
        print(f"goal (within {GOAL_POINTS} pt of float32 at >= {GOAL_RATIO:.0f}x fewer uplink bits): not met")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        bits, acc = zip(*r["curve"], strict=True)
        ax.plot(bits, acc, marker=".", color=colors[i % len(colors)], linestyle="-" if i % 2 == 0 else "--",
                label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bits")
    ax.set_ylabel("test accuracy")
    ax.set_title("FedAvg on UNIPEN digits: accuracy against uplink bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
