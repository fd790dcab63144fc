"""Scale: seconds per round and peak memory for 10, 100 and 1,000 clients per round.

Every (backend, cohort) runs in a fresh process for ``--rounds`` rounds (20
by default) of weighted FedAvg (float32 updates, mean aggregator). It reports:

* ``s/round``: the median round time (round 1, which starts workers, excluded);
* ``driver peak``: the driver's peak resident memory during the rounds (sampled
  every 20 ms), and in parentheses its private part (``RssAnon``: resident
  memory less shared pages such as libraries and Ray's object store, whose
  pages count in every process that touched them); ``workers peak`` the same
  for the Ray workers, summed;
* ``slope``: least-squares slope of private memory at the end of each round
  (after ``gc.collect()``) against the round number, over the second half of
  the rounds (allocators and Ray's own buffers warm up first), in KiB/round;
  the slopes of resident memory follow the table;
* ``train/client``: one client's training compute in a plain torch loop (get
  the examples, load the weights, the same SGD batches, the delta), run on the
  same clients right after each round, and ``framework/client`` = (round time
  - that compute) / clients: what fedzip adds per client on the local backend
  (encode/decode, wire format, folding, bookkeeping);
* an interleaved comparison at ``--compare-at`` clients (100): local and Ray in
  one process, round by round in turn, so a change of load on the machine hits
  both alike; the goal is checked against the faster local setting.

Threads: Ray workers get ``cpus // workers`` torch threads (1 on 2 cores); the
driver (its folding, and the local backend's clients) runs with
``--local-threads`` (1 by default, 0 for torch's default of one per core). On
a 2-core machine that other processes also use, two OpenMP threads per process
spin against each other and a round can take several times as long; the
interleaved comparison shows both settings.

Clients are synthetic and lazy: a population of 10,000 clients whose examples
(``--examples``, 16 by default, 28x28 images, one batch of 16) are generated
from the client id when asked for, so the data costs no memory. The model is a
small CNN by default (conv 8 + conv 16 + linear, 11,274 parameters);
``--model cnn`` uses the seed's FedAvg CNN (1,663,370 parameters), much slower
at 1,000 clients.

Backends: ``local`` (in process), ``processes`` (``ProcessExecutor``,
``--workers`` x ``--threads``) and ``ray``. The interleaved comparison also
runs the processes backend in each ``--layouts`` (default ``CORESx1,1xCORES``:
processes of one thread against one process of several).

``--real``: memory on the real data: UNIPEN digits (``load_dataset("unipen-digits")``,
284 writers) and the seed CNN, 10 clients a round, evaluation every
``--eval-every`` (20) rounds, run by ``fedzip.run.run`` with its writers
(metrics.jsonl, TensorBoard), one fresh process per length in
``--real-rounds`` (30,200,1000). It reports the peak resident memory (driver,
and the workers summed on the processes backend), the resident memory after
each round as a trend (least-squares slope after the first 50 rounds, and
the mean of each tenth of the run) and the ratio of the peaks of the longest
runs to the 30-round one. Goals: peak(200) <= 1.1 x peak(30); the trend
flat: |slope| <= 16 KiB/round (16 MiB per 1,000 rounds).

    python benchmarks/scale.py [--quick] [--rounds 20] [--clients 10,100,1000]
                               [--backends local,processes,ray] [--workers 2] [--model small|cnn]
    python benchmarks/scale.py --profile 1000 --backends local   # cProfile of the driver
    python benchmarks/scale.py --real [--real-rounds 30,200,1000] [--real-backend local|processes]
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
from fedzip.execution import LocalExecutor, ProcessExecutor, RayExecutor, available_cores  # noqa: E402
from fedzip.models import SmallCNN  # noqa: E402
from fedzip.seeding import derive_seed, numpy_rng  # noqa: E402

GOALS = {"peak_ratio": 1.5, "slope_kib": 64.0, "framework_ms": 5.0, "ray_vs_local": 1.15,
         "real_peak_ratio": 1.1, "real_slope_kib": 16.0}


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


def memory(pid: int) -> tuple[int, int]:
    """(resident, private) bytes of a process: private is ``RssAnon``, without the
    shared pages (libraries, Ray's object store) that resident memory counts."""
    try:
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["RssAnon"]
    except (OSError, KeyError):  # not Linux: psutil (installed with Ray) or nothing
        try:
            import psutil

            r = psutil.Process(pid).memory_info().rss
            return r, r
        except Exception:
            return 0, 0


def total(pids: list[int]) -> tuple[int, int]:
    mems = [memory(p) for p in pids]
    return sum(m[0] for m in mems), sum(m[1] for m in mems)


class Sampler(threading.Thread):
    """Peak (resident, private) memory of the driver and, summed, of the workers."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.workers = interval, []
        self.driver_peak, self.workers_peak = [0, 0], [0, 0]
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            for peak, now in ((self.driver_peak, memory(me)), (self.workers_peak, total(self.workers))):
                peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def half_slope(ys: list[int]) -> float:
    """KiB per round, over the second half of the rounds."""
    return slope(ys[len(ys) // 2:]) / 1024


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
    if args.local_threads:  # the driver's own tensor work (folding) too
        torch.set_num_threads(args.local_threads)
    data = SyntheticClients(max(10_000, args.cohort), args.examples)
    if args.backend == "local":
        executor = LocalExecutor(threads=args.local_threads)
    elif args.backend == "processes":
        executor = ProcessExecutor(num_workers=args.workers, threads=args.threads)
    else:
        executor = RayExecutor(num_workers=args.workers, threads=args.threads)
    fa = algorithm(args, executor)
    state = fa.init()
    sampler = Sampler()
    sampler.start()
    times, plain, driver_mem, worker_mem = [], [], [], []
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
            if r == 1 and isinstance(executor, (RayExecutor, ProcessExecutor)):
                sampler.workers = executor.worker_pids()
            gc.collect()
            driver_mem.append(memory(os.getpid()))
            worker_mem.append(total(sampler.workers))
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
        "driver_peak_mib": sampler.driver_peak[0] / 2**20,
        "driver_private_mib": sampler.driver_peak[1] / 2**20,
        "workers_peak_mib": sampler.workers_peak[0] / 2**20,
        "workers_private_mib": sampler.workers_peak[1] / 2**20,
        # the second half of the run: allocators and Ray's own buffers warm up first
        "slope_kib": half_slope([m[0] for m in driver_mem]),
        "private_slope_kib": half_slope([m[1] for m in driver_mem]),
        "workers_slope_kib": half_slope([m[0] for m in worker_mem]),
        "workers_private_slope_kib": half_slope([m[1] for m in worker_mem]),
        "loss": m["train/loss"],
    }
    if plain:
        overhead = [(t - c) / args.cohort for t, c in zip(times[warm], plain[warm], strict=True)]
        out["train_ms_client"] = 1000 * statistics.median(plain[warm]) / args.cohort
        out["framework_ms_client"] = 1000 * statistics.median(overhead)
    return out


def interleaved(args) -> dict:
    """Ray against local in one process, round by round in turn (a fair ratio on
    a machine whose load changes): the same clients, the same rounds. Each
    contender's driver runs with its own torch thread count (folding included)."""
    data = SyntheticClients(10_000, args.examples)
    lt = args.local_threads
    contenders = {  # name: (executor, the driver's torch threads)
        f"local (threads={lt or 'default'})": (LocalExecutor(threads=lt), lt),
        f"local (threads={'default' if lt else 1})": (LocalExecutor(threads=None if lt else 1), None if lt else 1),
    }
    import warnings

    for w, t in parse_layouts(args.layouts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layout past the cores is measured, not refused
            contenders[f"processes {w}x{t}"] = (ProcessExecutor(num_workers=w, threads=t), lt)
    if args.ray_in_compare:
        contenders["ray"] = (RayExecutor(num_workers=args.workers, threads=args.threads), lt)
    algs = {k: algorithm(args, ex) for k, (ex, _) in contenders.items()}
    states = {k: a.init() for k, a in algs.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for r in range(1, args.rounds + 1):
            ids = fedzip.sample_clients(data.client_ids, args.cohort, r, 0)
            order = list(contenders) if r % 2 else list(reversed(contenders))
            for k in order:
                with fedzip.execution.torch_threads(contenders[k][1]):
                    t0 = time.perf_counter()
                    states[k], _ = algs[k].next(states[k], data, ids)
                    times[k].append(time.perf_counter() - t0)
    finally:
        for ex, _ in contenders.values():
            ex.close()
    return {k: statistics.median(v[1:]) for k, v in times.items()}


# --------------------------------------------------------------------------
# --real: memory over long runs on the real data
# --------------------------------------------------------------------------


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        w, _, t = part.partition("x")
        out.append((int(w), int(t)))
    return out


def real_child(args) -> dict:
    """One run of ``args.rounds`` rounds on UNIPEN digits with the seed CNN,
    through ``fedzip.run.run`` (writers included); memory after every round."""
    import tempfile

    from fedzip.config import RunConfig
    from fedzip.run import run

    cfg = RunConfig(dataset="unipen-digits", rounds=args.rounds, clients_per_round=args.real_cohort,
                    eval_every=args.eval_every, backend=args.real_backend,
                    num_workers=args.workers, threads=args.threads, name="scale")
    sampler = Sampler()
    after: list[tuple[int, int, int, int]] = []  # (round, driver RSS, driver private, workers RSS)
    times: list[float] = []
    executor_pids: list[int] = []

    def on_round(state, m) -> None:
        if not sampler.workers and args.real_backend == "processes":
            # the workers: this process's children (the executor is the run's own)
            try:
                with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                    kids = [int(p) for p in f.read().split()]
                for pid in kids:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"spawn_main" in f.read():  # a worker, not multiprocessing's helpers
                            executor_pids.append(pid)
            except OSError:
                pass
            sampler.workers = list(executor_pids)
        d = memory(os.getpid())
        after.append((m["round"], d[0], d[1], total(sampler.workers)[0]))
        times.append(m["time/round_s"])

    sampler.start()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="fedzip-scale-") as logdir:
            run(cfg, logdir=logdir, console=False, on_round=on_round)
    finally:
        sampler.stop()
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return {"rounds": args.rounds, "backend": args.real_backend, "wall_s": time.perf_counter() - t0,
            "s_round": statistics.median(times[1:] or times), "hwm_mib": hwm / 2**20,
            "driver_peak_mib": sampler.driver_peak[0] / 2**20,
            "driver_private_mib": sampler.driver_peak[1] / 2**20,
            "workers_peak_mib": sampler.workers_peak[0] / 2**20, "after": after}


def real_main(args) -> None:
    lengths = [int(r) for r in args.real_rounds.split(",")]
    print(f"real data: unipen-digits, seed CNN (1,663,370 parameters), {args.real_cohort} clients/round, "
          f"eval every {args.eval_every} rounds, backend {args.real_backend}"
          + (f" ({args.workers} workers x {args.threads or 'auto'} threads)" if args.real_backend == "processes"
             else "") + f"; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average at start {os.getloadavg()[0]:.1f}; MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}")
    header = (f"{'rounds':>6} {'s/round':>8} {'wall s':>7} {'driver peak MiB':>16} {'private':>8} {'VmHWM':>7} "
              f"{'workers peak':>12} {'RSS after round 1 / 50 / last':>30} {'slope KiB/round':>16}")
    print(header)
    print("-" * len(header))
    rows = {}
    for n in lengths:
        cmd = [sys.executable, __file__, "--child", "real", "--rounds", str(n), "--eval-every", str(args.eval_every),
               "--real-backend", args.real_backend, "--real-cohort", str(args.real_cohort),
               "--workers", str(args.workers)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"the {n}-round run failed")
        r = rows[n] = json.loads(out.stdout.strip().splitlines()[-1])
        rss = [a[1] / 2**20 for a in r["after"]]
        warm = rss[50:] if len(rss) > 100 else rss[len(rss) // 2:]
        r["slope_kib"] = slope([x * 1024 for x in warm])
        mid = rss[min(49, len(rss) - 1)]
        wp = f"{r['workers_peak_mib']:.0f}" if args.real_backend == "processes" else "-"
        print(f"{n:6d} {r['s_round']:8.3f} {r['wall_s']:7.0f} {r['driver_peak_mib']:16.0f} "
              f"{r['driver_private_mib']:8.0f} {r['hwm_mib']:7.0f} {wp:>12} "
              f"{f'{rss[0]:.0f} / {mid:.0f} / {rss[-1]:.0f}':>30} {r['slope_kib']:16.1f}", flush=True)
    longest = max(lengths)
    rss = [a[1] / 2**20 for a in rows[longest]["after"]]
    tenth = max(1, len(rss) // 10)
    print(f"\nRSS after each round of the {longest}-round run, mean of each tenth of the run (MiB): "
          + ", ".join(f"{statistics.mean(rss[i:i + tenth]):.0f}" for i in range(0, len(rss), tenth)))
    print("\ngoals:")
    base = min(lengths)
    for n in lengths:
        if n == base:
            continue
        key = "driver_peak_mib"
        ratio = (rows[n][key] + rows[n]["workers_peak_mib"]) / (rows[base][key] + rows[base]["workers_peak_mib"])
        goal = GOALS["real_peak_ratio"]
        print(f"  peak RSS {n} rounds / {base} rounds = {ratio:.3f} (goal <= {goal} for 200 rounds)"
              + (verdict(ratio <= goal) if n <= 200 else "  (information)"))
    sl = rows[longest]["slope_kib"]
    print(f"  RSS trend over rounds 51..{longest}: {sl:.1f} KiB/round ({sl * 1000 / 1024:.1f} MiB per 1,000 "
          f"rounds; goal |slope| <= {GOALS['real_slope_kib']:.0f} KiB/round)" + verdict(abs(sl) <= GOALS["real_slope_kib"]))


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run_child(args, backend: str, cohort: int) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--cohort", str(cohort),
           "--rounds", str(args.rounds), "--examples", str(args.examples), "--batch", str(args.batch),
           "--workers", str(args.workers), "--model", args.model]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--local-threads", str(args.local_threads or 0), "--layouts", args.layouts]
    if args.ray_in_compare:
        cmd += ["--ray-in-compare"]
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
    p.add_argument("--threads", type=int, default=None,
                   help="per Ray or processes worker (default cpus // workers)")
    p.add_argument("--local-threads", type=int, default=1,
                   help="local backend's torch threads (default 1; 0: torch's default)")
    p.add_argument("--model", choices=("small", "cnn"), default="small")
    p.add_argument("--compare-at", type=int, default=100, metavar="CLIENTS",
                   help="cohort of the interleaved ray-vs-local timing (0: skip)")
    p.add_argument("--profile", type=int, default=0, metavar="CLIENTS",
                   help="cProfile the driver of the first --backends at this cohort and exit")
    p.add_argument("--layouts", default=None, metavar="WxT,...",
                   help="processes-backend layouts in the interleaved comparison (default CORESx1,1xCORES)")
    p.add_argument("--real", action="store_true", help="memory over long runs on UNIPEN digits, seed CNN")
    p.add_argument("--real-rounds", default="30,200,1000")
    p.add_argument("--real-backend", choices=("local", "processes"), default="local")
    p.add_argument("--real-cohort", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--ray-in-compare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cohort", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.rounds = args.rounds or (6 if args.quick else 20)
    args.local_threads = args.local_threads or None
    if args.layouts is None:
        cores = available_cores()
        args.layouts = f"{cores}x1,1x{cores}"

    if args.child == "real":
        print(json.dumps(real_child(args)))
        return
    if args.real:
        real_main(args)
        return
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
    header = (f"{'backend':7} {'clients':>7} {'s/round':>8} {'driver peak':>16} {'workers peak':>16} "
              f"{'slope KiB/round':>19} {'train/client':>12} {'framework/client':>16}")
    print(header)
    print(f"{'':25}{'RSS (private) MiB':>17} {'RSS (private) MiB':>17} {'driver / workers':>19}")
    print("-" * len(header))
    rows: dict[tuple[str, int], dict] = {}
    for backend in backends:
        for cohort in cohorts:
            r = rows[backend, cohort] = run_child(args, backend, cohort)
            ray_ = backend in ("ray", "processes")  # has workers
            dp = f"{r['driver_peak_mib']:.0f} ({r['driver_private_mib']:.0f})"
            wp = f"{r['workers_peak_mib']:.0f} ({r['workers_private_mib']:.0f})" if ray_ else "-"
            sl = f"{r['private_slope_kib']:.0f}" + (f" / {r['workers_private_slope_kib']:.0f}" if ray_ else "")
            tr = f"{r['train_ms_client']:.2f} ms" if not ray_ else "-"
            fw = f"{r['framework_ms_client']:.2f} ms" if not ray_ else "-"
            print(f"{backend:7} {cohort:7d} {r['s_round']:8.3f} {dp:>16} {wp:>16} {sl:>19} {tr:>12} {fw:>16}",
                  flush=True)
    print("(slope: least squares over the second half of the rounds, of private memory; of resident "
          "memory: " + ", ".join(f"{b} {c}: {r['slope_kib']:.0f}"
                                 + (f"/{r['workers_slope_kib']:.0f}" if b in ("ray", "processes") else "")
                                 for (b, c), r in rows.items()) + " KiB/round)")

    cmp = None
    args.ray_in_compare = "ray" in backends
    if args.compare_at and "local" in backends and ({"ray", "processes"} & set(backends)):
        cmp = run_child(args, "interleaved", args.compare_at)
        print(f"\ninterleaved, {args.compare_at} clients/round, median s/round: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cmp.items()))

    print("\ngoals:")
    lo, hi = min(cohorts), max(cohorts)
    for backend in backends:
        if (backend, lo) in rows and (backend, hi) in rows and lo != hi:
            a, b = rows[backend, lo], rows[backend, hi]
            keys = ["driver_peak_mib", "driver_private_mib"]
            if backend in ("ray", "processes"):
                keys += ["workers_peak_mib", "workers_private_mib"]
            ratios = {k: b[k] / a[k] for k in keys}
            print(f"  {backend}: peak memory at {hi} / at {lo} clients: "
                  + ", ".join(f"{k.replace('_mib', '').replace('_', ' ')} {v:.2f}" for k, v in ratios.items())
                  + f" (goal <= {GOALS['peak_ratio']})" + verdict(max(ratios.values()) <= GOALS["peak_ratio"]))
    for backend in backends:
        keys = ("private_slope_kib", "workers_private_slope_kib") if backend in ("ray", "processes") else ("private_slope_kib",)
        slopes = [(abs(r[k]), r[k], c, k) for (b, c), r in rows.items() if b == backend for k in keys]
        if slopes:
            _, worst, c, k = max(slopes)
            who = "workers" if k.startswith("workers") else "driver"
            print(f"  {backend}: private memory slope at most {worst:.0f} KiB/round ({who}, {c} clients, rounds "
                  f"{args.rounds // 2 + 1}..{args.rounds}); goal ~0: |slope| <= {GOALS['slope_kib']:.0f} "
                  f"KiB/round (< {GOALS['slope_kib'] * 1000 / 1024:.0f} MiB per 1,000 rounds)"
                  + verdict(abs(worst) <= GOALS["slope_kib"]))
    local = [r for (b, c), r in rows.items() if b == "local" and c >= min(100, hi)]
    if local:
        fw = max(r["framework_ms_client"] for r in local)
        print(f"  local framework time per client: at most {fw:.2f} ms (cohorts >= {min(100, hi)}; "
              f"goal < {GOALS['framework_ms']} ms)" + verdict(fw < GOALS["framework_ms"]))
    if cmp:
        local_keys = [k for k in cmp if k.startswith("local")]
        best = min(local_keys, key=cmp.get)
        if "ray" in cmp:
            ratio = cmp["ray"] / cmp[best]
            others = "; ".join(f"against {k}: {cmp['ray'] / cmp[k]:.2f}" for k in local_keys if k != best)
            print(f"  ray ({args.workers} workers) / the faster local, {best}, at {args.compare_at} clients = "
                  f"{ratio:.2f} (goal <= {GOALS['ray_vs_local']}; {others})"
                  + verdict(ratio <= GOALS["ray_vs_local"]))
        procs = [k for k in cmp if k.startswith("processes")]
        if procs:
            fastest = min(procs, key=cmp.get)
            print(f"  processes layouts at {args.compare_at} clients: "
                  + ", ".join(f"{k} {cmp[k]:.3f} s" for k in procs)
                  + f"; the faster: {fastest} ({cmp[fastest] / cmp[best]:.2f} x {best})")


if __name__ == "__main__":
    main()
