"""Round time of this tree's fedzip against another revision's, in lockstep.

    python benchmarks/revision_ab.py REV [--rounds 20] [--threads 1] [--aggregators mean,compression]

A speed change of a few percent drowns in the noise between separate runs on
a shared machine: ``round_time.py``'s ratio to the floor moves by about 2%
from one run to the next. This runs the seed workload (``round_time.py``'s:
10 clients of 80-120 examples, batch 20, the FedAvg CNN, client SGD 0.02) in
two worker processes, one importing this tree's ``src`` and one a temporary
``git worktree`` of REV, and steps them in turn, one round each, the order
alternating: every pair of rounds ran under the same load. It prints each
side's median seconds per round and the median of the paired ratios (this
tree / REV) with the sign test's 95% interval, per aggregator: ``mean``
(float32) and ``compression`` (TFF's ``compression_aggregator()``). A change
is measured when the interval excludes 1.

Both sides train the same clients from the same seed, so they also compute the
same rounds unless the change moves numbers; the script says when their
``train/loss`` differ in the last round (a change meant to keep runs bit for
bit must not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(src: str, aggregators: list[str], threads: int) -> None:
    """Serve ``step NAME`` on stdin: run one round of contender NAME, answer
    ``seconds loss``; ``quit`` ends."""
    import functools
    import time

    import torch

    torch.set_num_threads(threads)
    import fedzip

    if not Path(fedzip.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"imported fedzip from {fedzip.__file__}, expected under {src}")
    sys.path.insert(0, str(HERE))
    from round_time import Clients

    clients = Clients()
    sgd = functools.partial(torch.optim.SGD, lr=0.02)
    server = functools.partial(torch.optim.SGD, lr=1.0)
    steps = {}
    for name in aggregators:
        agg = fedzip.mean() if name == "mean" else fedzip.compression_aggregator()
        algo = fedzip.weighted_fedavg(fedzip.fedavg_cnn, sgd, server, agg)
        holder = {"state": algo.init()}

        def step(algo=algo, holder=holder) -> tuple[float, float]:
            t0 = time.perf_counter()
            holder["state"], m = algo.next(holder["state"], clients, clients.client_ids)
            return time.perf_counter() - t0, float(m["train/loss"])

        steps[name] = step
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        if cmd == "quit":
            return
        seconds, loss = steps[name]()
        print(f"{seconds!r} {loss!r}", flush=True)


class Side:
    """A worker process importing fedzip from ``src``."""

    def __init__(self, src: Path, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(src), "--aggregators", args.aggregators,
             "--threads", str(args.threads)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker for {src} did not start (see its error above)")

    def step(self, name: str) -> tuple[float, float]:
        self.proc.stdin.write(f"step {name}\n")
        self.proc.stdin.flush()
        seconds, loss = self.proc.stdout.readline().split()
        return float(seconds), float(loss)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", help="the git revision to compare against (HEAD, a tag, a hash)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per side and aggregator")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aggregators", default="mean,compression")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    aggregators = [a for a in args.aggregators.split(",") if a]
    if bad := [a for a in aggregators if a not in ("mean", "compression")]:
        ap.error(f"--aggregators: unknown {bad}; known: mean, compression")
    if args.worker:
        worker(args.worker, aggregators, args.threads)
        return
    if not args.rev:
        ap.error("give the revision to compare against")
    sys.path.insert(0, str(HERE))
    from round_time import median_interval

    with tempfile.TemporaryDirectory(prefix="fedzip-ab-") as tmp:
        tree = Path(tmp) / "rev"
        try:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"git worktree add {args.rev}: {e.stderr.strip()}") from None
        sides = {}
        try:
            sides = {"this tree": Side(ROOT / "src", args), args.rev: Side(tree / "src", args)}
            names = list(sides)
            times = {(s, a): [] for s in names for a in aggregators}
            losses = {}
            for r in range(args.rounds + 1):
                for a in aggregators:
                    for s in (names if r % 2 else names[::-1]):  # alternate who goes first
                        seconds, losses[s, a] = sides[s].step(a)
                        if r > 0:  # round 0 warms up
                            times[s, a].append(seconds)
        finally:
            for side in sides.values():
                side.close()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
    print(f"seed workload (10 clients, FedAvg CNN), {args.threads} torch thread(s), {args.rounds} rounds "
          f"per side after a warm-up, in lockstep")
    print(f"{'aggregator':12s} {'this tree s':>12s} {args.rev[:14] + ' s':>16s} {'paired ratio':>13s}  95% interval")
    for a in aggregators:
        mine, theirs = times[names[0], a], times[names[1], a]
        paired = [x / y for x, y in zip(mine, theirs, strict=True)]
        lo, hi = median_interval(paired)
        print(f"{a:12s} {statistics.median(mine):12.4f} {statistics.median(theirs):16.4f} "
              f"{statistics.median(paired):13.4f}  [{lo:.4f}, {hi:.4f}]")
        if losses[names[0], a] != losses[names[1], a]:
            print(f"  ({a}: the last round's train/loss differs: {losses[names[0], a]!r} against "
                  f"{losses[names[1], a]!r}; the change moved numbers)")
    print("(ratio < 1: this tree is faster; measured when the interval excludes 1)")


if __name__ == "__main__":
    main()
