"""Federated dropout and structured updates against float32 and sketches, at equal clients.

Caldas, Konečný, McMahan, Talwalkar (2018): federated dropout (each client
trains a sub-model keeping a fraction of the fc units, conv filters, LSTM
hidden units) with lossy downlink compression (Kashin's representation or a
randomized Hadamard rotation, then uniform quantization); their headline:
14x less downlink, 28x less uplink and 1.7x less client compute at no
accuracy loss. Konečný, McMahan, Yu, Richtárik, Suresh, Bacon (2016):
structured updates trained in a subspace (low rank ``B·A``, random mask)
against sketched updates of the same size (random subsampling, rotated
1-bit quantization).

Two tasks, every setting on the same clients in the same order (sampling is
keyed by seed and round), settings interleaved round by round on one torch
thread so their seconds are measured under the same load:

* UNIPEN (``load_dataset("unipen")``: 62 classes, writers as clients; read
  from ../shared/data/unipen, skipped with a message when absent), the FedAvg
  CNN, batch 20, client SGD lr 0.1 (TFF's EMNIST baseline; short runs);
* Shakespeare (``load_dataset("shakespeare")``, task ``shakespeare``: the
  character LSTM), batch 4, client SGD lr 1.0 (TFF's baseline).

Per setting: accuracy on a fixed sample of test clients (mean of the last
two evaluations), cumulative downlink and uplink bits (counted from the
bytes on the wire), client compute per round — training seconds summed over
the clients (measured) and multiply-adds (``step_macs``: one training step
of the module the client really trains, on a full batch, counted by torch's
flop counter, times the batches trained) — and ratios against float32. The
goal (Caldas et al.): at least 14x less downlink, 28x less uplink and 1.5x
less client compute within 1 point of float32's accuracy. A PNG of
accuracy against total (down + up) bits and ``summary.json`` go to ``--out``.

    python benchmarks/readings.py [--datasets unipen,shakespeare] [--rounds 60,30]
        [--clients 10] [--max-batches 10,10] [--eval-every 10] [--eval-clients 100]
        [--settings float32,fd0.75,...] [--out runs/readings]
    python benchmarks/readings.py --estimate    # 2 rounds of each: seconds per round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fedzip.algorithms.dropout import step_macs
from fedzip.config import RunConfig
from fedzip.data import load_dataset
from fedzip.errors import DataError
from fedzip.metrics import format_bits
from fedzip.run import build_algorithm
from fedzip.seeding import sample_clients

F = 1 / 32  # the structured and sketched updates' size: 1/32 of each weight (uplink ~32x)
SKETCH_THRESHOLD = 1024  # sketches leave tensors this small whole, as the structures leave biases

# downlink codecs (Caldas et al.: a basis transform, then uniform quantization) on every tensor over
# 1,000 entries; blocks of 2,048 values, which cut the sub-models' tensors with little padding
KASHIN2 = {"type": "kashin", "bits": 2, "block_size": 4096, "threshold": 1000}  # redundancy 2: 4 bits/value
HADAMARD4 = {"type": "rotated_uniform", "bits": 4, "block_size": 2048, "threshold": 1000}
HADAMARD3 = {**HADAMARD4, "bits": 3}


def _eden(bits: float) -> dict[str, Any]:
    return {"type": "mean", "codec": {"type": "eden", "bits": bits, "block_size": 2048}, "threshold": 0}


SETTINGS: dict[str, dict[str, Any]] = {
    "float32": {},
    "fd0.75": {"algorithm": "fed_dropout:keep=0.75"},
    "fd0.5": {"algorithm": "fed_dropout:keep=0.5"},
    "fd0.75+kashin2": {"algorithm": "fed_dropout:keep=0.75", "broadcast": KASHIN2},
    "fd0.75+hadamard4": {"algorithm": "fed_dropout:keep=0.75", "broadcast": HADAMARD4},
    # Konečný et al.: structured (trained in the subspace) ...
    "lowrank1/32": {"algorithm": f"lowrank:fraction={F}"},
    "randmask1/32": {"algorithm": f"randmask:fraction={F},per_coordinate=true"},
    # ... against sketches of the same size
    "randk1/32": {"aggregator": {"type": "mean", "codec": {"type": "randk", "fraction": F},
                                 "threshold": SKETCH_THRESHOLD}},
    "rotq1bit": {"aggregator": {"type": "mean", "codec": {"type": "rotated_uniform", "bits": 1},
                                "threshold": SKETCH_THRESHOLD}},
    # combinations with the existing codecs: dropout + a quantized downlink + EDEN on the uplink
    "fd0.75+h3+eden1": {"algorithm": "fed_dropout:keep=0.75", "broadcast": HADAMARD3,
                         "aggregator": _eden(1)},
    "fd0.7+h4+eden2": {"algorithm": "fed_dropout:keep=0.7", "broadcast": HADAMARD4, "aggregator": _eden(2)},
}
REFERENCE = "float32"
GOAL = {"down": 14.0, "up": 28.0, "compute": 1.5, "points": 1.0}
EVAL_SAMPLE_SEED = 20240601

TASKS = {
    "unipen": {"dataset": "unipen", "task": "auto", "batch_size": 20, "client_lr": 0.1},
    "shakespeare": {"dataset": "shakespeare", "task": "shakespeare", "batch_size": 4, "client_lr": 1.0},
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def fixed_test_sample(test: Any, k: int) -> Any:
    """``k`` test clients drawn once, the same for every setting (all for k = 0)."""
    ids = list(test.client_ids)
    if k and k < len(ids):
        idx = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(len(ids), size=k, replace=False))
        ids = [ids[int(i)] for i in idx]
    return SimpleNamespace(client_ids=ids, client=test.client)


def client_module(algo: Any, state: Any, client_id: str, round_num: int) -> torch.nn.Module:
    """The module a client of ``algo`` trains in ``round_num`` (what its compute is)."""
    space = algo.work.space
    base = algo.work.task.model_fn()
    with torch.no_grad():
        for k, p in base.named_parameters():
            p.copy_(state.params[k])
    received = dict(state.params)
    if space.personal_model:
        received = space.client_model(state.params, client_id, round_num, algo.seed)
    ctx = SimpleNamespace(client_id=client_id, round=round_num, model=base, received=received)
    module, _ = space.prepare(base, received, ctx)
    return module


def macs_per_step(algo: Any, state: Any, train: Any, batch_size: int) -> int:
    """Multiply-adds of one training step on a full batch of the first client with one."""
    for cid in train.client_ids:
        ex = train.client(cid)
        if len(ex) >= batch_size:
            module = client_module(algo, state, cid, 1)
            module.train()
            return step_macs(module, ex.x[:batch_size], ex.y[:batch_size], algo.task.loss_fn)
    raise DataError("no client holds a full batch")


def run_task(name: str, rounds: int, args: argparse.Namespace, names: list[str]) -> dict[str, Any] | None:
    spec = TASKS[name]
    try:
        train, test, info = load_dataset(spec["dataset"])
    except DataError as e:
        print(f"[{name}] skipped: {e}", flush=True)
        return None
    cap = args.max_batches[list(TASKS).index(name)] or None
    test_eval = fixed_test_sample(test, args.eval_clients)
    base_cfg = RunConfig(dataset=spec["dataset"], task=spec["task"], rounds=rounds, clients_per_round=args.clients,
                         batch_size=spec["batch_size"], max_batches=cap, client_lr=spec["client_lr"],
                         seed=args.seed)
    print(f"[{name}] {info.description}\n[{name}] {rounds} rounds of {args.clients} clients, batch "
          f"{spec['batch_size']}, at most {cap or 'all'} batches a client, client SGD lr {spec['client_lr']:g}, "
          f"server SGD lr 1; evaluation on {len(test_eval.client_ids)} fixed test clients every "
          f"{args.eval_every} rounds and after the last; settings interleaved round by round", flush=True)
    runs = {}
    for s in names:
        cfg = base_cfg.replace(name=s, **SETTINGS[s])
        algo = build_algorithm(cfg, info)
        state = algo.init()
        runs[s] = {"algo": algo, "state": state, "history": [], "evals": [],
                   "macs_step": macs_per_step(algo, state, train, spec["batch_size"]),
                   "down": 0, "up": 0}
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        ids = sample_clients(train.client_ids, args.clients, r, args.seed)
        for s in names:
            job = runs[s]
            job["state"], m = job["algo"].next(job["state"], train, ids)
            job["down"] += m["broadcasted_bits"]
            job["up"] += m["aggregated_bits"]
            m["client_macs"] = job["macs_step"] * m["train/num_batches"]
            job["history"].append(m)
            if r % args.eval_every == 0 or r == rounds:
                ev = job["algo"].evaluate(job["state"].params, test, test_eval.client_ids)
                job["evals"].append((r, job["down"] + job["up"], job["down"], job["up"], ev["accuracy"]))
        if r == 1 or r % args.eval_every == 0 or r == rounds:
            accs = "  ".join(f"{s} {runs[s]['evals'][-1][4]:.3f}" for s in names if runs[s]["evals"]
                             and runs[s]["evals"][-1][0] == r)
            print(f"[{name}] round {r:4d}  {time.perf_counter() - t0:7.0f} s  {accs}", flush=True)
    wall = time.perf_counter() - t0
    examples = [[m["train/num_examples"] for m in runs[s]["history"]] for s in names]
    same = all(e == examples[0] for e in examples)
    rows = []
    for s in names:
        h = runs[s]["history"]
        last = [e[4] for e in runs[s]["evals"][-2:]]
        rows.append({
            "setting": s, "acc": sum(last) / len(last), "final": runs[s]["evals"][-1][4],
            "down": runs[s]["down"], "up": runs[s]["up"],
            "train_s": statistics.median(m["time/client_train_s"] for m in h),
            "client_s": statistics.median(m["time/client_train_s"] + m["time/client_data_s"]
                                          + m["time/client_encode_s"] for m in h),
            "macs": statistics.mean(m["client_macs"] for m in h),
            "curve": runs[s]["evals"],
        })
    ref = next((r for r in rows if r["setting"] == REFERENCE), None)
    for row in rows:
        if ref is None:
            continue
        row["x_down"] = ref["down"] / row["down"]
        row["x_up"] = ref["up"] / row["up"]
        row["x_time"] = ref["train_s"] / row["train_s"]
        row["x_macs"] = ref["macs"] / row["macs"]
        row["d_points"] = 100 * (row["acc"] - ref["acc"])
    print(f"\n[{name}] clients: {'the same' if same else 'NOT the same'} in every setting (examples per round "
          f"checked); {wall / 60:.1f} min for {len(names)} settings x {rounds} rounds\n")
    table(name, rows)
    return {"task": name, "rounds": rounds, "clients": args.clients, "max_batches": cap,
            "eval_clients": len(test_eval.client_ids), "wall_s": wall, "same_clients": same, "rows": rows}


def table(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"{'setting':18s} {'acc':>6s} {'d pt':>6s} {'downlink':>11s} {'x':>6s} {'uplink':>11s} {'x':>6s} "
          f"{'train s/rd':>10s} {'x':>5s} {'GMAC/rd':>8s} {'x':>5s}  goal")
    for r in rows:
        has = "x_down" in r
        ok = has and (r["x_down"] >= GOAL["down"] and r["x_up"] >= GOAL["up"] and r["x_macs"] >= GOAL["compute"]
                      and r["d_points"] >= -GOAL["points"])
        misses = [] if not has else [k for k, bad in (
            ("down", r["x_down"] < GOAL["down"]), ("up", r["x_up"] < GOAL["up"]),
            ("compute", r["x_macs"] < GOAL["compute"]), ("acc", r["d_points"] < -GOAL["points"])) if bad]
        verdict = "-" if r["setting"] == REFERENCE else ("met" if ok else "misses " + ",".join(misses))
        print(f"{r['setting']:18s} {r['acc']:6.3f} {r.get('d_points', 0):+6.1f} {format_bits(r['down']):>11s} "
              f"{r.get('x_down', 1):6.1f} {format_bits(r['up']):>11s} {r.get('x_up', 1):6.1f} "
              f"{r['train_s']:10.2f} {r.get('x_time', 1):5.2f} {r['macs'] / 1e9:8.1f} {r.get('x_macs', 1):5.2f}  "
              f"{verdict}")
    print(f"(acc: mean of the last two evaluations; x: float32's figure over the setting's; goal: "
          f">= {GOAL['down']:g}x down, >= {GOAL['up']:g}x up, >= {GOAL['compute']:g}x fewer multiply-adds, "
          f"within {GOAL['points']:g} point of float32)\n", flush=True)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, res in zip(axes[0], results, strict=True):
        for i, row in enumerate(res["rows"]):
            bits = [c[1] for c in row["curve"]]
            acc = [c[4] for c in row["curve"]]
            ax.plot(bits, acc, marker=".", color=colors[i % len(colors)], label=row["setting"],
                    linewidth=2.5 if row["setting"] == REFERENCE else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("total bits (downlink + uplink, cumulative)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{res['task']}: {res['rounds']} rounds of {res['clients']} clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="unipen,shakespeare")
    ap.add_argument("--rounds", type=_ints, default=[60, 30], help="rounds per data set (in --datasets order)")
    ap.add_argument("--clients", type=int, default=10, help="clients per round")
    ap.add_argument("--max-batches", type=_ints, default=[10, 10],
                    help="batch cap per client per round for unipen,shakespeare (0: none)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-clients", type=int, default=100, help="fixed test clients (0: all)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--estimate", action="store_true", help="2 rounds of every setting, then stop")
    ap.add_argument("--out", default="runs/readings")
    args = ap.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        ap.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    datasets = [d for d in args.datasets.split(",") if d]
    if any(d not in TASKS for d in datasets):
        ap.error(f"--datasets: choose from {list(TASKS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = []
    for i, d in enumerate(datasets):
        rounds = 2 if args.estimate else args.rounds[min(i, len(args.rounds) - 1)]
        if args.estimate:
            args.eval_every = 1
        res = run_task(d, rounds, args, names)
        if res is not None:
            results.append(res)
    if not results:
        return 1
    out.mkdir(parents=True, exist_ok=True)
    stem = "estimate" if args.estimate else "readings"
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    plot(results, out / f"{stem}.png")
    print(f"plot: {out / (stem + '.png')}; summary: {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
