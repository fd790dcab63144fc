"""Runs side by side: ``fedzip compare DIR...``.

Each ``DIR`` is a run folder (one holding ``run.json``, as ``fedzip run``,
``fedzip tutorial`` and ``fedzip sweep`` write them) or a folder with run
folders somewhere below it (a sweep's logdir, ``runs/tutorial``). For every
run it reads ``run.json`` and ``metrics.jsonl`` and prints one row: task,
algorithm, aggregator, rounds done (of the config's), final and best
evaluation accuracy and loss, cumulative uplink and downlink bits, and the
time spent (the sum of ``time/round_s`` and ``time/eval_s`` over the rounds
in the metrics: training and evaluation, without start-up). Runs of other
tasks and algorithms compare as well: a metric a run does not have is a
blank. It writes a plot (:func:`plot_comparison`): the metric against
round, against cumulative uplink bits and against total bits (uplink plus
downlink), and the train loss against round.

:func:`summarize_run` is the one place a run folder becomes a row; the
sweep's results table (:mod:`fedzip.sweep`) is made of these rows too.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedzip.errors import ConfigError
from fedzip.metrics import format_bits

UP, DOWN = "aggregated_bits/cumulative", "broadcasted_bits/cumulative"

#: the columns :func:`summarize_run` fills for every run, in table order
COLUMNS = ["name", "task", "dataset", "algorithm", "aggregator", "broadcast", "seed", "rounds",
           "rounds_done", "final_eval_accuracy", "best_eval_accuracy", "best_eval_accuracy_round",
           "final_eval_loss", "best_eval_loss", "final_train_loss", "final_train_accuracy",
           "uplink_bits", "downlink_bits", "total_bits", "time_s", "path"]


def column(metric: str) -> str:
    """``eval/accuracy`` → ``eval_accuracy`` (a metric's name as part of a column name)."""
    return metric.replace("/", "_")


def lower_is_better(metric: str) -> bool:
    """Best of a loss (or error, or perplexity) is its least; of anything else its most."""
    return any(w in metric for w in ("loss", "error", "perplexity"))


def spec_text(spec: Any) -> str:
    """A config spec as one string: a name as it is, an object as compact JSON."""
    if spec is None or isinstance(spec, str):
        return spec or ""
    return json.dumps(spec, separators=(",", ":"), sort_keys=False)


def short_spec(spec: Any) -> str:
    """A config spec to read at a glance: ``clipping(norm=1.0, inner=mean(codec=eden(bits=2)))``
    for an object (or its JSON text), a name as it is."""
    if isinstance(spec, str) and spec.startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            return spec
    if isinstance(spec, Mapping):
        opts = {k: v for k, v in spec.items() if k != "type"}
        inner = ", ".join(f"{k}={short_spec(v)}" for k, v in opts.items())
        return f"{spec.get('type', '')}({inner})"
    if isinstance(spec, list):
        return "[" + ", ".join(short_spec(v) for v in spec) + "]"
    return str(spec)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def summarize_history(history: Sequence[Mapping[str, Any]],
                      metrics: Iterable[str] = ("eval/accuracy", "eval/loss")) -> dict[str, Any]:
    """Final and best of each metric (final: its last value; best: the most, or
    the least for a loss, with the round), the train metrics of the last
    round, the cumulative bits and the time, from a run's rounds. A metric no
    round has gives None."""
    row: dict[str, Any] = {"rounds_done": history[-1].get("round") if history else 0}
    for metric in dict.fromkeys(metrics):
        points = [(m.get("round"), _number(m.get(metric))) for m in history]
        points = [(r, v) for r, v in points if v is not None]
        name = column(metric)
        row[f"final_{name}"] = points[-1][1] if points else None
        if points:
            pick = min if lower_is_better(metric) else max
            best_round, best = pick(points, key=lambda p: p[1])
        else:
            best_round, best = None, None
        row[f"best_{name}"] = best
        row[f"best_{name}_round"] = best_round
    last = history[-1] if history else {}
    row["final_train_loss"] = _number(last.get("train/loss"))
    row["final_train_accuracy"] = _number(last.get("train/accuracy"))
    up, down = _number(last.get(UP)), _number(last.get(DOWN))
    row["uplink_bits"] = int(up) if up is not None else None
    row["downlink_bits"] = int(down) if down is not None else None
    row["total_bits"] = int(up + down) if up is not None and down is not None else None
    times = [_number(m.get(k)) for m in history for k in ("time/round_s", "time/eval_s")]
    times = [t for t in times if t is not None]
    row["time_s"] = sum(times) if times else None
    return row


def read_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(``run.json``, the rounds of ``metrics.jsonl``) of a run folder; a metrics
    line cut short by a crash is skipped."""
    path = Path(path)
    try:
        meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is not a run folder: it has no run.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / 'run.json'} is not valid JSON: {e}") from None
    history: list[dict[str, Any]] = []
    mpath = path / "metrics.jsonl"
    if mpath.exists():
        for line in mpath.read_text(encoding="utf-8").splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(m, dict) and isinstance(m.get("round"), int):
                history.append(m)
    return meta, history


def summarize_run(path: str | Path, metrics: Iterable[str] = ("eval/accuracy", "eval/loss"),
                  history: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One row of the comparison table for a run folder (:data:`COLUMNS`, and
    ``final_``/``best_`` columns for every metric in ``metrics``)."""
    path = Path(path)
    meta, hist = read_run(path)
    if history is None:
        history = hist
    config = meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}
    row: dict[str, Any] = {
        "name": path.name,
        "task": meta.get("task") or config.get("task"),
        "dataset": config.get("dataset"),
        "algorithm": spec_text(config.get("algorithm")),
        "aggregator": spec_text(config.get("aggregator")),
        "broadcast": spec_text(config.get("broadcast")),
        "seed": config.get("seed"),
        "rounds": config.get("rounds"),
    }
    row.update(summarize_history(history, ("eval/accuracy", "eval/loss", *metrics)))
    row["path"] = str(path)
    return row


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """The run folders in ``dirs``: each one itself if it holds ``run.json``, else
    every folder below it that does (sorted; checkpoints folders skipped)."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"{d} is not a folder")
        if (d / "run.json").is_file():
            runs = [d]
        else:
            runs = sorted(p.parent for p in d.rglob("run.json") if "checkpoints" not in p.parts)
        if not runs:
            raise ConfigError(f"{d} holds no runs (no run.json in it or below it)")
        found += [r for r in runs if r not in found]
    return found


def labels(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: the folder name, with as many parent folders as it
    takes to tell runs of the same name apart."""
    depth = 1
    while True:
        out = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(out)) == len(out) or depth > 32:
            return out
        depth += 1


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
                 width: int = 48) -> str:
    """Rows as aligned text: ``columns`` are (key, header); None is a blank, bits
    in binary units, floats to 4 places, strings cut to ``width``."""
    def cell(key: str, v: Any) -> str:
        if v is None or v == "":
            return ""
        if key.endswith("_bits"):
            return format_bits(v)
        if isinstance(v, float):
            return f"{v:.1f}" if key.endswith("_s") else f"{v:.4f}"
        s = short_spec(v) if key in ("algorithm", "aggregator", "broadcast") else str(v)
        return s if len(s) <= width else s[: width - 1] + "…"

    body = [[cell(k, r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, (_, h) in enumerate(columns)]
    numeric = [all(_number(r.get(k)) is not None or r.get(k) in (None, "") for r in rows)
               for k, _ in columns]
    lines = ["  ".join(h.rjust(w) if num else h.ljust(w)
                       for (_, h), w, num in zip(columns, widths, numeric, strict=True)).rstrip()]
    for b in body:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(b, widths, numeric, strict=True)).rstrip())
    return "\n".join(lines)


TABLE = [("name", "run"), ("task", "task"), ("algorithm", "algorithm"), ("aggregator", "aggregator"),
         ("rounds_done", "rounds"), ("final_eval_accuracy", "final acc"), ("best_eval_accuracy", "best acc"),
         ("final_eval_loss", "final loss"), ("best_eval_loss", "best loss"), ("uplink_bits", "uplink"),
         ("downlink_bits", "downlink"), ("time_s", "time s")]


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path,
              columns: Sequence[str] | None = None) -> Path:
    """Rows to CSV (None → empty cell; objects as JSON); columns default to every key seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r.get(c), (dict, list))
                        else r[c] for c in columns])
    return path


def plot_comparison(histories: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path,
                    metric: str = "eval/accuracy") -> Path:
    """One curve per run: ``metric`` against round, cumulative uplink bits and
    total bits, and train loss against round. Runs without a metric are left
    out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    drawn = [False] * 4
    for name, history in histories.items():
        pts = [m for m in history if _number(m.get(metric)) is not None]
        if pts:
            ys = [m[metric] for m in pts]
            axes[0].plot([m["round"] for m in pts], ys, marker="o", ms=3, label=name)
            drawn[0] = True
            up = [(m[UP], m[metric]) for m in pts if _number(m.get(UP)) is not None]
            if up:
                axes[1].plot(*zip(*up, strict=True), marker="o", ms=3, label=name)
                drawn[1] = True
            tot = [(m[UP] + m[DOWN], m[metric]) for m in pts
                   if _number(m.get(UP)) is not None and _number(m.get(DOWN)) is not None]
            if tot:
                axes[2].plot(*zip(*tot, strict=True), marker="o", ms=3, label=name)
                drawn[2] = True
        loss = [(m["round"], m["train/loss"]) for m in history if _number(m.get("train/loss")) is not None]
        if loss:
            axes[3].plot(*zip(*loss, strict=True), marker=".", label=name)
            drawn[3] = True
    labels_ = [("round", metric), ("cumulative uplink bits", metric),
               ("cumulative uplink + downlink bits", metric), ("round", "train/loss")]
    for i, (ax, (x, y)) in enumerate(zip(axes, labels_, strict=True)):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if i in (1, 2) and drawn[i]:
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if drawn[i]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare(dirs: Sequence[str | Path], out: str | Path = "comparison.png", csv_path: str | Path | None = None,
            metric: str = "eval/accuracy", say=print) -> list[dict[str, Any]]:
    """Print the runs in ``dirs`` side by side, write the plot to ``out`` (and the
    table to ``csv_path``); returns the rows."""
    paths = find_runs(dirs)
    names = labels(paths)
    rows, histories = [], {}
    for name, p in zip(names, paths, strict=True):
        _, history = read_run(p)
        row = summarize_run(p, (metric,), history)
        row["name"] = name
        rows.append(row)
        histories[name] = history
    columns = list(TABLE)
    if metric not in ("eval/accuracy", "eval/loss"):
        columns[5:5] = [(f"final_{column(metric)}", f"final {metric}"), (f"best_{column(metric)}", f"best {metric}")]
    say(format_table(rows, columns))
    png = plot_comparison(histories, out, metric)
    say(f"\nplot: {png}")
    if csv_path is not None:
        say(f"table: {write_csv(rows, csv_path)}")
    return rows
