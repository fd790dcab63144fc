"""Scale: seconds per round and peak memory for 10, 100 and 1,000 clients per round.

Every (backend, cohort) runs in a fresh process for ``--rounds`` rounds (20
by default) of weighted FedAvg (float32 updates, mean aggregator). It reports:

* ``s/round``: the median round time (round 1, which starts workers, excluded);
* ``driver peak``: the driver's peak resident memory during the rounds (sampled
  every 20 ms), and ``workers peak`` the summed peak RSS of the Ray workers;
* ``slope``: least-squares slope of the driver's RSS at the end of each round
  against the round number (rounds 3.., the first ones warm up), in KiB/round;
* ``train/client``: the training compute of one client, timed apart in a plain
  torch loop (get the examples, load the weights, the same SGD batches, the
  delta) on the same thread count, and ``framework/client`` = (round time -
  that compute) / clients, on the local backend: what fedzip adds per client
  (encode/decode, wire, folding, bookkeeping).

Clients are synthetic and lazy: a population of 10,000 clients whose examples
(``--examples``, 16 by default, 28x28 images) are generated from the client id
when asked for, so the data costs no memory. The model is a small CNN by
default (conv 8 + conv 16 + linear, 11,274 parameters); ``--model cnn`` uses
the seed's FedAvg CNN (1,663,370 parameters), much slower at 1,000 clients.

    python benchmarks/scale.py [--quick] [--rounds 20] [--clients 10,100,1000]
                               [--backends local,ray] [--workers 2] [--model small|cnn]
    python benchmarks/scale.py --profile 1000     # cProfile of local rounds
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so Ray workers unpickle this module

import fedzip  # noqa: E402
from fedzip.data.federated import ClientExamples  # noqa: E402
from fedzip.execution import LocalExecutor, RayExecutor  # noqa: E402
from fedzip.seeding import derive_seed, numpy_rng  # noqa: E402

GOALS = {"peak_ratio": 1.5, "slope_kib": 64.0, "framework_ms": 5.0, "ray_vs_local": 1.15}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 5, padding=2)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x.unsqueeze(1))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def model_fn(name: str) -> nn.Module:
    return SmallCNN() if name == "small" else fedzip.fedavg_cnn()


class SyntheticClients:
    """``population`` clients of ``examples`` images each, generated on demand."""

    def __init__(self, population: int, examples: int, seed: int = 0) -> None:
        self._ids = [f"u{i:05d}" for i in range(population)]
        self.examples, self.seed = examples, seed

    @property
    def client_ids(self) -> list[str]:
        return self._ids

    def client(self, client_id: str) -> ClientExamples:
        g = torch.Generator().manual_seed(derive_seed(self.seed, client_id))
        x = torch.rand(self.examples, 28, 28, generator=g)
        y = torch.randint(0, 10, (self.examples,), generator=g)
        return ClientExamples(x, y)


# --------------------------------------------------------------------------
# Memory sampling
# --------------------------------------------------------------------------


def rss(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 0


class Sampler(threading.Thread):
    """Peak RSS of the driver and (summed) of the workers, every ``interval`` s."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.workers = interval, []
        self.driver_peak = self.workers_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            self.driver_peak = max(self.driver_peak, rss(me))
            if self.workers:
                self.workers_peak = max(self.workers_peak, sum(rss(p) for p in self.workers))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1."""
    if len(ys) < 2:
        return 0.0
    x = np.arange(len(ys), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(ys, dtype=np.float64), 1)[0])


# --------------------------------------------------------------------------
# One configuration (in its own process)
# --------------------------------------------------------------------------


def plain_training_s(args, data: SyntheticClients, ids: list[str], params: dict,
                     threads: int | None) -> float:
    """Seconds of training compute for ``ids``: the plain loop, no fedzip."""
    model = model_fn(args.model)
    pre = fedzip.Preprocess(args.batch, 1, 1000)
    with fedzip.execution.torch_threads(threads):
        t0 = time.perf_counter()
        for cid in ids:
            ex = data.client(cid)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(params[k])
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for x, y in pre.batches(ex, numpy_rng(0, cid)):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            _ = {k: p.detach() - params[k] for k, p in model.named_parameters()}
        return time.perf_counter() - t0


def algorithm(args, executor):
    return fedzip.weighted_fedavg(
        functools.partial(model_fn, args.model),
        functools.partial(torch.optim.SGD, lr=0.05),
        functools.partial(torch.optim.SGD, lr=1.0),
        fedzip.mean(), executor=executor,
        preprocess=fedzip.Preprocess(args.batch, 1, 1000), seed=0,
    )


def child(args) -> dict:
    """One backend at one cohort size: time, memory, and (local) the plain loop."""
    torch.manual_seed(0)
    data = SyntheticClients(max(10_000, args.cohort), args.examples)
    if args.backend == "local":
        executor = LocalExecutor(threads=args.local_threads)
    else:
        executor = RayExecutor(num_workers=args.workers, threads=args.threads)
    fa = algorithm(args, executor)
    state = fa.init()
    sampler = Sampler()
    sampler.start()
    times, plain, driver_rss, worker_rss = [], [], [], []
    profiler = None
    try:
        for r in range(1, args.rounds + 1):
            if r == 2 and args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            ids = fedzip.sample_clients(data.client_ids, args.cohort, r, 0)
            params = state.params
            t0 = time.perf_counter()
            state, m = fa.next(state, data, ids)
            times.append(time.perf_counter() - t0)
            assert m["clients/succeeded"] == args.cohort, m.get("failures")
            if r == 1 and isinstance(executor, RayExecutor):
                sampler.workers = executor.worker_pids()
            gc.collect()
            driver_rss.append(rss(os.getpid()))
            worker_rss.append(sum(rss(p) for p in sampler.workers))
            if args.backend == "local" and not args.profile:
                # the same clients' training in a plain loop, right after: same load
                plain.append(plain_training_s(args, data, ids, params, args.local_threads))
        if profiler is not None:
            profiler.disable()
            import pstats

            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    finally:
        sampler.stop()
        executor.close()
    warm = slice(1, None) if len(times) > 1 else slice(None)
    out = {
        "backend": args.backend, "cohort": args.cohort, "rounds": args.rounds,
        "s_round": statistics.median(times[warm]),
        "driver_peak_mib": sampler.driver_peak / 2**20,
        "workers_peak_mib": sampler.workers_peak / 2**20,
        "slope_kib": slope(driver_rss[2:]) / 1024,
        "workers_slope_kib": slope(worker_rss[2:]) / 1024,
        "loss": m["train/loss"],
    }
    if plain:
        overhead = [(t - c) / args.cohort for t, c in zip(times[warm], plain[warm], strict=True)]
        out["train_ms_client"] = 1000 * statistics.median(plain[warm]) / args.cohort
        out["framework_ms_client"] = 1000 * statistics.median(overhead)
    return out


def interleaved(args) -> dict:
    """Ray against local in one process, round by round in turn (a fair ratio on
    a machine whose load changes): the same clients, the same rounds."""
    data = SyntheticClients(10_000, args.examples)
    contenders = {
        "local": LocalExecutor(threads=args.local_threads),
        "local-1thread": LocalExecutor(threads=1),
        "ray": RayExecutor(num_workers=args.workers, threads=args.threads),
    }
    algs = {k: algorithm(args, ex) for k, ex in contenders.items()}
    states = {k: a.init() for k, a in algs.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for r in range(1, args.rounds + 1):
            ids = fedzip.sample_clients(data.client_ids, args.cohort, r, 0)
            order = list(contenders) if r % 2 else list(reversed(contenders))
            for k in order:
                t0 = time.perf_counter()
                states[k], _ = algs[k].next(states[k], data, ids)
                times[k].append(time.perf_counter() - t0)
    finally:
        for ex in contenders.values():
            ex.close()
    return {k: statistics.median(v[1:]) for k, v in times.items()}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run_child(args, backend: str, cohort: int) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--cohort", str(cohort),
           "--rounds", str(args.rounds), "--examples", str(args.examples), "--batch", str(args.batch),
           "--workers", str(args.workers), "--model", args.model]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.local_threads is not None:
        cmd += ["--local-threads", str(args.local_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{backend} at {cohort} clients failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok: bool) -> str:
    return "  OK" if ok else "  MISSED"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6 rounds instead of 20")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--backends", default="local,ray")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="per Ray worker (default cpus // workers)")
    p.add_argument("--local-threads", type=int, default=None, help="local backend (default: torch's)")
    p.add_argument("--model", choices=("small", "cnn"), default="small")
    p.add_argument("--compare-at", type=int, default=100, metavar="CLIENTS",
                   help="cohort of the interleaved ray-vs-local timing (0: skip)")
    p.add_argument("--profile", type=int, default=0, metavar="CLIENTS",
                   help="cProfile the driver of the first --backends at this cohort and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cohort", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.rounds = args.rounds or (6 if args.quick else 20)

    if args.child == "interleaved":
        print(json.dumps(interleaved(args)))
        return
    if args.child:
        args.backend, args.profile = args.child, False
        print(json.dumps(child(args)))
        return
    if args.profile:
        args.backend, args.cohort, args.rounds = args.backends.split(",")[0], args.profile, min(args.rounds, 4)
        args.profile = True
        print(json.dumps(child(args)))
        return

    cohorts = [int(c) for c in args.clients.split(",")]
    backends = args.backends.split(",")
    print(f"model={args.model} examples/client={args.examples} batch={args.batch} rounds={args.rounds} "
          f"ray workers={args.workers} cpus={os.cpu_count()} torch threads={torch.get_num_threads()} "
          f"load average at start={os.getloadavg()[0]:.1f}")
    header = (f"{'backend':7} {'clients':>7} {'s/round':>8} {'driver peak':>12} {'workers peak':>13} "
              f"{'slope KiB/round':>16} {'train/client':>13} {'framework/client':>17}")
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, int], dict] = {}
    for backend in backends:
        for cohort in cohorts:
            r = rows[backend, cohort] = run_child(args, backend, cohort)
            ray_ = backend == "ray"
            wp = f"{r['workers_peak_mib']:9.0f} MiB" if ray_ else f"{'-':>13}"
            sl = f"{r['slope_kib']:.0f}" + (f" / {r['workers_slope_kib']:.0f}" if ray_ else "")
            tr = f"{r['train_ms_client']:10.2f} ms" if not ray_ else f"{'-':>13}"
            fw = f"{r['framework_ms_client']:14.2f} ms" if not ray_ else f"{'-':>17}"
            print(f"{backend:7} {cohort:7d} {r['s_round']:8.3f} {r['driver_peak_mib']:8.0f} MiB {wp} "
                  f"{sl:>16} {tr} {fw}", flush=True)
    print("(slope: driver / workers; Ray workers' peak and slope are summed over the workers)")

    cmp = None
    if args.compare_at and set(backends) >= {"local", "ray"}:
        cmp = run_child(args, "interleaved", args.compare_at)
        print(f"\ninterleaved, {args.compare_at} clients/round, median s/round: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cmp.items()))

    print("\ngoals:")
    lo, hi = min(cohorts), max(cohorts)
    for backend in backends:
        if (backend, lo) in rows and (backend, hi) in rows and lo != hi:
            a, b = rows[backend, lo], rows[backend, hi]
            ratio = b["driver_peak_mib"] / a["driver_peak_mib"]
            line = f"  {backend}: driver peak at {hi} / at {lo} clients = {ratio:.2f} (goal <= {GOALS['peak_ratio']})"
            if backend == "ray":
                tot = (b["driver_peak_mib"] + b["workers_peak_mib"]) / (a["driver_peak_mib"] + a["workers_peak_mib"])
                line += f"; driver+workers {tot:.2f}"
                ratio = max(ratio, tot)
            print(line + verdict(ratio <= GOALS["peak_ratio"]))
    slopes = [(abs(r[k]), r[k], f"{b} {c} clients {'workers' if 'workers' in k else 'driver'}")
              for (b, c), r in rows.items() for k in ("slope_kib", "workers_slope_kib") if b == "ray" or k == "slope_kib"]
    _, worst, where = max(slopes)
    print(f"  memory slope: largest {worst:.0f} KiB/round ({where}); goal ~0 (|slope| <= "
          f"{GOALS['slope_kib']:.0f} KiB/round, i.e. < {GOALS['slope_kib'] * 1000 / 1024:.0f} MiB per 1,000 rounds)"
          + verdict(abs(worst) <= GOALS["slope_kib"]))
    local = [r for (b, c), r in rows.items() if b == "local" and c >= min(100, hi)]
    if local:
        fw = max(r["framework_ms_client"] for r in local)
        print(f"  local framework time per client: at most {fw:.2f} ms (cohorts >= {min(100, hi)}; "
              f"goal < {GOALS['framework_ms']} ms)" + verdict(fw < GOALS["framework_ms"]))
    if cmp:
        best = min(cmp["local"], cmp["local-1thread"])
        ratio = cmp["ray"] / best
        print(f"  ray ({args.workers} workers) / the faster local at {args.compare_at} clients = {ratio:.2f} "
              f"(goal <= {GOALS['ray_vs_local']}; against local at torch's default threads: "
              f"{cmp['ray'] / cmp['local']:.2f})" + verdict(ratio <= GOALS["ray_vs_local"]))


if __name__ == "__main__":
    main()
