"""Federated algorithms with and without a 1-bit uplink: accuracy, bits and seconds per round.

Every algorithm of :data:`fedzip.config.ALGORITHMS` that trains a whole model
(FedAvg weighted and unweighted, FedAvgM, FedProx, SCAFFOLD, Mime-lite,
FedSGD, FedAdam, FedYogi, FedAdagrad) runs on the same clients for the same
rounds, once with a float32 uplink and once with EDEN at 1 bit on every
tensor (``{"type": "mean", "codec": {"type": "eden", "bits": 1},
"threshold": 0}``, unweighted for the unweighted FedAvg). SCAFFOLD and
Mime-lite send a second tensor group (SCAFFOLD the control deltas
``"control"``, Mime-lite the full-batch gradient ``"grad"``) that the
aggregator's codec does not touch: their ``eden1`` rows compress the model
delta only, and one more row each compresses the extra group too
(``control_codec`` / ``grad_codec`` EDEN 1 bit: ``eden1+cc``, ``eden1+gc``).
The downlink is float32 throughout (SCAFFOLD broadcasts ``c`` and Mime-lite
its momentum besides the model).

Data: the UNIPEN writers with TFF's 62 classes (``dataset="unipen"``, 429
writers, from ``../shared/data/unipen``; skipped with a message if absent),
the 62-class CNN, batch 20, one local epoch, client SGD; and Shakespeare by
(play, role) (``dataset="shakespeare"``, 1,154 clients), the character LSTM,
batch 4, one epoch, at most ``--max-batches`` batches a client and round.
10 clients a round. Each data set is loaded once and shared by its runs.

Runs: the variants of one algorithm (float32, eden1, ...) and seed run
interleaved round by round in one process (one torch thread, one run training
at a time), so their seconds per round are measured under the same machine
load; algorithms run one after the other (their seconds per round compare
less well: the load of a shared machine drifts). Every run of a seed samples
the same clients each round (checked from the examples trained per round).

Evaluation every ``--eval-every`` rounds (default: a fifth of the rounds) and
after the last on a *fixed* sample of test clients, pooled (``--eval-clients``;
the same examples for every run and seed). The table gives the accuracy after
the last round and the mean of the last three evaluations (``last3``), its
difference to the same algorithm's float32 run (``d``, points), the
cumulative uplink (aggregated) and downlink (broadcasted) bits counted from
the bytes on the wire, how many times fewer uplink bits than that float32 run,
and the median seconds per round (training, encoding and the server step; not
evaluation); then the bits itemized by tensor group in bits per model
parameter and client (from ``aggregated_bits/group/*`` and
``broadcasted_bits/group/*``); then, per compressed run, the goal: within 1
point of its float32 run at 32x fewer uplink bits (1 bit for 32: with EDEN's
per-block scales, seeds and padding the measured ratio is about 31x, counted
as meeting it from 31x). With fewer than 3 seeds the accuracy half of the goal
is not decided (run-to-run noise on these data is 1-2.5 points): the line
says so; with 3 or more, "within" needs the mean paired difference minus two
standard errors above -1 point. A float32 run whose last-3 accuracy stays
under 0.10 learned nothing, and its compressed runs get no verdict. A plot
per data set (accuracy against rounds and against cumulative uplink bits),
``table.txt`` and ``summary.json`` go to ``--out``.

Hyperparameters (``HPARAMS``): chosen with ``--tune`` (float32 runs over the
grids in ``TUNE``, short); see the comments there and the README section.

    python benchmarks/algorithms.py [--rounds unipen=30,shakespeare=20] [--seeds 0[,1,2]]
                                    [--datasets unipen,shakespeare] [--algorithms fedavg,scaffold]
                                    [--variants float32,eden1] [--eval-every N] [--out runs/algorithms]
    python benchmarks/algorithms.py --tune --rounds unipen=12 --algorithms fedavg,fedsgd
    python benchmarks/algorithms.py --datasets unipen --algorithms mime --hp mime:beta=0.5,client_lr=0.05
    python benchmarks/algorithms.py --replot     # redraw the plots from OUT/summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
from fedzip.data.federated import ClientExamples
from fedzip.data.unipen import UNIPEN_NPZ, default_unipen_root
from fedzip.metrics import format_bits
from fedzip.run import run

CLIENTS_PER_ROUND = 10
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
EDEN1: dict[str, Any] = {"type": "eden", "bits": 1}
GOAL_POINTS, GOAL_RATIO, RATIO_COUNTED = 1.0, 32.0, 31.0
NOT_LEARNED = 0.10  # a float32 run below this last-3 accuracy learned nothing to compare against
EVAL_SAMPLE_SEED = 20240601  # the fixed test-client sample: the same for every run and seed
DATASETS = ("unipen", "shakespeare")

#: per data set: the run settings every algorithm shares
DATA_SETTINGS: dict[str, dict[str, Any]] = {
    "unipen": {"batch_size": 20, "max_batches": None, "eval_clients": 100, "rounds": 30},
    "shakespeare": {"batch_size": 4, "max_batches": 20, "eval_clients": 100, "rounds": 20},
}

#: name → one line
ALGORITHMS: dict[str, str] = {
    "fedavg": "FedAvg, clients weighted by examples (McMahan et al. 2017)",
    "fedavg_uw": "FedAvg, unweighted mean (aggregator weighted=false)",
    "fedavgm": "FedAvgM: FedAvg with server momentum 0.9 (Hsu et al. 2019)",
    "fedprox": "FedProx, mu 0.01 (Li et al. 2020)",
    "scaffold": "SCAFFOLD option II, num_clients = the training population (Karimireddy et al. 2020)",
    "mime": "Mime-lite, beta 0.9 (Karimireddy et al. 2021)",
    "fedsgd": "FedSGD, one full-batch gradient a client (McMahan et al. 2017)",
    "fedadam": "FedAdam server, tau 1e-3 (Reddi et al. 2021)",
    "fedyogi": "FedYogi server, tau 1e-3 (Reddi et al. 2021)",
    "fedadagrad": "FedAdagrad server, tau 1e-3 (Reddi et al. 2021)",
}
DEFAULT_ALGORITHMS: dict[str, list[str]] = {
    "unipen": list(ALGORITHMS),
    # the LSTM costs about as much a round as the CNN, Mime-lite twice that: the baseline and SCAFFOLD
    "shakespeare": ["fedavg", "scaffold"],
}
VARIANTS = ("float32", "eden1", "eden1+cc", "eden1+gc")
#: the extra variants, and which algorithm has them
EXTRA_VARIANT = {"eden1+cc": "scaffold", "eden1+gc": "mime"}

#: per data set and algorithm: client_lr, server_lr, server_momentum (RunConfig fields) and the
#: algorithm's own arguments (Mime-lite's beta). UNIPEN: from
#: ``--tune --datasets unipen --rounds 12 --eval-every 4`` (float32, seed 0, accuracy after 12 rounds):
#: client lr 0.1 (0.517) over 0.05 (0.436) for every local-SGD method; FedAvgM server lr 1.0 (0.468)
#: over 0.3 (0.435); FedAdam 0.03 (0.497) over 0.01 (0.478); FedYogi 0.03 (0.516) over 0.01
#: (0.478); FedAdagrad 0.01 (0.522) over 0.03 (0.388) and 0.1 (0.048, stuck); FedSGD 1.0, the
#: largest that did not diverge (3.0 went to NaN in round 8; 0.3 and 1.0 both still at the
#: majority class, 0.048, after 12 one-step rounds). Short runs favour large steps: these are
#: choices for a 30-round benchmark, not converged optima. FedProx mu 0.01 and Mime-lite beta 0.9
#: are the papers' usual values, untuned.
HPARAMS: dict[str, dict[str, dict[str, float]]] = {
    "unipen": {
        "fedavg": {"client_lr": 0.1, "server_lr": 1.0},
        "fedavg_uw": {"client_lr": 0.1, "server_lr": 1.0},
        "fedavgm": {"client_lr": 0.1, "server_lr": 1.0, "server_momentum": 0.9},
        "fedprox": {"client_lr": 0.1, "server_lr": 1.0},
        "scaffold": {"client_lr": 0.1, "server_lr": 1.0},
        "mime": {"client_lr": 0.1, "server_lr": 1.0},
        "fedsgd": {"client_lr": 0.1, "server_lr": 1.0},
        "fedadam": {"client_lr": 0.1, "server_lr": 0.03},
        "fedyogi": {"client_lr": 0.1, "server_lr": 0.03},
        "fedadagrad": {"client_lr": 0.1, "server_lr": 0.01},
    },
    # TFF's Shakespeare baseline: client SGD lr 1, server SGD lr 1 (fedavg, scaffold, mime); the
    # others are not in the default Shakespeare set and untuned there (the UNIPEN server lrs)
    "shakespeare": {
        "fedavg": {"client_lr": 1.0, "server_lr": 1.0},
        "fedavg_uw": {"client_lr": 1.0, "server_lr": 1.0},
        "fedavgm": {"client_lr": 1.0, "server_lr": 1.0, "server_momentum": 0.9},
        "fedprox": {"client_lr": 1.0, "server_lr": 1.0},
        "scaffold": {"client_lr": 1.0, "server_lr": 1.0},
        "mime": {"client_lr": 1.0, "server_lr": 1.0},
        "fedsgd": {"client_lr": 1.0, "server_lr": 1.0},
        "fedadam": {"client_lr": 1.0, "server_lr": 0.03},
        "fedyogi": {"client_lr": 1.0, "server_lr": 0.03},
        "fedadagrad": {"client_lr": 1.0, "server_lr": 0.01},
    },
}
#: --tune grids (float32 only): per algorithm, the hyperparameter settings tried
TUNE: dict[str, list[dict[str, float]]] = {
    "fedavg": [{"client_lr": 0.05}, {"client_lr": 0.1}],
    "fedavgm": [{"server_lr": 0.3}, {"server_lr": 1.0}],
    "fedsgd": [{"server_lr": 0.3}, {"server_lr": 1.0}, {"server_lr": 3.0}],
    "fedadam": [{"server_lr": 0.01}, {"server_lr": 0.03}],
    "fedyogi": [{"server_lr": 0.01}, {"server_lr": 0.03}],
    "fedadagrad": [{"server_lr": 0.01}, {"server_lr": 0.03}, {"server_lr": 0.1}],
    "mime": [{"beta": 0.5, "client_lr": 0.05}, {"beta": 0.5, "client_lr": 0.02}, {"beta": 0.9, "client_lr": 0.01}],
}


def algorithm_fields(name: str, variant: str, num_clients: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The RunConfig fields (algorithm, aggregator) of one algorithm and uplink variant; ``extra``:
    the algorithm's own arguments (e.g. Mime-lite's beta) over the defaults here."""
    weighted = name != "fedavg_uw"
    agg: dict[str, Any] = {"type": "mean"}
    if variant != "float32":
        agg.update(codec=dict(EDEN1), threshold=0)
    if not weighted:
        agg["weighted"] = False
    alg: dict[str, Any]
    if name in ("fedavg", "fedavg_uw", "fedavgm"):
        alg = {"type": "fedavg"}
    elif name == "fedprox":
        alg = {"type": "fedprox", "mu": 0.01}
    elif name == "scaffold":
        alg = {"type": "scaffold", "num_clients": num_clients}
        if variant == "eden1+cc":
            alg["control_codec"] = dict(EDEN1)
    elif name == "mime":
        alg = {"type": "mime", "beta": 0.9}
        if variant == "eden1+gc":
            alg["grad_codec"] = dict(EDEN1)
    elif name == "fedsgd":
        alg = {"type": "fedsgd"}
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        alg = {"type": name, "tau": 1e-3}  # server_lr: the config's flat server_lr (plain SGD server)
    else:
        raise ValueError(name)
    alg.update(extra or {})
    return {"algorithm": alg, "aggregator": agg if len(agg) > 1 else "mean"}


def variants_of(name: str, wanted: list[str]) -> list[str]:
    return [v for v in wanted if v in ("float32", "eden1") or EXTRA_VARIANT.get(v) == name]


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


def fixed_test_examples(test: Any, k: int) -> tuple[ClientExamples, int]:
    """``k`` test clients drawn once (all for ``k = 0``), their examples pooled."""
    ids = list(test.client_ids)
    if k and k < len(ids):
        idx = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(len(ids), size=k, replace=False))
        ids = [ids[int(i)] for i in idx]
    parts = [test.client(c) for c in ids]
    parts = [p for p in parts if len(p)]
    return ClientExamples(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])), len(ids)


def load(dataset: str, eval_clients: int) -> tuple[Any, ClientExamples, Any] | None:
    if dataset == "unipen" and not (default_unipen_root() / UNIPEN_NPZ).exists():
        print(f"skipped unipen: the UNIPEN data is not at {default_unipen_root()} (see ../shared/data/unipen)")
        return None
    try:
        train, test, info = load_dataset(dataset)
    except Exception as e:  # the offline Shakespeare needs its package
        print(f"skipped {dataset}: {type(e).__name__}: {e}")
        return None
    pooled, n = fixed_test_examples(test, eval_clients)
    print(f"data {dataset}: {info.description}; {len(train.client_ids)} training clients; evaluation on "
          f"{n} fixed test clients ({len(pooled)} examples, pooled)", flush=True)
    return train, pooled, info


def run_group(jobs: list[dict[str, Any]], data: tuple, t_start: float) -> None:
    """The jobs interleaved round by round (one trains at a time)."""
    baton = Baton([j["key"] for j in jobs])

    def work(job: dict[str, Any]) -> None:
        key = job["key"]

        def on_round(state, m: dict[str, Any]) -> None:
            job["history"].append(m)
            if "eval/accuracy" in m or m["round"] == 1:
                acc = f"acc {m['eval/accuracy']:.4f}" if "eval/accuracy" in m else "acc   -   "
                print(f"  [{key:34s}] round {m['round']:4d}  {acc}  train loss {m['train/loss']:.3f}  "
                      f"up {format_bits(m['aggregated_bits/cumulative']):>11s}  "
                      f"{m['time/round_s']:.2f} s/round  ({time.perf_counter() - t_start:.0f} s)", flush=True)
            baton.pass_on(key)
            baton.wait(key)

        baton.wait(key)
        try:
            res = run(job["config"], logdir=job["logdir"], data=data, console=False, on_round=on_round)
            job["num_params"] = sum(int(v.numel()) for v in res.state.params.values())
        except BaseException as e:  # reported with the table
            job["error"] = e
        finally:
            baton.pass_on(key, finished=True)

    threads = [threading.Thread(target=work, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(1.0)


def summarize(job: dict[str, Any]) -> dict[str, Any]:
    hist = job["history"]
    evals = [m for m in hist if "eval/accuracy" in m]
    last3 = [m["eval/accuracy"] for m in evals[-3:]]
    groups: dict[str, dict[str, int]] = {"up": {}, "down": {}}
    for m in hist:
        for k, v in m.items():
            for prefix, side in (("aggregated_bits/group/", "up"), ("broadcasted_bits/group/", "down")):
                if k.startswith(prefix):
                    g = k[len(prefix):]
                    groups[side][g] = groups[side].get(g, 0) + int(v)
    # algorithms that send the model alone report no groups: their tensor bits are the model's
    for side, key in (("up", "aggregated_bits/tensors"), ("down", "broadcasted_bits/tensors")):
        if not groups[side]:
            groups[side]["model"] = sum(int(m.get(key, 0)) for m in hist)
    return {
        "dataset": job["dataset"], "algorithm": job["algorithm"], "variant": job["variant"],
        "seed": job["seed"], "tune": job.get("tune"), "rounds": len(hist),
        "final": evals[-1]["eval/accuracy"] if evals else float("nan"),
        "last3": sum(last3) / len(last3) if last3 else float("nan"),
        "up": hist[-1]["aggregated_bits/cumulative"], "down": hist[-1]["broadcasted_bits/cumulative"],
        "groups": groups, "num_params": job.get("num_params", 0),
        "s_round": statistics.median(m["time/round_s"] for m in hist),
        "eval_s": sum(m.get("time/eval_s", 0.0) for m in hist),
        "diverged": sum(int(m.get("train/diverged_clients", 0)) for m in hist),
        "examples": [m["train/num_examples"] for m in hist],
        "curve": [(m["round"], m["aggregated_bits/cumulative"], m["eval/accuracy"]) for m in evals],
        "config": job["config"].to_dict(),
    }


def parse_rounds(text: str) -> dict[str, int]:
    """``30`` (every data set) or ``unipen=30,shakespeare=20``."""
    out = {d: s["rounds"] for d, s in DATA_SETTINGS.items()}
    if not text.strip():
        return out
    if "=" not in text:
        return dict.fromkeys(out, int(text))
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in out:
            raise argparse.ArgumentTypeError(f"--rounds: unknown data set {k!r}")
        out[k.strip()] = int(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=parse_rounds, default=parse_rounds(""),
                    help="rounds: N for every data set, or unipen=30,shakespeare=20 (the defaults)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}")
    ap.add_argument("--algorithms", default="",
                    help=f"comma-separated subset of {list(ALGORITHMS)} (default: all on unipen, "
                         f"{DEFAULT_ALGORITHMS['shakespeare']} on shakespeare)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0: one seed)")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N rounds (default: rounds/5)")
    ap.add_argument("--max-batches", type=int, default=DATA_SETTINGS["shakespeare"]["max_batches"],
                    help="Shakespeare: batches per client per round (0: no cap)")
    ap.add_argument("--hp", action="append", default=[], metavar="ALG:key=value,...",
                    help="override an algorithm's hyperparameters (RunConfig fields or the algorithm's own "
                         "arguments), e.g. --hp mime:beta=0.5,client_lr=0.05; the rows are labelled with it")
    ap.add_argument("--tune", action="store_true",
                    help="float32 runs over the TUNE grids of the chosen algorithms instead of the benchmark")
    ap.add_argument("--out", default="runs/algorithms", help="metrics, TensorBoard logs, table and plots")
    ap.add_argument("--replot", action="store_true",
                    help="redraw the plots and reprint the table from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        for ds in dict.fromkeys(r["dataset"] for r in summary["rows"]):
            plot([r for r in summary["rows"] if r["dataset"] == ds], out / f"algorithms_{ds}.png",
                 summary["titles"][ds])
        print("\n".join(report(summary["rows"], summary["seeds"], False)))
        return 0
    datasets = [d for d in args.datasets.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    algs = [a for a in args.algorithms.split(",") if a]
    for what, got, allowed in (("--datasets", datasets, DATASETS), ("--variants", variants, VARIANTS),
                               ("--algorithms", algs, list(ALGORITHMS))):
        bad = sorted(set(got) - set(allowed))
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {list(allowed)}")
    if not datasets or not variants or not seeds:
        ap.error("--datasets, --variants and --seeds need at least one value")
    overrides: dict[str, dict[str, Any]] = {}
    for spec in args.hp:
        alg_name, _, rest = spec.partition(":")
        if alg_name not in ALGORITHMS or not rest:
            ap.error(f"--hp {spec!r}: give ALG:key=value,... with ALG one of {list(ALGORITHMS)}")
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                ap.error(f"--hp {spec!r}: {part!r} is not key=value")
            overrides.setdefault(alg_name, {})[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
    if args.tune:
        variants = ["float32"]
        if not algs:
            algs = list(TUNE)
    DATA_SETTINGS["shakespeare"]["max_batches"] = args.max_batches or None

    torch.set_num_threads(1)
    if args.tune:
        out = out / "tune"
    print(f"{'tuning' if args.tune else 'benchmark'}: {CLIENTS_PER_ROUND} clients a round, 1 local epoch, "
          f"client SGD; seeds {seeds}; {torch.get_num_threads()} torch thread "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); variants of an algorithm "
          "interleaved round by round", flush=True)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    titles: dict[str, str] = {}
    same_clients = True
    for ds in datasets:
        settings = DATA_SETTINGS[ds]
        data = load(ds, settings["eval_clients"])
        if data is None:
            continue
        rounds = args.rounds[ds]
        eval_every = args.eval_every or max(1, rounds // 5)
        num_clients = len(data[0].client_ids)
        names = algs or DEFAULT_ALGORITHMS[ds]
        print(f"{ds}: {rounds} rounds, batch {settings['batch_size']}, at most "
              f"{settings['max_batches'] or 'all'} batches a client, evaluation every {eval_every} rounds; "
              f"algorithms {names}", flush=True)
        titles[ds] = (f"{ds}: {CLIENTS_PER_ROUND} clients/round, {rounds} rounds, batch {settings['batch_size']}, "
                      f"seeds {seeds}; solid float32, dashed EDEN 1 bit, dotted + extra group at 1 bit")
        ds_rows: list[dict[str, Any]] = []
        for name in names:
            grid = TUNE.get(name, [{}]) if args.tune else [overrides.get(name, {})]
            for seed in seeds:
                jobs = []
                for over in grid:
                    for variant in variants_of(name, variants):
                        both = {**HPARAMS[ds][name], **over}
                        # RunConfig fields; the rest are the algorithm's own arguments (beta, mu)
                        hp = {k: v for k, v in both.items() if k in RUN_FIELDS}
                        alg_args = {k: v for k, v in both.items() if k not in RUN_FIELDS}
                        tag = ",".join(f"{k}={v:g}" for k, v in over.items())
                        label = f"{name}[{tag}]" if tag else name
                        fields = {"dataset": ds, "rounds": rounds, "clients_per_round": CLIENTS_PER_ROUND,
                                  "batch_size": settings["batch_size"], "epochs": 1,
                                  "max_batches": settings["max_batches"], "eval_every": eval_every, "seed": seed,
                                  "name": f"{ds}/{label}/{variant}/seed{seed}"}
                        fields.update(hp)  # --hp may change any of them (max_batches, say)
                        cfg = RunConfig(**fields, **algorithm_fields(name, variant, num_clients, alg_args))
                        jobs.append({"key": f"{ds}/{label}/{variant}/s{seed}", "dataset": ds,
                                     "algorithm": label, "variant": variant, "seed": seed, "tune": over or None,
                                     "config": cfg, "logdir": out / ds / label / variant / f"seed{seed}",
                                     "history": [], "error": None})
                run_group(jobs, data, t_start)
                for j in jobs:
                    if j["error"] is not None or not j["history"]:
                        failed.append(f"{j['key']}: {type(j['error']).__name__}: {j['error']}")
                        print(f"  FAILED {failed[-1]}", file=sys.stderr, flush=True)
                        continue
                    ds_rows.append(summarize(j))
                done = [r for r in ds_rows if r["seed"] == seed and r["algorithm"].split("[")[0] == name]
                same_clients &= all(r["examples"] == done[0]["examples"] for r in done)
        rows += ds_rows
        if ds_rows:
            out.mkdir(parents=True, exist_ok=True)
            plot(ds_rows, out / f"algorithms_{ds}.png", titles[ds])
    wall = time.perf_counter() - t_start
    if not rows:
        print("nothing ran")
        return 1 if failed else 0

    lines = report(rows, seeds, args.tune)
    lines.insert(0, f"clients: {'the same' if same_clients else 'NOT the same'} in every run of a seed, round by "
                    f"round (checked: examples trained per round); {wall / 60:.1f} min wall for {len(rows)} runs")
    for f in failed:
        lines.append(f"FAILED {f}")
    text = "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"argv": sys.argv[1:], "seeds": seeds, "rounds": args.rounds, "wall_s": wall, "titles": titles,
         "same_clients": same_clients, "rows": rows}, indent=1, default=str))
    print(f"\nplots: {out}/algorithms_<dataset>.png; table: {out / 'table.txt'}; summary: {out / 'summary.json'}")
    return 1 if failed else 0


def _bpp(bits: int, r: dict[str, Any]) -> float:
    """Bits per model parameter, client and round."""
    return bits / (r["num_params"] * r["rounds"] * CLIENTS_PER_ROUND) if r["num_params"] else float("nan")


def report(rows: list[dict[str, Any]], seeds: list[int], tune: bool) -> list[str]:
    refs = {(r["dataset"], r["algorithm"], r["seed"]): r for r in rows if r["variant"] == "float32"}
    for r in rows:
        ref = refs.get((r["dataset"], r["algorithm"], r["seed"]))
        r["x_fewer"] = ref["up"] / r["up"] if ref else float("nan")
        r["d_points"] = 100 * (r["last3"] - ref["last3"]) if ref else float("nan")
    w = max(11, *(len(r["algorithm"]) for r in rows))
    L = [f"\n{'data':11s} {'algorithm':{w}s} {'uplink':9s} {'seed':>4s} {'final':>7s} {'last3':>7s} {'d(last3)':>9s} "
         f"{'uplink':>11s} {'x fewer':>7s} {'downlink':>11s} {'s/round':>7s}"]
    for r in rows:
        div = f"  ({r['diverged']} diverged client-rounds)" if r["diverged"] else ""
        d = "" if r["variant"] == "float32" else f"{r['d_points']:+6.2f} pt"
        L.append(f"{r['dataset']:11s} {r['algorithm']:{w}s} {r['variant']:9s} {r['seed']:4d} {r['final']:7.4f} "
                 f"{r['last3']:7.4f} {d:>9s} {format_bits(r['up']):>11s} {r['x_fewer']:7.1f} "
                 f"{format_bits(r['down']):>11s} {r['s_round']:7.2f}{div}")
    if tune:
        return L
    L.append("\nbits itemized by tensor group, per model parameter, client and round "
             "(uplink = aggregated_bits/group/*, downlink = broadcasted_bits/group/*; "
             "framing and scalars not in the groups):")
    for r in rows:
        if r["seed"] != seeds[0]:
            continue
        up = " + ".join(f"{g} {_bpp(b, r):.3f}" for g, b in r["groups"]["up"].items())
        down = " + ".join(f"{g} {_bpp(b, r):.3f}" for g, b in r["groups"]["down"].items())
        up_tot = " + ".join(f"{g} {format_bits(b)}" for g, b in r["groups"]["up"].items())
        L.append(f"{r['dataset']:11s} {r['algorithm']:11s} {r['variant']:9s} up: {up:34s} down: {down:30s}"
                 f" (uplink {up_tot})")
    multi = len(seeds) > 1
    per: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        per.setdefault((r["dataset"], r["algorithm"], r["variant"]), []).append(r)
    if multi:
        L.append(f"\nmean over seeds {seeds} (+- sample std of the paired difference to float32):")
        for (ds, alg, var), rs in per.items():
            d = [r["d_points"] for r in rs]
            L.append(f"{ds:11s} {alg:11s} {var:9s} last3 {statistics.mean(r['last3'] for r in rs):.4f}  "
                     f"d {statistics.mean(d):+.2f} +- {statistics.stdev(d) if len(d) > 1 else float('nan'):.2f} pt"
                     f"  x fewer {statistics.mean(r['x_fewer'] for r in rs):.1f}")
    L.append("")
    for (ds, alg, var), rs in per.items():
        if var == "float32" or any(r["x_fewer"] != r["x_fewer"] for r in rs):
            continue
        d = statistics.mean(r["d_points"] for r in rs)
        ratio = statistics.mean(r["x_fewer"] for r in rs)
        acc_ratio = statistics.mean(r["last3"] for r in rs) / statistics.mean(
            refs[(ds, alg, r["seed"])]["last3"] for r in rs)
        bits_ok = ratio >= RATIO_COUNTED
        ref_last3 = statistics.mean(refs[(ds, alg, r["seed"])]["last3"] for r in rs)
        if ref_last3 < NOT_LEARNED:
            acc = f"not compared: the float32 run did not learn (last3 {ref_last3:.3f} < {NOT_LEARNED:g})"
        elif len(rs) >= 3:
            se = statistics.stdev([r["d_points"] for r in rs]) / len(rs) ** 0.5
            acc = f"{'within' if d - 2 * se >= -GOAL_POINTS else 'NOT shown within'} {GOAL_POINTS:g} pt " \
                  f"(mean - 2 s.e. = {d - 2 * se:+.2f} pt, {len(rs)} seeds)"
        else:
            acc = f"undecided: {len(rs)} seed{'s' if len(rs) > 1 else ''}, run-to-run noise 1-2.5 pt"
        verdict = ("bits met" if bits_ok else f"bits MISSED ({ratio:.1f}x < {RATIO_COUNTED:g}x)") + "; accuracy " + acc
        L.append(f"ratio {ds} {alg} {var} / float32 accuracy = {acc_ratio:.4f} ({d:+.2f} pt) at {ratio:.1f}x fewer "
                 f"uplink bits (goal: within {GOAL_POINTS:g} pt at {GOAL_RATIO:g}x nominal, >= {RATIO_COUNTED:g}x "
                 f"measured: {verdict})")
    return L


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(16, 6), sharey=True)
    colors = plt.get_cmap("tab10").colors
    algs = list(dict.fromkeys(r["algorithm"] for r in rows))
    styles = {"float32": "-", "eden1": "--", "eden1+cc": ":", "eden1+gc": ":"}
    for key in dict.fromkeys((r["algorithm"], r["variant"]) for r in rows):
        rs = [r for r in rows if (r["algorithm"], r["variant"]) == key and r["curve"]]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        rounds = [c[0] for c in rs[0]["curve"][:n]]
        bits = [statistics.mean(r["curve"][k][1] for r in rs) for k in range(n)]
        acc = [statistics.mean(r["curve"][k][2] for r in rs) for k in range(n)]
        name = f"{key[0]} {key[1]}" + (f" (mean of {len(rs)} seeds)" if len(rs) > 1 else "")
        style = {"color": colors[algs.index(key[0]) % len(colors)], "linestyle": styles.get(key[1], "-"),
                 "marker": ".", "label": name}
        ax_r.plot(rounds, acc, **style)
        ax_b.plot(bits, acc, **style)
    ax_r.set_xlabel("round")
    ax_r.set_ylabel("test accuracy (fixed test clients)")
    ax_b.set_xscale("log")
    ax_b.set_xlabel("cumulative uplink bits")
    ax_r.grid(True, alpha=0.3)
    ax_b.grid(True, which="both", alpha=0.3)
    handles, labels = ax_b.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
