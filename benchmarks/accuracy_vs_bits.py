"""Accuracy against bits: FedAvg on the UNIPEN digits with and without compression.

Every setting trains the seed's FedAvg CNN on the UNIPEN digits, split
naturally by writer (284 writers, from ``../shared/data/unipen``); runs of
the same seed sample the same clients in the same order, so within a seed
only the compression differs. It prints, per setting, the test accuracy at the
end, the mean of the last three evaluations (one test-set evaluation is noisy
to about +-0.3 points: 3,192 test examples), the cumulative uplink
(aggregated) and downlink (broadcasted) bits counted from the bytes on the
wire, and the uplink compression ratio against float32; it writes a plot of
accuracy against cumulative uplink bits, and ends with the goal: a codec
within 0.5 points of the uncompressed accuracy at 32x fewer uplink bits or
more, claimed only where the 95% t-interval of the paired difference to
float32 (same seed, same clients) lies above -0.5 points.

Settings: ``float32`` (no compression), TFF's ``compression_aggregator()``
(8-bit min/max quantization of the tensors above 20,000 elements), and
codecs from :func:`fedzip.codecs.registry` applied to every tensor
(``threshold=0``: the small tensors too, or the 6,538 float32 biases alone
would hold the ratio under 32x at 1 bit): EDEN at 8, 4, 2, 1 and 0.5 bits,
rotation + entropy-coded scalar quantization (ECSQ) at about 1 bit, top-k
and sign with error feedback, PowerSGD, and one run with a compressed
downlink as well. The rotation works in blocks of 2^16 coordinates
(``block_size=65536``), so padding to a power of two costs at most one block
per tensor instead of up to doubling it.

Training: 10 clients a round, batch 20, one local epoch, client SGD, server
SGD lr 1.0 (the seed's settings), with client lr 0.05 rather than 0.02 so the
runs converge within the rounds a benchmark can afford.

Seeds: every setting runs once per seed (``--seeds 0,1,2``, the default),
through :mod:`fedzip.sweep`: each run a run folder of its own in ``--out``
(named by the setting's label and the seed), ``--jobs`` at a time, skipped
when complete and resumed from its checkpoint when interrupted, so an
interrupted benchmark goes on where it stopped when run again. A seed changes
the clients sampled, the model's initialization and every codec's
randomness. Each figure is printed as mean ± standard deviation over the
seeds (sample sd, n - 1), with the 95% t-interval of the final accuracy; the
plot draws the mean curve with that interval as a band. The sweep's own
``results.csv`` (one row per run) and ``groups.csv`` (per setting) are in
``--out`` too.

    python benchmarks/accuracy_vs_bits.py [--rounds 300] [--eval-every 20] [--seeds 0,1,2]
                                          [--jobs 2] [--only float32,eden1]
                                          [--dataset unipen-digits] [--out runs/accuracy_vs_bits]
                                          [--replot]
    python benchmarks/accuracy_vs_bits.py --quick     # 30 rounds, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fedzip.data.unipen import default_unipen_root
from fedzip.metrics import format_bits, read_jsonl
from fedzip.sweep import Sweep, json_safe, mean_sd, run_sweep, t_interval

BLOCK = 65536
# (label, uplink aggregator spec, downlink broadcast spec)
SETTINGS: list[tuple[str, str, str]] = [
    ("float32", "mean", "float32"),
    ("tff8", "compression", "float32"),
    ("eden8", f"eden:bits=8,block_size={BLOCK},threshold=0", "float32"),
    ("eden4", f"eden:bits=4,block_size={BLOCK},threshold=0", "float32"),
    ("eden2", f"eden:bits=2,block_size={BLOCK},threshold=0", "float32"),
    ("eden1", f"eden:bits=1,block_size={BLOCK},threshold=0", "float32"),
    ("ecsq1", f"ecsq:bits=1,block_size={BLOCK},threshold=0", "float32"),
    ("ecsq0.75", f"ecsq:bits=0.75,block_size={BLOCK},threshold=0", "float32"),
    ("eden0.75", f"eden:bits=0.75,block_size={BLOCK},threshold=0", "float32"),
    ("eden0.5", f"eden:bits=0.5,block_size={BLOCK},threshold=0", "float32"),
    ("sign_ef", "sign_ef:threshold=0", "float32"),
    ("topk_ef1%", "topk_ef:fraction=0.01,threshold=0", "float32"),
    ("powersgd_ef2", "powersgd_ef:rank=2,threshold=0", "float32"),
    ("eden1+down8", f"eden:bits=1,block_size={BLOCK},threshold=0",
     f"rotated_uniform:bits=8,block_size={BLOCK},threshold=0"),
]
GOAL_POINTS, GOAL_RATIO = 0.5, 32.0


def build_sweep(settings, dataset: str, rounds: int, eval_every: int, client_lr: float,
                seeds: list[int]) -> Sweep:
    """The benchmark as a sweep: one variant per setting, crossed with the seeds."""
    return Sweep.from_dict({
        "name": "accuracy_vs_bits",
        "base": {"dataset": dataset, "rounds": rounds, "eval_every": eval_every, "client_lr": client_lr},
        "grid": {"seed": seeds},
        "variants": {label: {"aggregator": agg, "broadcast": bc} for label, agg, bc in settings},
    })



def _pm(m: float, sd: float, scale: float = 1.0, digits: int = 4) -> str:
    return f"{m * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


def summarize(result, settings) -> list[dict]:
    """Per setting, over its seeds: final accuracy, mean of the last three
    evaluations, bits, the mean curve with its 95% t-interval."""
    rows = []
    for label, aggregator, broadcast in settings:
        runs = [r for r in result.runs if r.variant == label
                and next(x for x in result.rows if x["name"] == r.name)["status"] == "complete"]
        if not runs:
            continue
        per_seed = []
        for r in runs:
            hist = read_jsonl(result.logdir / r.name / "metrics.jsonl")
            evals = [m for m in hist if m.get("eval/accuracy") is not None]
            per_seed.append({
                "seed": r.config.seed, "final": evals[-1]["eval/accuracy"],
                "last3": sum(m["eval/accuracy"] for m in evals[-3:]) / len(evals[-3:]),
                "up": hist[-1]["aggregated_bits/cumulative"], "down": hist[-1]["broadcasted_bits/cumulative"],
                "curve": {m["round"]: (m["aggregated_bits/cumulative"], m["eval/accuracy"]) for m in evals},
                "seconds": sum(m.get("time/round_s", 0) + m.get("time/eval_s", 0) for m in hist)})
        rounds = sorted(set.intersection(*(set(p["curve"]) for p in per_seed)))
        curve, band = [], []
        for rnd in rounds:
            pts = [p["curve"][rnd] for p in per_seed]
            mean, low, high = t_interval([a for _, a in pts])
            curve.append((sum(b for b, _ in pts) / len(pts), mean))
            band.append((low, high))
        final_m, final_sd = mean_sd([p["final"] for p in per_seed])
        last3_m, last3_sd = mean_sd([p["last3"] for p in per_seed])
        _, lo, hi = t_interval([p["final"] for p in per_seed])
        rows.append({
            "label": label, "aggregator": aggregator, "broadcast": broadcast, "n": len(per_seed),
            "seeds": [p["seed"] for p in per_seed],
            "final": final_m, "final_sd": final_sd, "final_ci95": [lo, hi],
            "last3": last3_m, "last3_sd": last3_sd, "last3_by_seed": {p["seed"]: p["last3"] for p in per_seed},
            "up": sum(p["up"] for p in per_seed) / len(per_seed),
            "down": sum(p["down"] for p in per_seed) / len(per_seed),
            "curve": curve, "band": band,
            "seconds": sum(p["seconds"] for p in per_seed) / len(per_seed),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300, help="rounds per run")
    ap.add_argument("--eval-every", type=int, default=20, help="evaluate every N rounds")
    ap.add_argument("--client-lr", type=float, default=0.05, help="client SGD learning rate")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: each setting runs once per seed")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default min(2, cores / jobs))")
    ap.add_argument("--dataset", default="unipen-digits", help="data set of every run (mnist5k for a smoke run)")
    ap.add_argument("--only", default="", help="comma-separated labels of the settings to run")
    ap.add_argument("--out", default="runs/accuracy_vs_bits", help="run folders, tables and the plot")
    ap.add_argument("--quick", action="store_true", help="30 rounds, evaluation every 10")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from OUT/summary.json and exit")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "summary.json").read_text()), Path(args.out) / "accuracy_vs_bits.png")
        return 0
    if args.quick:
        args.rounds, args.eval_every = 30, 10
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    if args.dataset.startswith("unipen") and not (default_unipen_root() / "unipen_femnist_full.npz").exists():
        print(f"skipped: the UNIPEN data is not at {default_unipen_root()} (see ../shared/data/unipen)")
        return 0
    wanted = [s for s in SETTINGS if not args.only or s[0] in args.only.split(",")]
    if not wanted:
        ap.error(f"--only matches no setting; labels: {[s[0] for s in SETTINGS]}")
    threads = args.threads or max(1, min(2, (os.cpu_count() or 1) // max(1, args.jobs)))

    print(f"{args.dataset}: {args.rounds} rounds of 10 clients, batch 20, 1 epoch, client SGD lr {args.client_lr}, "
          f"server SGD lr 1.0; seeds {seeds}; {args.jobs} run(s) at a time, {threads} thread(s) each\n")
    out = Path(args.out)
    sweep = build_sweep(wanted, args.dataset, args.rounds, args.eval_every, args.client_lr, seeds)
    result = run_sweep(sweep, out, jobs=args.jobs, threads=threads)
    rows = summarize(result, wanted)

    base = print_table(rows, seeds)
    (out / "summary.json").write_text(json.dumps(json_safe(rows), indent=1))
    plot(rows, out / "accuracy_vs_bits.png")
    print(f"\nplot: {out / 'accuracy_vs_bits.png'}; per run: {out / 'results.csv'}")
    if result.failed:
        print(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)}; run again to resume them")
    if base is not None:
        print(goal_line(rows, base, seeds, GOAL_POINTS, GOAL_RATIO))
    return 1 if result.failed else 0


def print_table(rows: list[dict], seeds: list[int], reference: str = "float32") -> dict | None:
    """The table over seeds (mean ± sd, the paired difference to ``reference``
    with its 95% t-interval); sets each row's ``d_ci95``; returns the reference row."""
    base = next((r for r in rows if r["label"] == reference), None)
    print(f"\nover seeds {seeds}: mean ± standard deviation (sample sd); d: the paired difference in last-3 "
          f"accuracy to {reference} (same seed, same clients), points, with its 95% t-interval")
    print(f"{'setting':13s} {'n':>2s} {'final acc':>17s} {'95% t-interval':>17s} {'last 3':>17s} {'uplink':>12s}"
          f" {'x fewer':>8s} {'downlink':>12s} {'x fewer':>8s}  {'d(last 3)':>17s} {'d 95% t-interval':>17s}")
    for r in rows:
        up_ratio = base["up"] / r["up"] if base else float("nan")
        down_ratio = base["down"] / r["down"] if base else float("nan")
        delta, delta_sd = _delta(r, base)
        _, d_lo, d_hi = r["d_ci95"] = _delta_interval(r, base)
        lo, hi = r["final_ci95"]
        ci = f"[{lo:.4f}, {hi:.4f}]" if math.isfinite(lo) else ""
        d_ci = f"[{100 * d_lo:+.2f}, {100 * d_hi:+.2f}]" if math.isfinite(d_lo) else ""
        print(f"{r['label']:13s} {r['n']:2d} {_pm(r['final'], r['final_sd']):>17s} {ci:>17s} "
              f"{_pm(r['last3'], r['last3_sd']):>17s} {format_bits(r['up']):>12s} "
              f"{up_ratio:8.1f} {format_bits(r['down']):>12s} {down_ratio:8.1f}  "
              f"{_pm(delta, delta_sd, 100, 2) + ' pt':>17s} {d_ci:>17s}")
    return base


def goal_line(rows: list[dict], base: dict, seeds: list[int], points: float, ratio: float) -> str:
    """The goal: within ``points`` of the reference at ``ratio``x fewer uplink bits
    or more, claimed only where the interval says so: the lower end of the 95%
    t-interval of the paired difference is above -``points``."""
    ok = [r for r in rows if r is not base and base["up"] / r["up"] >= ratio
          and math.isfinite(r["d_ci95"][1]) and 100 * r["d_ci95"][1] >= -points]
    best = max(ok, key=lambda r: base["up"] / r["up"]) if ok else None
    goal = (f"goal (within {points} pt of {base['label']} at >= {ratio:.0f}x fewer uplink bits: the lower end "
            f"of the 95% t-interval of the paired difference above -{points} pt)")
    if best:
        return (f"{goal}: met by {', '.join(r['label'] for r in ok)}; best ratio {base['up'] / best['up']:.1f}x "
                f"({best['label']}, d {100 * best['d_ci95'][0]:+.2f} pt, interval "
                f"[{100 * best['d_ci95'][1]:+.2f}, {100 * best['d_ci95'][2]:+.2f}])")
    return f"{goal}: not met (one seed gives no interval)" if len(seeds) < 2 else f"{goal}: not met"



def _delta(r: dict, base: dict | None) -> tuple[float, float]:
    """Mean and sd over the shared seeds of the paired difference in last-3 accuracy
    against float32 (the same seed samples the same clients)."""
    if base is None:
        return float("nan"), float("nan")
    shared = [s for s in r["last3_by_seed"] if s in base["last3_by_seed"]]
    if not shared:
        return r["last3"] - base["last3"], float("nan")
    return mean_sd([r["last3_by_seed"][s] - base["last3_by_seed"][s] for s in shared])


def _delta_interval(r: dict, base: dict | None) -> tuple[float, float, float]:
    """(mean, low, high) of the paired difference in last-3 accuracy against
    float32 over the shared seeds: Student's 95% t-interval (NaN bounds with
    fewer than two seeds)."""
    if base is None:
        return math.nan, math.nan, math.nan
    shared = [s for s in r["last3_by_seed"] if s in base["last3_by_seed"]]
    return t_interval([r["last3_by_seed"][s] - base["last3_by_seed"][s] for s in shared])


def plot(rows: list[dict], path: Path,
         title: str = "FedAvg: accuracy against uplink bits (mean over seeds, band: 95% t-interval)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        bits, acc = zip(*r["curve"], strict=True)
        n = r.get("n", 1)
        ax.plot(bits, acc, marker=".", color=colors[i % len(colors)], linestyle="-" if i % 2 == 0 else "--",
                label=r["label"] + (f" (n={n})" if n > 1 else ""))
        band = r.get("band")
        if band and any(lo is not None and math.isfinite(lo) for lo, _ in band):
            nan = float("nan")
            ax.fill_between(bits, [nan if lo is None else lo for lo, _ in band],
                            [nan if hi is None else hi for _, hi in band], color=colors[i % len(colors)],
                            alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bits")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
