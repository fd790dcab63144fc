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

Two tasks, each a sweep (:mod:`fedzip.sweep`) of its own: every setting is a
variant, crossed with the seeds; runs of one seed sample the same clients in
the same order (sampling is keyed by seed and round) and start from the same
model, so within a seed only the setting differs:

* UNIPEN (``dataset="unipen"``: 62 classes, writers as clients; read from
  ../shared/data/unipen, skipped with a message when absent), the FedAvg
  CNN, batch 20, client SGD lr 0.1 (TFF's EMNIST baseline; short runs);
* Shakespeare (``dataset="shakespeare"``, task ``shakespeare``: the
  character LSTM), batch 4, client SGD lr 1.0 (TFF's baseline).

Both: ``--clients`` clients a round (10), at most ``--max-batches`` batches
a client a round (10, 10), server SGD lr 1, evaluation every
``--eval-every`` rounds (10) and after the last on ``--eval-clients`` test
clients (100; ``RunConfig.eval_clients``: a sample drawn once per seed, the
same for every setting of that seed and at every evaluation).

Per setting, over the seeds (mean ± sample standard deviation): accuracy (the
mean of the last two evaluations); its difference to float32 paired by seed
(same seed, same clients), in points, with the 95% t-interval of the paired
differences; cumulative downlink and uplink bits (counted from the bytes on
the wire); client compute per round — multiply-adds (one training step of
the module the client really trains, on a full batch, counted by torch's
flop counter in this process from the setting's algorithm, times the batches
each run trained: ``train/num_batches``) and training seconds summed over the
clients (the runs' ``time/client_train_s``, median over rounds) — and ratios
against float32. Runs are separate processes, ``--jobs`` at a time: their
seconds compare only under the same load (``--jobs`` equal to the cores, or
1), the multiply-adds always. The goal (Caldas et al.): at least 14x less
downlink, 28x less uplink and 1.5x fewer client multiply-adds within 1 point
of float32's accuracy, the accuracy claimed only where the lower end of the
95% t-interval of the paired difference is above -1 point. A PNG of accuracy
against total (down + up) bits (mean over seeds, the band its 95%
t-interval) and ``summary.json`` go to ``--out``.

Seeds: every setting runs once per seed (``--seeds 0,1,2``, the default). A
seed changes the clients sampled, the evaluation sample, the model's
initialization and every codec's and sub-model's randomness. Each run is a
run folder in ``OUT/TASK`` (named by the setting and the seed), skipped when
complete and resumed from its checkpoint when interrupted, so an interrupted
benchmark goes on where it stopped when run again; the sweep's
``results.csv`` and ``groups.csv`` are there too.

    python benchmarks/readings.py [--datasets unipen,shakespeare] [--rounds 60,50]
        [--clients 10] [--max-batches 10,10] [--eval-every 10] [--eval-clients 100]
        [--settings float32,fd0.75,...] [--seeds 0,1,2] [--jobs 2] [--threads 1]
        [--out runs/readings] [--replot]
    python benchmarks/readings.py --estimate    # 2 rounds of each, evaluated every round
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fedzip.algorithms.dropout import step_macs
from fedzip.config import RunConfig
from fedzip.data import load_dataset
from fedzip.errors import DataError
from fedzip.metrics import format_bits, read_jsonl
from fedzip.run import build_algorithm
from fedzip.sweep import Sweep, json_safe, mean_sd, run_sweep, t_interval

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
LAST = 2  # accuracy: the mean of the last two evaluations

TASKS = {
    "unipen": {"dataset": "unipen", "task": "auto", "batch_size": 20, "client_lr": 0.1},
    "shakespeare": {"dataset": "shakespeare", "task": "shakespeare", "batch_size": 4, "client_lr": 1.0},
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# --------------------------------------------------------------------------
# Client compute: a property of the setting, counted here
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------


def base_config(name: str, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields every run of task ``name`` shares."""
    spec = TASKS[name]
    cap = args.max_batches[min(list(TASKS).index(name), len(args.max_batches) - 1)] or None
    return {"dataset": spec["dataset"], "task": spec["task"], "rounds": rounds, "clients_per_round": args.clients,
            "batch_size": spec["batch_size"], "max_batches": cap, "client_lr": spec["client_lr"],
            "eval_every": args.eval_every, "eval_clients": args.eval_clients or None}


def build_sweep(name: str, base: dict[str, Any], names: list[str], seeds: list[int]) -> Sweep:
    """One task as a sweep: one variant per setting, crossed with the seeds."""
    return Sweep.from_dict({"name": f"readings_{name}", "base": base, "grid": {"seed": seeds},
                            "variants": {s: SETTINGS[s] for s in names}})


def setting_macs(base: dict[str, Any], names: list[str], train: Any, info: Any) -> dict[str, int]:
    """Multiply-adds of one client step per setting, from its algorithm built here once."""
    out = {}
    for s in names:
        algo = build_algorithm(RunConfig.from_dict({**base, **SETTINGS[s]}), info)
        out[s] = macs_per_step(algo, algo.init(), train, base["batch_size"])
    return out



def _pm(m: float, sd: float, scale: float = 1.0, digits: int = 3) -> str:
    return f"{m * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


def per_run(history: list[dict[str, Any]], macs_step: int) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl."""
    evals = [m for m in history if m.get("eval/accuracy") is not None]
    last = [m["eval/accuracy"] for m in evals[-LAST:]]
    return {
        "acc": sum(last) / len(last), "final": evals[-1]["eval/accuracy"],
        "down": history[-1]["broadcasted_bits/cumulative"], "up": history[-1]["aggregated_bits/cumulative"],
        "train_s": statistics.median(m["time/client_train_s"] for m in history),
        "client_s": statistics.median(m["time/client_train_s"] + m["time/client_data_s"]
                                      + m["time/client_encode_s"] for m in history),
        "macs": macs_step * statistics.mean(m["train/num_batches"] for m in history),
        "examples": [m["train/num_examples"] for m in history],
        "curve": {m["round"]: (m["broadcasted_bits/cumulative"] + m["aggregated_bits/cumulative"],
                               m["eval/accuracy"]) for m in evals},
    }


def summarize(result: Any, names: list[str], macs: dict[str, int]) -> tuple[list[dict[str, Any]], bool]:
    """Per setting, over its complete runs: means and sds, the mean curve with
    its 95% t-interval; and whether every setting of a seed trained on the
    same number of examples each round (the same clients)."""
    complete = {r["name"] for r in result.rows if r["status"] == "complete"}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in result.runs:
        if r.name in complete:
            hist = read_jsonl(result.logdir / r.name / "metrics.jsonl")
            runs.setdefault(r.variant, {})[r.config.seed] = per_run(hist, macs[r.variant])
    seeds = sorted({s for by in runs.values() for s in by})
    same = all(len({json.dumps(by[s]["examples"]) for by in runs.values() if s in by}) <= 1 for s in seeds)
    rows = []
    for s in names:
        by = runs.get(s)
        if not by:
            continue
        ps = [by[k] for k in sorted(by)]
        rounds = sorted(set.intersection(*(set(p["curve"]) for p in ps)))
        curve = []
        for rnd in rounds:
            pts = [p["curve"][rnd] for p in ps]
            mean, low, high = t_interval([a for _, a in pts])
            curve.append({"round": rnd, "total_bits": sum(b for b, _ in pts) / len(pts), "mean": mean,
                          "low": low, "high": high})
        acc, acc_sd = mean_sd([p["acc"] for p in ps])
        row = {"setting": s, "n": len(ps), "seeds": sorted(by), "acc": acc, "acc_sd": acc_sd,
               "acc_by_seed": {k: by[k]["acc"] for k in sorted(by)}, "macs_step": macs[s], "curve": curve}
        for key in ("final", "down", "up", "train_s", "client_s", "macs"):
            row[key] = statistics.mean(p[key] for p in ps)
        rows.append(row)
    ref = next((r for r in rows if r["setting"] == REFERENCE), None)
    for row in rows:
        if ref is None:
            continue
        row["x_down"] = ref["down"] / row["down"]
        row["x_up"] = ref["up"] / row["up"]
        row["x_time"] = ref["train_s"] / row["train_s"]
        row["x_macs"] = ref["macs"] / row["macs"]
        shared = [k for k in row["acc_by_seed"] if k in ref["acc_by_seed"]]
        diffs = [100 * (row["acc_by_seed"][k] - ref["acc_by_seed"][k]) for k in shared]
        row["d_points"], row["d_sd"] = mean_sd(diffs) if diffs else (math.nan, math.nan)
        _, row["d_low"], row["d_high"] = t_interval(diffs)
    return rows, same


def misses(r: dict[str, Any]) -> list[str]:
    """What keeps a setting from the goal; the accuracy counts as met only where
    the interval's lower end is above -1 point (one seed gives no interval)."""
    acc_ok = math.isfinite(r["d_low"]) and r["d_low"] > -GOAL["points"]
    return [k for k, bad in (("down", r["x_down"] < GOAL["down"]), ("up", r["x_up"] < GOAL["up"]),
                             ("compute", r["x_macs"] < GOAL["compute"]), ("acc", not acc_ok)) if bad]


def table(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"{'setting':18s} {'n':>2s} {'acc':>13s} {'d pt (paired)':>14s} {'d 95% t-int':>15s} "
          f"{'downlink':>10s} {'x':>6s} {'uplink':>10s} {'x':>6s} {'GMAC/rd':>8s} {'train s/rd':>10s} "
          f"{'compute x':>11s}  goal")
    for r in rows:
        has = "x_down" in r
        is_ref = r["setting"] == REFERENCE
        d = "" if not has or is_ref else _pm(r["d_points"], r["d_sd"], digits=1)
        ci = (f"[{r['d_low']:+.1f}, {r['d_high']:+.1f}]" if has and not is_ref and math.isfinite(r["d_low"])
              else "")
        verdict = "-" if is_ref or not has else ("met" if not misses(r) else "misses " + ",".join(misses(r)))
        compute = f"{r['x_macs']:.2f} / {r['x_time']:.2f}" if has else ""
        print(f"{r['setting']:18s} {r['n']:2d} {_pm(r['acc'], r['acc_sd']):>13s} {d:>14s} {ci:>15s} "
              f"{format_bits(r['down']):>10s} {r.get('x_down', 1):6.2f} {format_bits(r['up']):>10s} "
              f"{r.get('x_up', 1):6.2f} {r['macs'] / 1e9:8.1f} {r['train_s']:10.2f} {compute:>11s}  {verdict}")
    print(f"(acc: mean of the last {LAST} evaluations, mean ± sd over seeds; d: accuracy minus float32's, paired "
          f"by seed, points, with the 95% t-interval of the paired differences; x: float32's figure over the "
          f"setting's; compute x: multiply-adds / training seconds; goal: >= {GOAL['down']:g}x down, "
          f">= {GOAL['up']:g}x up, >= {GOAL['compute']:g}x fewer multiply-adds, within {GOAL['points']:g} "
          f"point of float32: the interval's lower end above -{GOAL['points']:g})\n", flush=True)


def run_task(name: str, rounds: int, args: argparse.Namespace, names: list[str], seeds: list[int],
             out: Path) -> dict[str, Any] | None:
    try:
        train, _, info = load_dataset(TASKS[name]["dataset"])
    except DataError as e:
        print(f"[{name}] skipped: {e}", flush=True)
        return None
    base = base_config(name, rounds, args)
    print(f"[{name}] {info.description}\n[{name}] {rounds} rounds of {args.clients} clients, batch "
          f"{base['batch_size']}, at most {base['max_batches'] or 'all'} batches a client, client SGD lr "
          f"{base['client_lr']:g}, server SGD lr 1; evaluation on {base['eval_clients'] or 'all'} test clients "
          f"(a sample per seed) every {args.eval_every} rounds and after the last; seeds {seeds}", flush=True)
    macs = setting_macs(base, names, train, info)
    sweep = build_sweep(name, base, names, seeds)
    result = run_sweep(sweep, out / name, jobs=args.jobs, threads=args.threads)
    rows, same = summarize(result, names, macs)
    wall = sum(r.get("wall_s") or 0 for r in result.rows)
    print(f"\n[{name}] clients: {'the same' if same else 'NOT the same'} in every setting of a seed (examples "
          f"per round checked); {wall / 60:.1f} min of run wall time in all, over seeds {seeds}\n")
    table(name, rows)
    if result.failed:
        print(f"[{name}] {len(result.failed)} run(s) failed: {', '.join(result.failed)}; run again to resume them")
    return {"task": name, "rounds": rounds, "clients": args.clients, "max_batches": base["max_batches"],
            "eval_clients": base["eval_clients"], "seeds": seeds, "same_clients": same, "run_wall_s": wall,
            "failed": result.failed, "rows": rows}


def goal_line(results: list[dict[str, Any]]) -> None:
    """The headline: the settings that meet every part of the goal on every task."""
    goal = (f"goal (>= {GOAL['down']:g}x down, >= {GOAL['up']:g}x up, >= {GOAL['compute']:g}x compute, within "
            f"{GOAL['points']:g} point of float32: the lower end of the 95% t-interval of the paired difference "
            f"above -{GOAL['points']:g} pt)")
    for res in results:
        rows = [r for r in res["rows"] if "x_down" in r and r["setting"] != REFERENCE]
        met = [r["setting"] for r in rows if not misses(r)]
        bits_compute = [r["setting"] for r in rows if misses(r) == ["acc"]]
        n = min((r["n"] for r in res["rows"]), default=0)
        print(f"[{res['task']}] {goal}: " + (f"met by {', '.join(met)}" if met else "not met")
              + (f"; bits and compute only: {', '.join(bits_compute)}" if bits_compute else "")
              + (" (one seed gives no interval)" if n < 2 else ""))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    nan = float("nan")
    for ax, res in zip(axes[0], results, strict=True):
        for i, row in enumerate(res["rows"]):
            c = colors[i % len(colors)]
            bits = [p["total_bits"] for p in row["curve"]]
            ax.plot(bits, [p["mean"] for p in row["curve"]], marker=".", color=c,
                    label=row["setting"] + (f" (n={row['n']})" if row["n"] > 1 else ""),
                    linewidth=2.5 if row["setting"] == REFERENCE else 1.2)
            low = [nan if p["low"] is None else p["low"] for p in row["curve"]]
            high = [nan if p["high"] is None else p["high"] for p in row["curve"]]
            if any(math.isfinite(v) for v in low):
                ax.fill_between(bits, low, high, color=c, alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("total bits (downlink + uplink, cumulative)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{res['task']}: {res['rounds']} rounds of {res['clients']} clients "
                     "(mean over seeds, band: 95% t-interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="unipen,shakespeare")
    ap.add_argument("--rounds", type=_ints, default=[60, 50], help="rounds per data set (in --datasets order)")
    ap.add_argument("--clients", type=int, default=10, help="clients per round")
    ap.add_argument("--max-batches", type=_ints, default=[10, 10],
                    help="batch cap per client per round for unipen,shakespeare (0: none)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-clients", type=int, default=100, help="test clients evaluated, a sample per seed (0: all)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: each setting runs once per seed")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (processes)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default min(2, cores / jobs))")
    ap.add_argument("--estimate", action="store_true",
                    help="2 rounds of every setting, evaluated every round, into OUT_estimate")
    ap.add_argument("--out", default="runs/readings")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        plot(summary["results"], out / "readings.png")
        print(f"plot: {out / 'readings.png'}")
        return 0
    names = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        ap.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    datasets = [d for d in args.datasets.split(",") if d]
    if any(d not in TASKS for d in datasets):
        ap.error(f"--datasets: choose from {list(TASKS)}")
    try:
        seeds = _ints(args.seeds)
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    if args.estimate:
        args.rounds, args.eval_every, out = [2], 1, Path(args.out + "_estimate")
    args.threads = args.threads or max(1, min(2, (os.cpu_count() or 1) // max(1, args.jobs)))
    results = []
    for i, d in enumerate(datasets):
        res = run_task(d, args.rounds[min(i, len(args.rounds) - 1)], args, names, seeds, out)
        if res is not None:
            results.append(res)
    if not results:
        return 1
    goal_line(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(json_safe({"args": vars(args), "results": results}), indent=1))
    plot(results, out / "readings.png")
    print(f"plot: {out / 'readings.png'}; summary: {out / 'summary.json'}; runs: {out}/<task>")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
