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
10 clients a round.

Runs: one sweep (:mod:`fedzip.sweep`) per data set, into ``OUT/<dataset>``:
one variant per (algorithm, uplink) pair, labelled ``fedavg.float32``,
``scaffold.eden1+cc`` and so on (a run folder's name holds ``A-Za-z0-9._+-``,
so no ``/``), crossed with the seeds (``--seeds``, default 0,1,2). Every run
is a process of its own that loads its data itself, ``--jobs`` at a time
(default 2, or the number of cores if fewer) with ``--threads`` torch threads
each (default the cores over the jobs). Running the command again skips the
runs that completed and resumes the interrupted ones from their newest
checkpoint (three a run), so an interrupted benchmark goes on where it
stopped. A seed changes the clients sampled, the model's initialization, the
codecs' randomness and the sample of test clients; every run of a seed
samples the same clients each round (checked from the examples trained per
round), so within a seed only the algorithm and the uplink differ. Seconds
per round compare less well than accuracy and bits: the runs of an algorithm
run at different times, each beside another run, so a drifting machine load
(a shared machine's) shows up in their times.

Checkpoints: SCAFFOLD keeps a model-sized ``c_i`` for every client it has
sampled, and its checkpoints hold them (about 1.5 GB after 30 UNIPEN rounds).
A run's checkpoints are therefore deleted once it completes
(``--keep-checkpoints N`` keeps its newest N); a completed run then asked for
more rounds starts again from round 0.

Evaluation every ``--eval-every`` rounds (default: a fifth of the rounds) and
after the last, on 100 test clients pooled (the ``eval_clients`` field: a
sample drawn from the run's seed, the same at every evaluation and in every
run of that seed). The table gives, per data set, algorithm and uplink, over
the seeds: the accuracy after the last round and the mean of the last three
evaluations (``last3``) as mean ± sample standard deviation (n - 1); ``d``,
the paired difference in last-3 accuracy to the same algorithm's float32 run
of the same seed, in points, mean ± sd with its 95% t-interval
(:func:`fedzip.sweep.t_interval`); the cumulative uplink (aggregated) and
downlink (broadcasted) bits counted from the bytes on the wire and how many
times fewer than that float32 run; the median seconds per round (training,
encoding and the server step; not evaluation) over every round of every
seed. Then the bits itemized by tensor group in bits per model parameter,
client and round (from ``aggregated_bits/group/*`` and
``broadcasted_bits/group/*``); then, per compressed row, the goal: within 1
point of its float32 run at 32x fewer uplink bits (1 bit for 32: with EDEN's
per-block scales, seeds and padding the measured ratio is about 31x, counted
as meeting it from 31x). "Within" is claimed only where the lower end of the
95% t-interval of ``d`` is above -1 point; with fewer than 2 seeds there is no
interval and the accuracy half is "not decided". A float32 run whose last-3
accuracy stays under 0.10 learned nothing, and its compressed rows get no
verdict. A plot per data set (accuracy against rounds and against cumulative
uplink bits: the mean over seeds with its 95% t-interval as a band),
``table.txt`` and ``summary.json`` go to ``--out``; each sweep's own
``results.csv`` and ``groups.csv`` to ``OUT/<dataset>``.

Hyperparameters (``HPARAMS``): chosen with ``--tune`` (float32 runs over the
grids in ``TUNE``, short, one seed by default, through a sweep too, into
``OUT/tune``); see the comments there and the README section.

    python benchmarks/algorithms.py [--rounds unipen=30,shakespeare=20] [--seeds 0,1,2]
                                    [--datasets unipen,shakespeare] [--algorithms fedavg,scaffold]
                                    [--variants float32,eden1] [--eval-every N] [--jobs 2] [--threads 1]
                                    [--out runs/algorithms_sweep]
    python benchmarks/algorithms.py --tune --rounds unipen=12 --algorithms fedavg,fedsgd
    python benchmarks/algorithms.py --datasets unipen --algorithms mime --hp mime:beta=0.5,client_lr=0.05
    python benchmarks/algorithms.py --replot     # redraw the plots and the table from OUT/summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedzip.config import RunConfig
from fedzip.errors import ConfigError
from fedzip.metrics import format_bits, read_jsonl
from fedzip.sweep import Sweep, SweepResult, json_safe, mean_sd, run_sweep, t_interval

CLIENTS_PER_ROUND = 10
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
EDEN1: dict[str, Any] = {"type": "eden", "bits": 1}
GOAL_POINTS, GOAL_RATIO, RATIO_COUNTED = 1.0, 32.0, 31.0
NOT_LEARNED = 0.10  # a float32 run below this last-3 accuracy learned nothing to compare against
CHECKPOINTS_PER_RUN = 3  # enough to resume; SCAFFOLD's are large (its per-client c_i)
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
    """The uplink variants of ``wanted`` that algorithm ``name`` has (the extra-group ones are
    SCAFFOLD's and Mime-lite's alone)."""
    return [v for v in wanted if v in ("float32", "eden1") or EXTRA_VARIANT.get(v) == name]


# --------------------------------------------------------------------------
# The sweeps
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One (algorithm, uplink) pair of a data set: a variant of its sweep."""

    label: str                    # the sweep's variant label, "<algorithm>.<uplink>"
    algorithm: str                # the table's algorithm: its name, with [key=value,...] if overridden
    variant: str                  # float32, eden1, eden1+cc, eden1+gc
    tune: dict[str, Any] | None   # the --tune or --hp settings over HPARAMS
    fields: dict[str, Any]        # RunConfig fields over the data set's base


def plan_entries(dataset: str, names: list[str], variants: list[str], overrides: dict[str, dict[str, Any]],
                 tune: bool, num_clients: int) -> list[Entry]:
    """Every (algorithm, uplink) pair of one data set; with ``tune``, one per TUNE setting."""
    out = []
    for name in names:
        grid = TUNE.get(name, [{}]) if tune else [overrides.get(name, {})]
        for over in grid:
            both = {**HPARAMS[dataset][name], **over}
            # RunConfig fields; the rest are the algorithm's own arguments (beta, mu)
            hp = {k: v for k, v in both.items() if k in RUN_FIELDS}
            alg_args = {k: v for k, v in both.items() if k not in RUN_FIELDS}
            tag = ",".join(f"{k}={v:g}" for k, v in over.items())
            label = f"{name}[{tag}]" if tag else name
            for variant in variants_of(name, variants):
                fields = {**hp, **algorithm_fields(name, variant, num_clients, alg_args)}
                out.append(Entry(f"{label}.{variant}", label, variant, dict(over) or None, fields))
    return out


def base_fields(dataset: str, rounds: int, eval_every: int, max_batches: int | None) -> dict[str, Any]:
    """The RunConfig fields every run of a data set shares."""
    settings = DATA_SETTINGS[dataset]
    return {"dataset": dataset, "rounds": rounds, "clients_per_round": CLIENTS_PER_ROUND,
            "batch_size": settings["batch_size"], "epochs": 1, "max_batches": max_batches,
            "eval_every": eval_every, "eval_clients": settings["eval_clients"],
            "checkpoint_every": max(1, rounds // CHECKPOINTS_PER_RUN)}


def build_sweep(name: str, base: dict[str, Any], entries: list[Entry], seeds: list[int]) -> Sweep:
    """One data set's benchmark as a sweep: a variant per entry, crossed with the seeds."""
    return Sweep.from_dict({"name": name, "base": base, "grid": {"seed": seeds},
                            "variants": {e.label: e.fields for e in entries}})


def data_facts(dataset: str) -> tuple[int, int] | None:
    """(training clients, model parameters) of a data set; None, with a message, where its data
    is missing. SCAFFOLD needs the first, the bits per parameter the second."""
    from fedzip.data import load_dataset
    from fedzip.data.unipen import UNIPEN_NPZ, default_unipen_root
    from fedzip.run import build_algorithm

    if dataset == "unipen" and not (default_unipen_root() / UNIPEN_NPZ).exists():
        print(f"skipped unipen: the UNIPEN data is not at {default_unipen_root()} (see ../shared/data/unipen)")
        return None
    try:
        train, _, info = load_dataset(dataset)
    except Exception as e:  # noqa: BLE001 - the offline Shakespeare needs its package
        print(f"skipped {dataset}: {type(e).__name__}: {e}")
        return None
    params = build_algorithm(RunConfig(dataset=dataset), info).init().params
    print(f"data {dataset}: {info.description}; {len(train.client_ids)} training clients", flush=True)
    return len(train.client_ids), sum(int(v.numel()) for v in params.values())


# --------------------------------------------------------------------------
# Per run, then per (algorithm, uplink) over the seeds
# --------------------------------------------------------------------------


def summarize_history(hist: list[dict[str, Any]], num_params: int,
                      clients_per_round: int = CLIENTS_PER_ROUND) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl lines: accuracy, bits (in all and per tensor
    group, per parameter, client and round), seconds per round and the examples per round."""
    evals = [m for m in hist if m.get("eval/accuracy") is not None]
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
        # the model first, then the extra group (metrics.jsonl's keys come sorted)
        groups[side] = dict(sorted(groups[side].items(), key=lambda kv: kv[0] != "model"))
    per = num_params * len(hist) * clients_per_round
    return {
        "rounds": len(hist), "num_params": num_params,
        "final": evals[-1]["eval/accuracy"] if evals else math.nan,
        "last3": sum(last3) / len(last3) if last3 else math.nan,
        "up": hist[-1]["aggregated_bits/cumulative"], "down": hist[-1]["broadcasted_bits/cumulative"],
        "groups": groups,
        "bpp": {side: {g: b / per if per else math.nan for g, b in bits.items()} for side, bits in groups.items()},
        "round_s": [m["time/round_s"] for m in hist],
        "eval_s": sum(m.get("time/eval_s", 0.0) for m in hist),
        "diverged": sum(int(m.get("train/diverged_clients", 0)) for m in hist),
        "examples": [m["train/num_examples"] for m in hist],
        "curve": [(m["round"], m["aggregated_bits/cumulative"], m["eval/accuracy"]) for m in evals],
    }


def collect(result: SweepResult, entries: list[Entry], dataset: str, num_params: int) -> list[dict[str, Any]]:
    """One row per complete run of a data set's sweep, from its metrics.jsonl."""
    meta = {e.label: e for e in entries}
    table = {row["name"]: row for row in result.rows}
    rows = []
    for run in result.runs:
        if table.get(run.name, {}).get("status") != "complete":
            continue
        e = meta[run.variant]
        hist = read_jsonl(result.logdir / run.name / "metrics.jsonl")
        if not hist:
            continue
        rows.append({"dataset": dataset, "algorithm": e.algorithm, "variant": e.variant, "seed": run.config.seed,
                     "tune": e.tune, "run": run.name, "wall_s": table[run.name].get("wall_s"),
                     **summarize_history(hist, num_params, run.config.clients_per_round),
                     "config": run.config.to_dict()})
    return rows


def client_mismatches(rows: list[dict[str, Any]]) -> list[str]:
    """The (data set, algorithm, seed) whose runs did not train the same examples round by round:
    they did not sample the same clients, and their paired difference means less."""
    first: dict[tuple[str, str, int], list[int]] = {}
    bad = []
    for r in rows:
        key = (r["dataset"], r["algorithm"], r["seed"])
        if first.setdefault(key, r["examples"]) != r["examples"] and key not in bad:
            bad.append(key)
    return [f"{ds} {alg} seed {s}" for ds, alg, s in bad]


def mean_curve(runs: list[dict[str, Any]]) -> list[list[float]]:
    """[round, mean cumulative uplink bits, mean accuracy, 95% t-interval low, high] at every
    round all the runs evaluated."""
    per_run = [{c[0]: c for c in r["curve"]} for r in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    out = []
    for rnd in rounds:
        mean, low, high = t_interval([p[rnd][2] for p in per_run])
        out.append([rnd, statistics.mean(p[rnd][1] for p in per_run), mean, low, high])
    return out


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (data set, algorithm, uplink), over its seeds: accuracy mean ± sd, the paired
    difference ``d`` to the same algorithm's float32 run of each seed (points) with its 95%
    t-interval, bits and how many times fewer, the median seconds per round, the bits per group."""
    per: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        per.setdefault((r["dataset"], r["algorithm"], r["variant"]), []).append(r)
    refs = {(r["dataset"], r["algorithm"], r["seed"]): r for r in rows if r["variant"] == "float32"}
    out = []
    for (ds, alg, var), rs in per.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        pairs = [(r, refs[(ds, alg, r["seed"])]) for r in rs if (ds, alg, r["seed"]) in refs]
        d = [100 * (r["last3"] - f["last3"]) for r, f in pairs] if var != "float32" else []
        d_mean, d_low, d_high = t_interval(d)
        final, final_sd = mean_sd([r["final"] for r in rs])
        last3, last3_sd = mean_sd([r["last3"] for r in rs])
        sides = {side: list(dict.fromkeys(g for r in rs for g in r["bpp"][side])) for side in ("up", "down")}
        out.append({
            "dataset": ds, "algorithm": alg, "variant": var, "tune": rs[0]["tune"], "n": len(rs),
            "seeds": [r["seed"] for r in rs],
            "final": final, "final_sd": final_sd, "last3": last3, "last3_sd": last3_sd,
            "last3_by_seed": {str(r["seed"]): r["last3"] for r in rs},
            "n_paired": len(d), "d": d_mean, "d_sd": mean_sd(d)[1], "d_ci95": [d_low, d_high],
            "d_by_seed": {str(r["seed"]): x for (r, _), x in zip(pairs, d, strict=False)},
            "ref_last3": statistics.mean(f["last3"] for _, f in pairs) if pairs else math.nan,
            "up": statistics.mean(r["up"] for r in rs), "down": statistics.mean(r["down"] for r in rs),
            "x_fewer_up": statistics.mean(f["up"] / r["up"] for r, f in pairs) if pairs else math.nan,
            "x_fewer_down": statistics.mean(f["down"] / r["down"] for r, f in pairs) if pairs else math.nan,
            "s_round": statistics.median(t for r in rs for t in r["round_s"]),
            "bpp": {side: {g: statistics.mean(r["bpp"][side].get(g, 0.0) for r in rs) for g in gs}
                    for side, gs in sides.items()},
            "groups": {side: {g: statistics.mean(r["groups"][side].get(g, 0) for r in rs) for g in gs}
                       for side, gs in sides.items()},
            "diverged": sum(r["diverged"] for r in rs),
            "curve": mean_curve(rs),
        })
        out[-1]["goal"], out[-1]["verdict"] = goal(out[-1])
    return out


def goal(g: dict[str, Any]) -> tuple[str | None, str]:
    """(status, the sentence) of a compressed row's goal: within GOAL_POINTS of its float32 at
    >= RATIO_COUNTED x fewer uplink bits. Status: met, not met, not decided (fewer than 2 seeds:
    no interval), no verdict (no float32 to compare, or one that learned nothing); None for float32."""
    if g["variant"] == "float32":
        return None, ""
    if not g["n_paired"]:
        return "no verdict", "no float32 run of the same seeds to compare with"
    ratio = g["x_fewer_up"]
    bits_ok = ratio >= RATIO_COUNTED
    bits = f"{ratio:.1f}x fewer uplink bits, " + ("met" if bits_ok else f"MISSED (< {RATIO_COUNTED:g}x)")
    low, high = g["d_ci95"]
    interval = f"d {g['d']:+.2f} pt, 95% t-interval [{low:+.2f}, {high:+.2f}]"
    if g["ref_last3"] < NOT_LEARNED:
        return "no verdict", (f"the float32 runs did not learn (last3 {g['ref_last3']:.3f} < "
                              f"{NOT_LEARNED:g}); {bits}")
    if g["n_paired"] < 2:
        return "not decided", (f"accuracy not decided (d {g['d']:+.2f} pt on one seed: no interval); {bits}")
    if low > -GOAL_POINTS:
        acc = f"accuracy within {GOAL_POINTS:g} pt ({interval}, {g['n_paired']} seeds: lower end above " \
              f"-{GOAL_POINTS:g})"
        return ("met" if bits_ok else "not met"), f"{acc}; {bits}"
    acc = f"accuracy NOT shown within {GOAL_POINTS:g} pt ({interval}, {g['n_paired']} seeds: lower end not " \
          f"above -{GOAL_POINTS:g})"
    return "not met", f"{acc}; {bits}"


# --------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------


def _pm(m: float, sd: float, digits: int, sign: str = "") -> str:
    """``m ± sd`` (``m`` alone where sd is not a number: one seed); ``sign="+"`` signs ``m``."""
    if m is None or not math.isfinite(m):
        return ""
    return f"{m:{sign}.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None and math.isfinite(sd) else "")


def report(groups: list[dict[str, Any]], tune: bool) -> list[str]:
    """The table, the bits by tensor group and the goal lines."""
    w = max(11, *(len(g["algorithm"]) for g in groups))
    L = [f"{'data':11s} {'algorithm':{w}s} {'uplink':9s} {'n':>2s} {'final':>15s} {'last3':>15s} "
         f"{'d(last3), pt':>14s} {'d 95% t-int.':>16s} {'uplink':>11s} {'x fewer':>7s} {'downlink':>11s} "
         f"{'x fewer':>7s} {'s/round':>7s}"]
    for g in groups:
        base = g["variant"] == "float32"
        lo, hi = g["d_ci95"]
        ci = f"[{lo:+.2f}, {hi:+.2f}]" if lo is not None and math.isfinite(lo) else ""
        div = f"  ({g['diverged']} diverged client-rounds)" if g["diverged"] else ""
        L.append(f"{g['dataset']:11s} {g['algorithm']:{w}s} {g['variant']:9s} {g['n']:2d} "
                 f"{_pm(g['final'], g['final_sd'], 4):>15s} {_pm(g['last3'], g['last3_sd'], 4):>15s} "
                 f"{'' if base else _pm(g['d'], g['d_sd'], 2, '+'):>14s} {ci:>16s} {format_bits(g['up']):>11s} "
                 f"{1.0 if base else g['x_fewer_up']:7.1f} {format_bits(g['down']):>11s} "
                 f"{1.0 if base else g['x_fewer_down']:7.1f} {g['s_round']:7.2f}{div}")
    if tune:
        return L
    L.append("\nbits itemized by tensor group, per model parameter, client and round, mean over seeds "
             "(uplink = aggregated_bits/group/*, downlink = broadcasted_bits/group/*; framing and scalars "
             "not in the groups):")
    for g in groups:
        up = " + ".join(f"{k} {v:.3f}" for k, v in g["bpp"]["up"].items())
        down = " + ".join(f"{k} {v:.3f}" for k, v in g["bpp"]["down"].items())
        up_tot = " + ".join(f"{k} {format_bits(v)}" for k, v in g["groups"]["up"].items())
        L.append(f"{g['dataset']:11s} {g['algorithm']:{w}s} {g['variant']:9s} up: {up:34s} down: {down:30s}"
                 f" (uplink {up_tot})")
    L.append(f"\ngoal: within {GOAL_POINTS:g} pt of the same algorithm's float32 at {GOAL_RATIO:g}x fewer "
             f"uplink bits (>= {RATIO_COUNTED:g}x measured); 'within' only where the lower end of the 95% "
             f"t-interval of the paired difference d is above -{GOAL_POINTS:g} pt")
    for g in groups:
        if g["goal"] is not None:
            L.append(f"{g['dataset']} {g['algorithm']} {g['variant']}: {g['goal'].upper()}: {g['verdict']}")
    return L


def plot(groups: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against rounds and against cumulative uplink bits: each row's mean over seeds,
    its 95% t-interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(16, 6), sharey=True)
    colors = plt.get_cmap("tab10").colors
    algs = list(dict.fromkeys(g["algorithm"] for g in groups))
    styles = {"float32": "-", "eden1": "--", "eden1+cc": ":", "eden1+gc": ":"}
    for g in groups:
        if not g["curve"]:
            continue
        rounds, bits, acc, low, high = zip(*g["curve"], strict=True)
        color = colors[algs.index(g["algorithm"]) % len(colors)]
        label = f"{g['algorithm']} {g['variant']}" + (f" (n={g['n']})" if g["n"] > 1 else "")
        for ax, xs in ((ax_r, rounds), (ax_b, bits)):
            ax.plot(xs, acc, color=color, linestyle=styles.get(g["variant"], "-"), marker=".", label=label)
            if any(v is not None and math.isfinite(v) for v in low):
                nan = math.nan
                ax.fill_between(xs, [nan if v is None else v for v in low], [nan if v is None else v for v in high],
                                color=color, alpha=0.12, linewidth=0)
    ax_r.set_xlabel("round")
    ax_r.set_ylabel("test accuracy (100 test clients of the seed)")
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



def write_outputs(out: Path, summary: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    """The plots, table.txt (returned) and, for a fresh summary, summary.json."""
    for ds in dict.fromkeys(g["dataset"] for g in groups):
        plot([g for g in groups if g["dataset"] == ds], out / f"algorithms_{ds}.png", summary["titles"][ds])
    lines = [summary["head"], f"over seeds {summary['seeds']}: mean ± sample sd; d: the paired difference in "
             "last-3 accuracy to the same algorithm's float32 run of the same seed (same clients), points, "
             "with its 95% t-interval; s/round: the median over every round of every seed", ""]
    lines += report(groups, summary["tune"]) + [f"FAILED {f}" for f in summary["failed"]]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    return text


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


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


def parse_overrides(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``--hp ALG:key=value,...`` → {algorithm: {key: number}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for spec in specs:
        alg_name, _, rest = spec.partition(":")
        if alg_name not in ALGORITHMS or not rest:
            raise ValueError(f"--hp {spec!r}: give ALG:key=value,... with ALG one of {list(ALGORITHMS)}")
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"--hp {spec!r}: {part!r} is not key=value")
            overrides.setdefault(alg_name, {})[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=parse_rounds, default=parse_rounds(""),
                    help="rounds: N for every data set, or unipen=30,shakespeare=20 (the defaults)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}")
    ap.add_argument("--algorithms", default="",
                    help=f"comma-separated subset of {list(ALGORITHMS)} (default: all on unipen, "
                         f"{DEFAULT_ALGORITHMS['shakespeare']} on shakespeare)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; with --tune 0)")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N rounds (default: rounds/5)")
    ap.add_argument("--max-batches", type=int, default=DATA_SETTINGS["shakespeare"]["max_batches"],
                    help="Shakespeare: batches per client per round (0: no cap)")
    ap.add_argument("--hp", action="append", default=[], metavar="ALG:key=value,...",
                    help="override an algorithm's hyperparameters (RunConfig fields or the algorithm's own "
                         "arguments), e.g. --hp mime:beta=0.5,client_lr=0.05; the rows are labelled with it")
    ap.add_argument("--tune", action="store_true",
                    help="float32 runs over the TUNE grids of the chosen algorithms instead of the benchmark")
    ap.add_argument("--jobs", type=int, default=min(2, cores), help="runs at a time, each its own process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / jobs)")
    ap.add_argument("--keep-checkpoints", type=int, default=0,
                    help="newest checkpoints kept of each completed run (default 0: SCAFFOLD's are large)")
    ap.add_argument("--out", default="runs/algorithms_sweep", help="run folders, table, plots and summary")
    ap.add_argument("--replot", action="store_true",
                    help="redraw the plots and reprint the table from OUT/summary.json and exit")
    return ap


def _listed(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def replot(out: Path) -> int:
    """The plots and table again from OUT/summary.json (the groups recomputed from its runs)."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    print(write_outputs(out, summary, aggregate(summary["rows"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        return replot(out / "tune" if args.tune else out)
    datasets, variants, algs = _listed(args.datasets), _listed(args.variants), _listed(args.algorithms)
    try:
        seeds = [int(s) for s in _listed(args.seeds or ("0" if args.tune else "0,1,2"))]
        overrides = parse_overrides(args.hp)
    except ValueError as e:
        ap.error(str(e))
    for what, got, allowed in (("--datasets", datasets, DATASETS), ("--variants", variants, VARIANTS),
                               ("--algorithms", algs, list(ALGORITHMS))):
        bad = sorted(set(got) - set(allowed))
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {list(allowed)}")
    if not datasets or not variants or not seeds:
        ap.error("--datasets, --variants and --seeds need at least one value")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--jobs and --threads must be >= 1")
    if args.tune:
        variants, algs, out = ["float32"], algs or list(TUNE), out / "tune"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{'tuning' if args.tune else 'benchmark'}: {CLIENTS_PER_ROUND} clients a round, 1 local epoch, "
          f"client SGD; seeds {seeds}; {args.jobs} run(s) at a time, each its own process with {threads} "
          f"torch thread(s)", flush=True)

    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    titles: dict[str, str] = {}
    counts = {"ran": 0, "skipped": 0}
    for ds in datasets:
        facts = data_facts(ds)
        if facts is None:
            continue
        num_clients, num_params = facts
        rounds = args.rounds[ds]
        eval_every = args.eval_every or max(1, rounds // 5)
        max_batches = (args.max_batches or None) if ds == "shakespeare" else DATA_SETTINGS[ds]["max_batches"]
        names = algs or DEFAULT_ALGORITHMS[ds]
        entries = plan_entries(ds, names, variants, overrides, args.tune, num_clients)
        sweep = build_sweep(f"algorithms_{ds}", base_fields(ds, rounds, eval_every, max_batches), entries, seeds)
        print(f"{ds}: {rounds} rounds, batch {DATA_SETTINGS[ds]['batch_size']}, at most {max_batches or 'all'} "
              f"batches a client, evaluation every {eval_every} rounds on {DATA_SETTINGS[ds]['eval_clients']} "
              f"test clients; algorithms {names}", flush=True)
        titles[ds] = (f"{ds}: {CLIENTS_PER_ROUND} clients/round, {rounds} rounds, batch "
                      f"{DATA_SETTINGS[ds]['batch_size']}, seeds {seeds}; solid float32, dashed EDEN 1 bit, dotted "
                      "+ extra group at 1 bit; mean over seeds, band: 95% t-interval")
        logdir = out / ds
        try:
            result = run_sweep(sweep, logdir, jobs=args.jobs, threads=threads,
                               keep_checkpoints=args.keep_checkpoints)
        except ConfigError as e:
            print(f"{ds}: {e}", file=sys.stderr)
            return 2
        counts["skipped"] += sum(s == "skipped" for s in result.status.values())
        counts["ran"] += sum(s in ("ran", "resumed") for s in result.status.values())
        failed += [f"{ds}/{name}" for name in result.failed]
        rows += collect(result, entries, ds, num_params)
    wall = time.perf_counter() - t_start
    if not rows:
        print("nothing ran")
        return 1 if failed else 0

    bad = client_mismatches(rows)
    run_s = sum(r["wall_s"] or 0.0 for r in rows)
    head = (f"clients: {'the same' if not bad else 'NOT the same'} in every run of a seed, round by round "
            f"(checked: examples trained per round){': ' + ', '.join(bad) if bad else ''}; {len(rows)} runs "
            f"({counts['ran']} ran now, {counts['skipped']} complete before), {run_s / 60:.1f} min of run time "
            f"in all, {wall / 60:.1f} min wall now")
    groups = aggregate(rows)
    summary = {"argv": sys.argv[1:] if argv is None else list(argv), "seeds": seeds, "rounds": args.rounds,
               "tune": args.tune, "titles": titles, "same_clients": not bad, "wall_s": wall, "run_s": run_s,
               "head": head, "failed": failed, "rows": rows, "groups": groups}
    text = write_outputs(out, summary, groups)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, default=str), encoding="utf-8")
    print("\n" + text)
    print(f"\nplots: {out}/algorithms_<dataset>.png; table: {out / 'table.txt'}; summary: {out / 'summary.json'}; "
          f"per run: {out}/<dataset>/results.csv")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; run again to resume them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
