"""Privacy: central DP-FedAvg against distributed DP through secure aggregation, on the UNIPEN digits.

The privacy issue's benchmark. Every setting trains the same model on the
UNIPEN digits split naturally by writer (284 writers, ``../shared/data/unipen``;
skipped with a message when absent); runs of the same seed sample the same
cohorts in the same order (:func:`fedzip.sample_clients`, fixed-size cohorts)
and start from the same initial model, so within a seed only the aggregation
differs. It prints, per setting, the test accuracy (at the end and the mean
of the last three evaluations) as mean ± standard deviation over the seeds
and per seed, its difference to central DP at ``--ddp-epsilon`` paired by
seed with the 95% t-interval, ε at δ = 1/population after the rounds run,
the noise multiplier z, the uplink bits per coordinate (the whole update
message, framing and scalars included, over the model's coordinates) and,
for one short run through the real protocol, the secure-aggregation
overhead per client. It ends with the papers' finding as the goal:
distributed DP at 16 bits or fewer per coordinate within 1 point of central
DP at the same ε, claimed only where the lower end of the 95% t-interval of
the paired difference is above -1 point.

Settings (``--only`` picks some by label); each accuracy setting is a
:class:`~fedzip.config.RunConfig`:

* ``nodp``: weighted FedAvg, float32, no clipping and no noise (the reference);
* ``clip``: DP-FedAvg with z = 0 (``algorithm: {"type": "dpfedavg", ...}``):
  the same clipping to C and unweighted mean as every DP setting, no noise
  (what clipping alone costs);
* ``central_eps{E}``: DP-FedAvg (:class:`fedzip.DPFedAvg`), fixed clip C,
  Gaussian noise z·C on the server's sum, z solved for ε = E after the rounds
  planned (``--epsilons``), float32 uplink;
* ``central_eps{E}_eden{b}``: the same at ``--ddp-epsilon`` with the uplink
  compressed by EDEN at ``b`` bits (``--eden-bits``, every tensor:
  ``aggregator: "eden:bits=b,threshold=0"``); the server decodes each update,
  clips it again to C, and adds the noise (``noise="after"``), so ε is
  unchanged and compression only adds error;
* ``ddg{m}`` / ``skellam{m}``: distributed DP
  (``aggregator: {"type": "distributed_dp", ...}``, :func:`fedzip.privacy.ddp.distributed_dp`)
  at ``m`` bits per coordinate (``--bits``), the distributed discrete Gaussian
  (Kairouz, Liu, Steinke, ICML 2021) and the distributed Skellam mechanism
  (Agarwal, Kairouz, Liu, NeurIPS 2021), γ and z computed here by
  :func:`~fedzip.privacy.ddp.ddp_parameters` for ε = ``--ddp-epsilon`` after
  the rounds planned and passed to the runs as numbers. The rotation's public
  seed is the aggregator's default (0) in every run; the run's seed keys the
  rounding and the noise. These accuracy runs use ``secure=False``: the same
  codes, summed mod 2^m, without the protocol's messages (the sum is the
  same; ``secagg`` below checks that it is, bit for bit);
* ``secagg``: ``--secure-rounds`` rounds (2) of ``ddg16`` with ``secure=True``
  (SecAgg's complete graph, threshold 1/2) and the same rounds with
  ``secure=False``, in this process on the first seed: the protocol's bits
  per client by phase, its time, and whether the two models agree exactly.

Threat model (secure aggregation, :mod:`fedzip.privacy.secagg`): the server is
honest but curious, may collude with fewer than t holders of a client's
shares, and sees only the sum of the codes mod 2^m; not covered: an actively
malicious server, malicious clients. Central DP trusts the server with every
client's (clipped) update; its ε is about what the server releases (the
model). Distributed DP's ε is about the sum the server sees.

Accounting: the privacy unit is one client (all its examples); cohorts are
fixed-size (exactly ``--cohort`` distinct clients a round, uniformly), so
neighbouring data sets replace one client (sensitivity 2C; Wang, Balle,
Kasiviswanathan, AISTATS 2019); δ = 1/population; rounds compose by RDP.
Central DP's ε (the runs' ``privacy/epsilon``) is dp_accounting's
Gaussian-specific bound for sampling without replacement; distributed DP's
(the runs' ``aggregator/ddp/epsilon``) is the mechanism's RDP (KLS21
Proposition 14, AKL21 Theorem 3.5) through the general subsampling bound
(WBK19 Theorem 9), which is looser: at the same target ε the distributed
settings get somewhat more noise (see the z column; ``eps(gen)`` is central
DP's own z through the general bound, for comparison). The ``train/*``
metrics, which clients took part and client failures are not covered by
either ε (as in :mod:`fedzip.algorithms.dp`). In simulation all noise is
drawn from keys of the run's seed.

Model: by default the small CNN (task ``images_small``,
:class:`fedzip.models.SmallCNN`: conv 8 + conv 16 + linear, 11,274
parameters) rather than the seed's FedAvg CNN (1,663,370 parameters,
``--model cnn``, task ``images``): DP noise grows with the model's size (its
norm is z·C·√d against a signal of at most C), distributed DP's rounding adds
d/4 to its sensitivity (at 12 bits the seed CNN's rounding alone is larger
than the noise that fits), and on a shared 2-core machine the small model is
what fits the rounds.

Training: ``--cohort`` clients a round (30), batch 20, one local epoch, client
SGD lr ``--client-lr``, server SGD lr ``--server-lr`` with momentum
``--server-momentum``; clip C = ``--clip`` for every DP setting; evaluation
on every test client every ``--eval-every`` rounds and after the last.

Seeds: every accuracy setting runs once per seed (``--seeds 0,1,2``, the
default), through :mod:`fedzip.sweep`: each run a run folder of its own in
``--out`` (named by the setting's label and the seed), ``--jobs`` at a time
(each its own process, ``--threads`` torch threads), skipped when complete
and resumed from its checkpoint when interrupted, so an interrupted
benchmark goes on where it stopped when run again. The ``secagg`` check is
written to ``OUT/secagg_s<seed>.json`` and reused when run with the same
settings. The sweep's ``results.csv`` and ``groups.csv``, and this
benchmark's ``summary.json``, are in ``--out`` too.

    python benchmarks/privacy.py [--rounds 60] [--cohort 30] [--seeds 0,1,2] [--epsilons 4,8,16]
                                 [--ddp-epsilon 8] [--bits 12,14,16,18] [--only nodp,ddg16]
                                 [--jobs 2] [--threads 1] [--out runs/privacy] [--model small|cnn]
    python benchmarks/privacy.py --quick      # 6 rounds of cohort 10, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fedzip
from fedzip.config import RunConfig
from fedzip.errors import DataError
from fedzip.metrics import read_jsonl
from fedzip.run import build_algorithm
from fedzip.sweep import Sweep, mean_sd, run_sweep, t_interval

GOAL_POINTS, GOAL_BITS = 1.0, 16
TASK = {"small": "images_small", "cnn": "images"}


# --------------------------------------------------------------------------
# Settings as run configs
# --------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting as a dict: label, kind, and its parameters."""
    out: list[dict[str, Any]] = [{"label": "nodp", "kind": "nodp"}, {"label": "clip", "kind": "central", "z": 0.0}]
    for e in args.epsilons:
        out.append({"label": f"central_eps{e:g}", "kind": "central", "target": e})
    for b in args.eden_bits:
        out.append({"label": f"central_eps{args.ddp_epsilon:g}_eden{b:g}", "kind": "central",
                    "target": args.ddp_epsilon, "eden": b})
    for mech in args.mechanisms:
        for m in args.bits:
            out.append({"label": f"{mech}{m}", "kind": "ddp", "mechanism": mech, "bits": m,
                        "target": args.ddp_epsilon})
    return out


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields every run shares."""
    return {"dataset": args.dataset, "task": TASK[args.model], "rounds": args.rounds,
            "clients_per_round": args.cohort, "batch_size": args.batch_size, "epochs": 1,
            "client_lr": args.client_lr, "server_lr": args.server_lr, "server_momentum": args.server_momentum,
            "eval_every": args.eval_every, "eval_batch_size": 500}


def ddp_numbers(setting: dict[str, Any], args: argparse.Namespace, population: int,
                dims: tuple[int, ...]) -> dict[str, float]:
    """γ, z and the planned ε of a distributed DP setting (computed here, passed as numbers)."""
    from fedzip.privacy.ddp import ddp_parameters

    p = ddp_parameters(setting["target"], 1.0 / population, args.rounds, args.cohort, population, setting["bits"],
                       dims, mechanism=setting["mechanism"], clip=args.clip, sampling="fixed")
    return {"gamma": p.gamma, "z": p.noise_multiplier, "planned_epsilon": p.epsilon}


def variant(setting: dict[str, Any], args: argparse.Namespace, population: int,
            numbers: dict[str, float], secure: bool = False) -> dict[str, Any]:
    """The RunConfig fields of one setting (over :func:`base_config`)."""
    delta = 1.0 / population
    kind = setting["kind"]
    if kind == "nodp":
        return {}
    if kind == "central":
        noise = ({"noise_multiplier": setting["z"]} if "z" in setting else {"target_epsilon": setting["target"]})
        out: dict[str, Any] = {"algorithm": {"type": "dpfedavg", "population": population, "cohort": args.cohort,
                                             "delta": delta, "clip": args.clip, "rounds": args.rounds,
                                             "sampling": "fixed", "noise": "after", **noise}}
        if "eden" in setting:
            out["aggregator"] = f"eden:bits={setting['eden']:g},threshold=0"
        return out
    return {"aggregator": {"type": "distributed_dp", "noise_multiplier": numbers["z"], "clip": args.clip,
                           "cohort": args.cohort, "bits": setting["bits"], "gamma": numbers["gamma"],
                           "mechanism": setting["mechanism"], "secure": secure, "population": population,
                           "delta": delta, "sampling": "fixed"}}


def build_sweep(wanted: list[dict[str, Any]], args: argparse.Namespace, population: int,
                numbers: dict[str, dict[str, float]], seeds: list[int]) -> Sweep:
    """The accuracy settings as a sweep: one variant per setting, crossed with the seeds."""
    return Sweep.from_dict({
        "name": "privacy", "base": base_config(args), "grid": {"seed": seeds},
        "variants": {s["label"]: variant(s, args, population, numbers.get(s["label"], {})) for s in wanted},
    })


# --------------------------------------------------------------------------
# Reading the runs
# --------------------------------------------------------------------------


def per_run(history: list[dict[str, Any]], setting: dict[str, Any], numbers: dict[str, float],
            args: argparse.Namespace, population: int, dims: tuple[int, ...]) -> dict[str, Any]:
    """One run's figures from its metrics.jsonl (ε, z, γ, bits, wraps, norms),
    with central DP's ε through the general bound computed here."""
    from fedzip.privacy.ddp import ddp_epsilon

    evals = [(m["round"], m["eval/accuracy"]) for m in history if m.get("eval/accuracy") is not None]
    last3 = [a for _, a in evals[-3:]]
    rounds = history[-1]["round"]
    clients = sum(m["clients/succeeded"] for m in history)
    norms = [m["aggregator/clipping/mean_norm"] for m in history if "aggregator/clipping/mean_norm" in m]
    out: dict[str, Any] = {
        "final": evals[-1][1], "last3": sum(last3) / len(last3), "evals": evals, "rounds": rounds,
        "bits_per_coord": sum(m["aggregated_bits"] for m in history) / (clients * sum(dims)),
        "tensor_bits_per_coord": sum(m["aggregated_bits/tensors"] for m in history) / (clients * sum(dims)),
        "expected_wrapped_per_round": statistics.mean(m.get("aggregator/ddp/expected_wrapped", 0.0)
                                                      for m in history),
        "mean_norm_first": norms[0] if norms else None, "mean_norm": statistics.mean(norms) if norms else None,
        "s_per_round": statistics.mean(m["time/round_s"] for m in history),
        "epsilon": math.inf, "epsilon_general": None, "z": None, "gamma": None,
    }
    last = history[-1]
    if setting["kind"] == "central":
        z = last["privacy/noise_multiplier"]
        out["z"] = z
        if z > 0:  # (z = 0: ε is infinite, written as null)
            out["epsilon"] = last["privacy/epsilon"]
            out["epsilon_general"] = ddp_epsilon("gaussian", z, 1.0, dims, rounds, args.cohort, population,
                                                 1.0 / population, clip=args.clip, sampling="fixed")
    elif setting["kind"] == "ddp":
        out.update(z=numbers["z"], gamma=last["aggregator/ddp/gamma"], epsilon=last["aggregator/ddp/epsilon"],
                   planned_epsilon=numbers["planned_epsilon"])
    return out



def _pm(m: float, sd: float, scale: float = 1.0, digits: int = 4) -> str:
    return f"{m * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


def _paired(row: dict[str, Any], ref: dict[str, Any] | None) -> list[float]:
    """Differences in last-3 accuracy, points, over the seeds both ran (same seed, same cohorts)."""
    if ref is None:
        return []
    return [100 * (row["by_seed"][s] - ref["by_seed"][s]) for s in row["by_seed"] if s in ref["by_seed"]]


def summarize(result: Any, wanted: list[dict[str, Any]], numbers: dict[str, dict[str, float]],
              args: argparse.Namespace, population: int, dims: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per setting over its complete runs: means and sds, per seed, and
    the paired differences to nodp and to central DP at ``--ddp-epsilon``."""
    complete = {r["name"] for r in result.rows if r["status"] == "complete"}
    by_label = {s["label"]: s for s in wanted}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in result.runs:
        if r.name in complete:
            hist = read_jsonl(result.logdir / r.name / "metrics.jsonl")
            runs.setdefault(r.variant, {})[r.config.seed] = per_run(
                hist, by_label[r.variant], numbers.get(r.variant, {}), args, population, dims)
    rows = []
    for s in wanted:
        by = runs.get(s["label"])
        if not by:
            continue
        ps = [by[k] for k in sorted(by)]
        row: dict[str, Any] = {"label": s["label"], "setting": s, "n": len(ps), "seeds": sorted(by),
                               "by_seed": {k: by[k]["last3"] for k in sorted(by)},
                               "per_seed": {k: by[k] for k in sorted(by)}}
        for key in ("final", "last3"):
            row[key], row[f"{key}_sd"] = mean_sd([p[key] for p in ps])
        for key in ("bits_per_coord", "tensor_bits_per_coord", "expected_wrapped_per_round", "s_per_round"):
            row[key] = statistics.mean(p[key] for p in ps)
        for key in ("epsilon", "epsilon_general", "z", "gamma", "mean_norm_first", "mean_norm",
                    "planned_epsilon"):
            values = [p.get(key) for p in ps if p.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
        rows.append(row)
    by_row = {r["label"]: r for r in rows}
    nodp, ref = by_row.get("nodp"), by_row.get(f"central_eps{args.ddp_epsilon:g}")
    for row in rows:
        d_nodp = _paired(row, nodp) if row is not nodp else []
        row["vs_nodp"] = statistics.mean(d_nodp) if d_nodp else math.nan
        d = _paired(row, ref) if row is not ref else []
        row["vs_central"], row["vs_central_sd"] = mean_sd(d) if d else (math.nan, math.nan)
        _, row["vs_central_low"], row["vs_central_high"] = t_interval(d)
    return rows


# --------------------------------------------------------------------------
# The secure-aggregation check: not an accuracy run, in this process
# --------------------------------------------------------------------------


def run_secure(args: argparse.Namespace, train: Any, info: Any, population: int, dims: tuple[int, ...],
               seed: int, mechanism: str = "ddg", bits: int = 16) -> dict[str, Any]:
    """``--secure-rounds`` rounds of distributed DP through SecAgg and the same without
    the protocol (the accuracy runs' config, ``secure`` switched): protocol bits
    per client by phase, seconds per round, equal models."""
    setting = {"label": f"{mechanism}{bits}", "kind": "ddp", "mechanism": mechanism, "bits": bits,
               "target": args.ddp_epsilon}
    numbers = ddp_numbers(setting, args, population, dims)
    out: dict[str, Any] = {"label": "secagg", "seed": seed, "rounds": args.secure_rounds, "cohort": args.cohort,
                           "mechanism": mechanism, "bits": bits, "z": numbers["z"], "gamma": numbers["gamma"]}
    finals = {}
    for secure in (True, False):
        config = RunConfig.from_dict({**base_config(args), **variant(setting, args, population, numbers, secure),
                                      "rounds": args.secure_rounds, "seed": seed})
        alg = build_algorithm(config, info)
        state, t_total, per_round = alg.init(), 0.0, []
        for r in range(1, args.secure_rounds + 1):
            ids = fedzip.sample_clients(train.client_ids, args.cohort, r, seed)
            t = time.perf_counter()
            state, m = alg.next(state, train, ids)
            t_total += time.perf_counter() - t
            per_round.append(_plain(m))
        finals[secure] = state.params
        key = "secure" if secure else "plain"
        out[f"{key}_s_per_round"] = t_total / args.secure_rounds
        out[f"{key}_bits_per_client"] = sum(m["aggregated_bits"] for m in per_round) / (
            args.secure_rounds * args.cohort)
        if secure:
            out["secagg"] = {k[len("aggregator/"):]: v for k, v in per_round[-1].items()
                             if k.startswith("aggregator/") and "secagg/" in k}
    out["identical"] = all(torch.equal(finals[True][k], finals[False][k]) for k in finals[True])
    out["max_abs_diff"] = max(float((finals[True][k] - finals[False][k]).abs().max()) for k in finals[True])
    return out


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("time/")}


def _load(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored check at ``path`` if it was run with ``key``'s settings (else None: run it again)."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    if r.get("key") != json.loads(json.dumps(key)):
        print(f"  {path} was run with other settings: running it again", flush=True)
        return None
    return r


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _num(x: Any, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ref = f"central_eps{args.ddp_epsilon:g}"
    print(f"\n{'setting':22s} {'n':>2s} {'final acc':>15s} {'last 3':>15s} {'vs nodp':>8s} "
          f"{'vs ' + ref + ' (paired)':>27s} {'95% t-interval':>16s} {'eps':>6s} {'eps(gen)':>8s} {'z':>6s} "
          f"{'gamma':>9s} {'bits/coord':>10s} {'wraps/rd':>8s} {'norm r1':>7s} {'s/round':>7s}  last 3 per seed")
    for r in rows:
        vs = f"{r['vs_nodp']:+.2f}" if math.isfinite(r["vs_nodp"]) else ""
        d = _pm(r["vs_central"], r["vs_central_sd"], digits=2) + " pt" if math.isfinite(r["vs_central"]) else ""
        ci = (f"[{r['vs_central_low']:+.2f}, {r['vs_central_high']:+.2f}]" if math.isfinite(r["vs_central_low"])
              else "")
        per_seed = " ".join(f"s{k}:{v:.4f}" for k, v in r["by_seed"].items())
        print(f"{r['label']:22s} {r['n']:2d} {_pm(r['final'], r['final_sd']):>15s} "
              f"{_pm(r['last3'], r['last3_sd']):>15s} {vs:>8s} {d:>27s} {ci:>16s} "
              f"{_num(r['epsilon'], '6.2f'):>6s} {_num(r['epsilon_general'], '8.2f'):>8s} "
              f"{_num(r['z'], '6.3f'):>6s} {_num(r['gamma'], '9.1f'):>9s} {r['bits_per_coord']:10.2f} "
              f"{r['expected_wrapped_per_round']:8.2f} {_num(r['mean_norm_first'], '7.3f'):>7s} "
              f"{r['s_per_round']:7.2f}  {per_seed}")
    print("\n(accuracy: mean ± sd over seeds; last 3: the mean of the last three evaluations; vs: last-3 accuracy "
          "minus the reference's, points, paired by seed (same seed, same cohorts), with the 95% t-interval of "
          "the paired differences. eps: at delta = 1/population after the rounds run, fixed-size cohorts, "
          "replace-one; central DP dp_accounting's Gaussian bound, distributed DP the mechanism's RDP through "
          "the general subsampling bound; eps(gen): central DP's z through that general bound. bits/coord: "
          "uplink message bits over clients x coordinates, framing included. wraps/rd: the server's estimate "
          "of coordinates wrapped mod 2^m per round. norm r1: the clients' mean update norm before clipping, "
          "round 1)")


def print_secure(s: dict[str, Any]) -> None:
    sa = s["secagg"]
    print(f"\nsecure aggregation ({s['mechanism']}{s['bits']} through SecAgg, complete graph, threshold 1/2; "
          f"{s['cohort']} clients, {s['rounds']} rounds, seed {s['seed']}, in this process):")
    for phase in ("advertise", "share_keys", "unmask"):
        print(f"  {phase:13s} {sa.get(f'secagg/bits_per_client/{phase}', float('nan')):12,.0f} bits/client")
    print(f"  {'protocol':13s} {sa.get('secagg/bits_per_client/protocol', float('nan')):12,.0f} bits/client "
          f"(advertise + share_keys + unmask, up and down)")
    print(f"  {'masked input':13s} {sa.get('secagg/bits_per_client/masked_input', float('nan')):12,.0f} bits/client "
          f"(modulus {sa.get('secagg/modulus_bits', float('nan')):.0f} bits a coordinate)")
    print(f"  uplink message bits/client/round: secure {s['secure_bits_per_client']:,.0f}, "
          f"without the protocol {s['plain_bits_per_client']:,.0f}")
    print(f"  s/round: secure {s['secure_s_per_round']:.2f}, without the protocol {s['plain_s_per_round']:.2f} "
          f"(ratio {s['secure_s_per_round'] / s['plain_s_per_round']:.2f}x)")
    print(f"  same model after {s['rounds']} rounds: {'yes, bit for bit' if s['identical'] else 'NO'} "
          f"(max |difference| {s['max_abs_diff']:.3g})")


def goal(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    label = f"central_eps{args.ddp_epsilon:g}"
    ref = next((r for r in rows if r["label"] == label), None)
    head = (f"\ngoal: distributed DP at <= {GOAL_BITS} bits/coordinate within {GOAL_POINTS:g} point of central DP "
            f"at eps {args.ddp_epsilon:g} (last-3 accuracy, paired by seed; claimed where the lower end of the 95% "
            f"t-interval of the paired difference is above -{GOAL_POINTS:g} pt)")
    if ref is None:
        print(f"{head}: no {label} reference in this run")
        return
    print(f"{head}; reference {label} {_pm(ref['last3'], ref['last3_sd'])}, {ref['n']} seed(s)")
    met = []
    for r in rows:
        if r["setting"]["kind"] != "ddp":
            continue
        ok = (r["setting"]["bits"] <= GOAL_BITS and math.isfinite(r["vs_central_low"])
              and r["vs_central_low"] > -GOAL_POINTS)
        if ok:
            met.append(r["label"])
        ci = (f"[{r['vs_central_low']:+.2f}, {r['vs_central_high']:+.2f}]" if math.isfinite(r["vs_central_low"])
              else "(no interval: one seed)")
        print(f"  {r['label']:10s} {_pm(r['vs_central'], r['vs_central_sd'], digits=2):>14s} pt  95% t-interval "
              f"{ci:>16s}  uplink {ref['bits_per_coord'] / r['bits_per_coord']:.2f}x fewer bits"
              f"{'  (meets the goal)' if ok else ''}")
    n = min((r["n"] for r in rows), default=0)
    print(f"  -> {'met by ' + ', '.join(met) if met else 'not met'} over {n} seed(s)"
          + (": one seed gives no interval" if n < 2 else ""))


def json_safe(obj: Any) -> Any:
    """NaN and inf as null: summary.json stays plain JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--cohort", type=int, default=30, help="clients per round (fixed-size cohorts)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: each setting runs once per seed")
    ap.add_argument("--epsilons", default="4,8,16", help="central DP's target epsilons")
    ap.add_argument("--ddp-epsilon", type=float, default=8.0,
                    help="the epsilon of the distributed DP settings and of central DP with EDEN")
    ap.add_argument("--bits", default="12,14,16,18", help="distributed DP's bits per coordinate")
    ap.add_argument("--mechanisms", default="ddg,skellam")
    ap.add_argument("--eden-bits", default="2", help="EDEN bits for central DP with compression ('' for none)")
    ap.add_argument("--clip", type=float, default=0.2, help="L2 clip norm C of every DP setting")
    ap.add_argument("--client-lr", type=float, default=0.05)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--secure-rounds", type=int, default=2, help="rounds of the secure-aggregation check (0: none)")
    ap.add_argument("--model", choices=tuple(TASK), default="small")
    ap.add_argument("--dataset", default="unipen-digits", help="data set of every run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (processes)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run and of the secagg check (default min(2, cores / jobs))")
    ap.add_argument("--only", default="", help="comma-separated labels (secagg for the protocol check)")
    ap.add_argument("--out", default="runs/privacy")
    ap.add_argument("--quick", action="store_true", help="6 rounds of cohort 10, evaluation every 2")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.eval_every, args.cohort = 6, 2, 10
        args.out = args.out + "_quick"
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    args.bits = [int(b) for b in args.bits.split(",") if b.strip()]
    args.mechanisms = [m for m in args.mechanisms.split(",") if m.strip()]
    args.eden_bits = [float(b) for b in args.eden_bits.split(",") if b.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    args.threads = args.threads or max(1, min(2, (os.cpu_count() or 1) // max(1, args.jobs)))
    torch.set_num_threads(args.threads)

    from fedzip.data import load_dataset

    try:
        train, _, info = load_dataset(args.dataset)
    except DataError as e:
        print(f"skipped: {e}")
        return 0
    population = len(train.client_ids)
    task = fedzip.resolve_task(TASK[args.model], info)
    dims = tuple(p.numel() for p in task.model_fn().parameters())
    only = set(args.only.split(",")) - {""}
    wanted = [s for s in settings(args) if not only or s["label"] in only]
    out = Path(args.out)
    print(f"{args.dataset}: {population} clients (population), cohort {args.cohort} (fixed size), {args.rounds} "
          f"rounds, model {args.model} ({sum(dims):,} parameters), batch {args.batch_size}, 1 epoch, client SGD "
          f"lr {args.client_lr}, server SGD lr {args.server_lr} momentum {args.server_momentum}, clip C = "
          f"{args.clip}, delta = 1/{population}; seeds {seeds}; {args.jobs} run(s) at a time, {args.threads} "
          "torch thread(s) each", flush=True)

    t_start = time.perf_counter()
    numbers = {s["label"]: ddp_numbers(s, args, population, dims) for s in wanted if s["kind"] == "ddp"}
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    if wanted:
        result = run_sweep(build_sweep(wanted, args, population, numbers, seeds), out, jobs=args.jobs,
                           threads=args.threads)
        rows, failed = summarize(result, wanted, numbers, args, population, dims), result.failed
    secure = None
    if args.secure_rounds and (not only or "secagg" in only):
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"secagg_s{seeds[0]}.json"
        key = {**base_config(args), "clip": args.clip, "secure_rounds": args.secure_rounds,
               "ddp_epsilon": args.ddp_epsilon}
        secure = _load(path, key)
        if secure is None:
            print("  [secagg] starting", flush=True)
            secure = {**run_secure(args, train, info, population, dims, seeds[0]), "key": key}
            path.write_text(json.dumps(secure, indent=1))
        else:
            print(f"  [secagg] done before: {path}", flush=True)

    if rows:
        print_table(rows, args)
    if secure:
        print_secure(secure)
    if rows:
        goal(rows, args)
        (out / "summary.json").write_text(json.dumps(json_safe(
            {"args": vars(args), "population": population, "dims": dims, "rows": rows, "secagg": secure}), indent=1))
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}; run again to resume them")
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s (this invocation; complete runs in {out} are not rerun)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
