"""Sweeps: a grid of runs, in parallel, resumable, with one results table.

``fedzip sweep SWEEP_FILE`` (or :func:`run_sweep`) expands a grid over any
:class:`~fedzip.config.RunConfig` field into separate runs, runs them in
parallel worker processes (``--jobs N``; each a subprocess of its own with
``--threads`` torch threads) or as Ray tasks (``--backend ray``), and writes
one table of results and a plot of accuracy against bits with error bars
over seeds.

The sweep file
--------------
JSON (or YAML, ``.yaml``/``.yml``, if PyYAML is installed) holding one object::

    {
      "name": "eden-bits",
      "base": {"dataset": "mnist5k", "rounds": 50, "eval_every": 5,
               "aggregator": {"type": "clipping", "norm": 1.0,
                              "inner": {"type": "mean", "threshold": 0,
                                        "codec": {"type": "eden", "bits": 2}}}},
      "grid": {"aggregator.inner.codec.bits": [1, 2, 4],
               "client_lr": [0.02, 0.05],
               "seed": [0, 1, 2]},
      "variants": {"plain": {}, "down8": {"broadcast": "eden:bits=8,threshold=0"}}
    }

``name``
    the sweep's name (default: the file's name without its suffix); its runs
    go to ``--logdir`` (default ``runs/NAME``).
``base``
    :class:`RunConfig` fields every run shares (defaults for the rest); its
    ``name`` is ignored: each run is named from its grid values.
``grid``
    dotted path → list of values; the runs are every combination (the
    Cartesian product, in file order). A path starts with a ``RunConfig``
    field and goes into nested objects: ``aggregator.inner.codec.bits``
    sets ``bits`` in the ``codec`` object inside ``inner`` (every part but
    the last must exist in ``base``; the last may be new: a codec argument
    left at its default in the base). A field given as a spec string
    (``"eden:bits=2,threshold=0"``) takes one more part for one of its
    options: ``aggregator.bits`` (``aggregator.type`` replaces the name).
    Values may be anything the field takes: whole objects too.
``variants`` (optional)
    label → {dotted path: value}: named settings that change several fields
    together (an uplink and a downlink codec, say), crossed with the grid;
    each is applied to the base before the grid's values.

Every expanded config is checked by ``RunConfig.from_dict`` before any run
starts: a path that does not exist, an unknown field or a value of the
wrong type anywhere (deep in a nested codec too) fails with one error
naming the path and the grid point. Sweep runs checkpoint
(``checkpoint_every``: the base's, or ``max(1, rounds // 10)`` if it is 0),
so that ``resume`` works; once a run is complete only its newest checkpoint
is kept (``keep_checkpoints``, ``--keep-checkpoints``).

Runs and their folders
----------------------
Each run is a normal run folder (``run.json``, ``metrics.jsonl``,
TensorBoard events, ``checkpoints/``) in the sweep's logdir, named from its
grid values: the variant's label, then ``key=value`` for each grid path in
file order, joined by commas, ``key`` being the shortest tail of the path
that tells the grid's paths apart (``bits=2,client_lr=0.05,seed=1``).
Values are written as they are when they are made of ``A-Za-z0-9._+-``;
anything else (other characters, objects, long strings) is replaced by a
readable part and ``~`` and 8 hex digits of its SHA-1, so names are stable
(the same grid value gives the same name in every sweep), filesystem-safe
and unique. Next to the run's own files the sweep keeps ``sweep-run.json``
(the config, the grid point, every attempt with its wall time and exit
status, whether it completed) and ``sweep.log`` (the run's console output).

Running a sweep again skips the runs that completed with the same config,
resumes the others from their newest checkpoint (``run(..., resume=True)``:
an interrupted or killed run goes on where it stopped; a run whose
``rounds`` grew goes on to the new count) and starts the missing ones. A
folder holding a run with other settings (beyond those a resume may change,
:data:`fedzip.run.RESUME_MAY_CHANGE`) stops the sweep before anything
starts. A run that fails is reported with the end of its log; the others go
on, and the sweep ends with exit status 1.

Results
-------
In the logdir: ``results.csv`` (and ``results.parquet`` when pyarrow is
installed), one row per run: its grid values, status, task, data set,
algorithm, aggregator, final and best evaluation accuracy and loss (and of
``--metric``), cumulative uplink, downlink and total bits, the training
time from the metrics and the wall time of its attempts; ``groups.csv``,
one row per setting (the runs that differ only by ``seed``): the number of
seeds, mean, standard deviation and a confidence interval of each; and
``<metric>_vs_bits.png``: the metric against cumulative uplink bits and
against total bits, the mean over seeds with a band for the interval.

The interval is Student's t-interval for the mean over seeds (95% by
default): ``mean ± t(1 - (1 - confidence)/2, n - 1) · sd / sqrt(n)``, with
``sd`` the sample standard deviation (``n - 1``) of the n seeds, taken as
independent draws (:func:`t_interval`). Curves average the rounds every
seed of a setting evaluated, at the mean cumulative bits of that round.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedzip.checkpoint import checkpoint_dir, prune
from fedzip.compare import DOWN, UP, column, read_run, summarize_run, write_csv
from fedzip.config import RunConfig, _parse_spec
from fedzip.errors import ConfigError

RUN_FILE = "sweep-run.json"
LOG_FILE = "sweep.log"
SWEEP_KEYS = ("name", "base", "grid", "variants")
BACKENDS = ("local", "ray")
_FIELDS = [f.name for f in fields(RunConfig)]
_SPEC_FIELDS = [f.name for f in fields(RunConfig) if str(f.type).startswith("str | dict")]
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


# --------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its folder name, config and grid values."""

    name: str
    config: RunConfig
    point: dict[str, Any]          # grid path -> value
    variant: str | None = None
    group: str = ""                # the name without the seed: runs that differ only by seed


@dataclass
class Sweep:
    """A sweep file, read (see the module doc)."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "sweep"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "sweep", default_name: str = "sweep") -> Sweep:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a sweep file holds one object with {list(SWEEP_KEYS)}")
        unknown = sorted(set(raw) - set(SWEEP_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; a sweep file has {list(SWEEP_KEYS)}")
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ConfigError(f"{source}: name {name!r} must be a plain folder name")
        base = raw.get("base", {})
        if not isinstance(base, Mapping):
            raise ConfigError(f"{source}: base must be an object of RunConfig fields, got {base!r}")
        bad = sorted(set(base) - set(_FIELDS))
        if bad:
            raise ConfigError(f"{source}: base: unknown field(s) {bad}; valid fields: {_FIELDS}")
        grid = raw.get("grid", {})
        if not isinstance(grid, Mapping):
            raise ConfigError(f"{source}: grid must be an object of dotted path -> list of values")
        for path, values in grid.items():
            _check_path_text(path, f"{source}: grid")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: grid {path!r} must be a non-empty list of values, got {values!r}")
            keys = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{source}: grid {path!r} lists a value twice: {values!r}")
        variants = raw.get("variants", {})
        if not isinstance(variants, Mapping):
            raise ConfigError(f"{source}: variants must be an object of label -> {{dotted path: value}}")
        for label, changes in variants.items():
            if not isinstance(label, str) or not label:
                raise ConfigError(f"{source}: variant labels must be non-empty strings, got {label!r}")
            if not isinstance(changes, Mapping):
                raise ConfigError(f"{source}: variants[{label!r}] must be an object of dotted path -> value")
            for path in changes:
                _check_path_text(path, f"{source}: variants[{label!r}]")
        return cls(name, copy.deepcopy(dict(base)), {k: list(v) for k, v in grid.items()},
                   {k: dict(v) for k, v in variants.items()}, source)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "base": self.base, "grid": self.grid}
        if self.variants:
            out["variants"] = self.variants
        return json.loads(json.dumps(out))

    def with_base(self, assignments: Sequence[str]) -> Sweep:
        """A copy with ``PATH=VALUE`` assignments applied to the base (``--set``;
        VALUE is JSON, or a plain string where it is not)."""
        full = _full_base(self)
        for a in assignments:
            path, eq, text = a.partition("=")
            if not eq:
                raise ConfigError(f"--set {a!r}: write PATH=VALUE")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            _check_path_text(path.strip(), "--set")
            _set_path(full, path.strip(), value, "--set")
        default = RunConfig().to_dict()
        base = {k: v for k, v in full.items() if k in self.base or v != default[k]}
        return dataclasses.replace(self, base=base)

    def runs(self) -> list[SweepRun]:
        """Every run of the grid, each config checked (see the module doc)."""
        paths = list(self.grid)
        keys = _short_keys(paths)
        variants: list[tuple[str | None, dict[str, Any]]] = (
            list(self.variants.items()) if self.variants else [(None, {})])
        out: list[SweepRun] = []
        for (label, changes), values in itertools.product(variants, itertools.product(*self.grid.values())):
            point = dict(zip(paths, values, strict=True))
            where = f"{self.source}: " + (f"variant {label!r}, " if label is not None else "") + (
                "grid point (" + ", ".join(f"{p}={v!r}" for p, v in point.items()) + ")" if point else "base")
            cfg = _full_base(self)
            for path, value in changes.items():
                _set_path(cfg, path, value, f"{self.source}: variants[{label!r}]")
            for path, value in point.items():
                _set_path(cfg, path, value, where)
            parts = [_label_slug(label)] if label is not None else []
            group = list(parts)
            for path, value in point.items():
                part = f"{keys[path]}={_value_slug(value)}"
                parts.append(part)
                if path != "seed":
                    group.append(part)
            name = _cap(",".join(parts) or "run")
            cfg["name"] = name
            if not cfg.get("checkpoint_every"):
                rounds = cfg.get("rounds")
                cfg["checkpoint_every"] = max(1, rounds // 10) if isinstance(rounds, int) else 1
            try:
                config = RunConfig.from_dict(cfg, source=where)
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
            out.append(SweepRun(name, config, point, label, _cap(",".join(group) or "all")))
        seen: dict[str, SweepRun] = {}
        for r in out:
            if r.name in seen:
                raise ConfigError(f"{self.source}: two grid points give the run name {r.name!r}: "
                                  f"{seen[r.name].point} and {r.point}")
            seen[r.name] = r
        return out


def load_sweep(path: str | Path) -> Sweep:
    """A sweep file: JSON, or YAML (``.yaml``/``.yml``) when PyYAML is installed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML sweep files need PyYAML (pip install pyyaml); "
                              "or write it as JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"sweep file {path} is not valid JSON: {e}") from None
    return Sweep.from_dict(raw, source=str(path), default_name=path.stem)


def _full_base(sweep: Sweep) -> dict[str, Any]:
    return {**RunConfig().to_dict(), **copy.deepcopy(sweep.base)}


def _check_path_text(path: Any, where: str) -> None:
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        raise ConfigError(f"{where}: {path!r} is not a dotted path (field.key.key...)")
    top = path.split(".")[0]
    if top not in _FIELDS:
        raise ConfigError(f"{where}: unknown path {path!r}: {top!r} is not a RunConfig field; "
                          f"valid fields: {_FIELDS}")
    if top == "name":
        raise ConfigError(f"{where}: {path!r}: run names come from the grid values; "
                          "name the sweep with the file's \"name\"")


def _set_path(cfg: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set ``value`` at a dotted ``path`` in a full config dict (see the module doc)."""
    _check_path_text(path, where)
    parts = path.split(".")
    cfg[parts[0]] = _set_in(cfg[parts[0]], parts[1:], value, path, parts[0], where)


def _set_in(node: Any, rest: list[str], value: Any, path: str, at: str, where: str) -> Any:
    if not rest:
        return copy.deepcopy(value)
    key = rest[0]
    if isinstance(node, Mapping):
        node = dict(node)
        if len(rest) > 1 and key not in node:
            raise ConfigError(f"{where}: unknown path {path!r}: {at} has no {key!r} "
                              f"(its keys: {sorted(node)})")
        node[key] = _set_in(node.get(key), rest[1:], value, path, f"{at}.{key}", where)
        return node
    if isinstance(node, str) and len(rest) == 1 and at in _SPEC_FIELDS:
        name, opts = _parse_spec(node, at)
        if key == "type":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {path!r}: the name of a spec string must be a string")
            name = value
        else:
            text = _spec_value(value)
            if text is None:
                raise ConfigError(f"{where}: {path!r}: {value!r} cannot go into the spec string {node!r}; "
                                  f"write {at} as an object ({{\"type\": {name!r}, ...}}) in the base")
            opts[key] = text
        return name + (":" + ",".join(f"{k}={_spec_value(v)}" for k, v in opts.items()) if opts else "")
    raise ConfigError(f"{where}: unknown path {path!r}: {at} is {node!r}, not an object; write {at} as "
                      f"an object in the base to set {key!r} in it")


def _spec_value(v: Any) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str) and v and not any(c in v for c in ",=:"):
        return v
    return None


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:8]


def _slug(text: str, limit: int = 40) -> str:
    s = _SAFE.sub("_", text)
    if s != text or len(s) > limit or not s:
        s = f"{s[:limit]}~{_digest(text)}"
    return s


def _value_slug(v: Any) -> str:
    """A grid value as a name part (see the module doc: stable, safe, unique)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _slug(repr(v))
    if isinstance(v, str):
        return _slug(v)
    kind = v.get("type") if isinstance(v, Mapping) else None
    head = _SAFE.sub("_", kind)[:20] if isinstance(kind, str) else type(v).__name__
    return f"{head}~{_digest(v)}"


def _label_slug(label: str) -> str:
    s = _slug(label)
    return "_" + s if s.startswith((".", "-")) else s


def _cap(name: str, limit: int = 200) -> str:
    return name if len(name) <= limit else f"{name[:limit - 9]}~{_digest(name)}"


def _short_keys(paths: Sequence[str]) -> dict[str, str]:
    """The shortest tail of each dotted path that no other path ends with."""
    out = {}
    split = {p: p.split(".") for p in paths}
    for p, parts in split.items():
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            if not any(q != p and split[q][-k:] == tail for q in paths):
                break
        out[p] = ".".join(tail)
    return out


# --------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval for the mean of independent
    draws, ``mean ± t(1 - (1 - confidence)/2, n - 1) · sd / sqrt(n)`` with the
    sample standard deviation (``ddof=1``). With one value the bounds are NaN;
    with none, all three are."""
    import numpy as np
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation, ``n - 1``) of ``values``: "mean ± sd
    over seeds". The sd is NaN for one value; both are NaN for none."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    return m, (_std(values) if len(values) > 1 else math.nan)  # type: ignore[return-value]


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (an interval of one seed), so a
    summary stays plain JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def group_curve(histories: Sequence[Sequence[Mapping[str, Any]]], metric: str = "eval/accuracy",
                confidence: float = 0.95) -> list[dict[str, float]]:
    """The mean curve of runs that differ only by seed: for each round where
    every run has ``metric``, the mean cumulative uplink and total bits, the
    metric's mean and its t-interval."""
    per_run = []
    for h in histories:
        per_run.append({m["round"]: m for m in h if isinstance(m.get(metric), (int, float))
                        and not isinstance(m.get(metric), bool)})
    if not per_run:
        return []
    rounds = sorted(set.intersection(*(set(p) for p in per_run)))
    curve = []
    for r in rounds:
        ms = [p[r] for p in per_run]
        mean, low, high = t_interval([m[metric] for m in ms], confidence)
        up = [m.get(UP, math.nan) for m in ms]
        total = [m.get(UP, math.nan) + m.get(DOWN, math.nan) for m in ms]
        curve.append({"round": r, "uplink_bits": sum(up) / len(up), "total_bits": sum(total) / len(total),
                      "mean": mean, "low": low, "high": high})
    return curve


def summarize_groups(runs: Sequence[SweepRun], rows: Mapping[str, Mapping[str, Any]], metric: str,
                     confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per setting (the complete runs that differ only by seed): n, the
    seeds, and mean, sd and t-interval of the final and best ``metric``; the
    mean bits and times."""
    groups: dict[str, list[SweepRun]] = {}
    for r in runs:
        if rows[r.name].get("status") == "complete":
            groups.setdefault(r.group, []).append(r)
    out = []
    pct = f"ci{round(100 * confidence):d}"
    for g, members in groups.items():
        row: dict[str, Any] = {"group": g}
        if members[0].variant is not None:
            row["variant"] = members[0].variant
        row.update({p: v for p, v in members[0].point.items() if p != "seed"})
        row["n"] = len(members)
        row["seeds"] = " ".join(str(m.config.seed) for m in members)
        for which in ("final", "best"):
            key = f"{which}_{column(metric)}"
            values = [rows[m.name][key] for m in members if rows[m.name].get(key) is not None]
            mean, low, high = t_interval(values, confidence)
            row[f"{key}_mean"] = _finite(mean)
            row[f"{key}_sd"] = _std(values)
            row[f"{key}_{pct}_low"] = _finite(low)
            row[f"{key}_{pct}_high"] = _finite(high)
        for key in ("uplink_bits", "downlink_bits", "total_bits", "time_s", "wall_s"):
            values = [rows[m.name][key] for m in members if rows[m.name].get(key) is not None]
            row[f"{key}_mean"] = _mean(values)
        out.append(row)
    return out


def plot_groups(curves: Mapping[str, Sequence[Mapping[str, float]]], out: str | Path,
                metric: str = "eval/accuracy", confidence: float = 0.95, title: str = "") -> Path:
    """``metric`` against cumulative uplink bits and against total bits: each
    setting's mean over seeds, with its t-interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap("tab10").colors
    for i, (name, curve) in enumerate(curves.items()):
        if not curve:
            continue
        c = colors[i % len(colors)]
        for ax, xkey in zip(axes, ("uplink_bits", "total_bits"), strict=True):
            xs = [p[xkey] for p in curve]
            ax.plot(xs, [p["mean"] for p in curve], marker=".", color=c, label=name,
                    linestyle=("-", "--", ":", "-.")[(i // len(colors)) % 4])
            if any(math.isfinite(p["low"]) for p in curve):
                ax.fill_between(xs, [p["low"] for p in curve], [p["high"] for p in curve], color=c, alpha=0.2,
                                linewidth=0)
    for ax, x in zip(axes, ("cumulative uplink bits", "cumulative uplink + downlink bits"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        if any(curves.values()):
            ax.legend(fontsize=7)
    fig.suptitle(f"{title + ': ' if title else ''}mean over seeds, band: {round(100 * confidence)}% "
                 "t-interval")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass
class SweepResult:
    logdir: Path
    runs: list[SweepRun]
    status: dict[str, str]          # name -> skipped | ran | resumed | failed | planned
    rows: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    table: Path | None = None
    plot: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.status.items() if s == "failed"]


def _read_state(rundir: Path) -> dict[str, Any]:
    try:
        state = json.loads((rundir / RUN_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(rundir: Path, state: Mapping[str, Any]) -> None:
    from fedzip.fileio import atomic_write

    rundir.mkdir(parents=True, exist_ok=True)
    atomic_write(rundir / RUN_FILE, json.dumps(state, indent=1).encode("utf-8"))


def _saved_config(rundir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((rundir / "run.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta.get("config") if isinstance(meta, dict) and isinstance(meta.get("config"), dict) else None


def _checkpoint_round(rundir: Path) -> int | None:
    from fedzip import checkpoint

    found = checkpoint.list_checkpoints(checkpoint.checkpoint_dir(rundir))
    if not found:
        return None
    m = re.match(r"round-(\d+)\.ckpt$", found[-1].name)
    return int(m.group(1)) if m else None


def plan(runs: Sequence[SweepRun], logdir: Path) -> dict[str, str]:
    """name → ``complete`` (done with this config: skipped), ``resume`` (a run
    folder is there: resumed from its newest checkpoint, or from round 0) or
    ``new``. A folder holding a run with other settings is an error."""
    from fedzip.run import RESUME_MAY_CHANGE

    out, clashes = {}, []
    for r in runs:
        rundir = logdir / r.name
        want = r.config.to_dict()
        state = _read_state(rundir)
        if state.get("complete") and state.get("config") == want:
            out[r.name] = "complete"
            continue
        saved = _saved_config(rundir)
        if saved is None and not (rundir / "metrics.jsonl").exists() and _checkpoint_round(rundir) is None:
            out[r.name] = "new"
            continue
        if saved is not None:
            diff = sorted(k for k, v in want.items() if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v)
            if diff:
                clashes.append(f"{rundir} ({', '.join(f'{k}={saved[k]!r}, now {want[k]!r}' for k in diff[:3])})")
        out[r.name] = "resume"
    if clashes:
        raise ConfigError(f"{len(clashes)} run folder(s) hold runs with other settings, e.g. {clashes[0]}; "
                          "delete them or give another --logdir")
    return out


def _worker_main(argv: Sequence[str]) -> int:
    """A sweep run in this process: ``RUNDIR [THREADS]`` (what ``--jobs`` starts)."""
    rundir = Path(argv[0])
    if len(argv) > 1 and argv[1] != "0":
        import torch

        torch.set_num_threads(int(argv[1]))
    from fedzip.errors import FedzipError
    from fedzip.run import run

    try:
        config = RunConfig.from_dict(_read_state(rundir)["config"], source=str(rundir / RUN_FILE))
        run(config, rundir, resume=True, console=True)
    except FedzipError as e:
        print(f"fedzip: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def _ray_task(rundir: str, threads: int) -> int:  # pragma: no cover - runs on Ray workers
    with open(Path(rundir) / LOG_FILE, "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return _worker_main([rundir, str(threads)])
        except Exception:  # noqa: BLE001 - the log says what; the driver sees the status
            traceback.print_exc()
            return 1


def _tail(path: Path, n: int = 4) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:]) or "    (the log is empty)"


def run_sweep(
    sweep: Sweep | str | Path,
    logdir: str | Path | None = None,
    jobs: int | None = None,
    backend: str = "local",
    threads: int | None = None,
    ray_address: str | None = None,
    dry_run: bool = False,
    metric: str = "eval/accuracy",
    confidence: float = 0.95,
    keep_checkpoints: int = 1,
    say: Callable[[str], None] = print,
) -> SweepResult:
    """Run a sweep (see the module doc) and write its table and plot.

    ``jobs``: runs at a time (default 1; 0 runs them one after another in
    this process, for debugging: a crash then ends the sweep). ``backend``:
    ``local`` (a subprocess per run) or ``ray`` (a Ray task per run, on
    ``ray_address`` or a local Ray; ``jobs`` caps the runs in flight, default
    all). ``threads``: torch threads per run (default the cores over
    ``jobs``). ``keep_checkpoints``: how many of a finished run's newest
    checkpoints to keep (default 1, enough to extend it with more rounds; 0
    deletes them): a run's state can be large (error feedback keeps a
    residual per client, 1.8 GB for the seed CNN's 284 writers), and a grid of
    them would otherwise hold several per run."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if jobs is not None and jobs < 0:
        raise ConfigError(f"jobs must be >= 0, got {jobs}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 0:
        raise ConfigError(f"keep_checkpoints must be an integer >= 0, got {keep_checkpoints!r}")
    if backend == "ray" and jobs == 0:
        raise ConfigError("jobs 0 (in this process) works with backend 'local' only")
    runs = sweep.runs()                       # every config checked before anything starts
    logdir = Path(logdir) if logdir is not None else Path("runs") / sweep.name
    plans = plan(runs, logdir)
    todo = [r for r in runs if plans[r.name] != "complete"]
    if jobs is None:
        jobs = len(todo) if backend == "ray" else 1
    if threads is None and jobs > 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, max(1, len(todo)))))
    counts = {k: sum(v == k for v in plans.values()) for k in ("complete", "resume", "new")}
    say(f"sweep {sweep.name}: {len(runs)} runs in {logdir}: {counts['complete']} complete (skipped), "
        f"{counts['resume']} to resume, {counts['new']} new"
        + ("" if not todo else f"; {'in this process' if jobs == 0 else f'{jobs} at a time'}"
           + (f" on {backend}" if backend == "ray" else "")
           + (f", {threads} torch thread(s) each" if threads else "")))
    status = {r.name: "skipped" if plans[r.name] == "complete" else "planned" for r in runs}
    if dry_run:
        for r in runs:
            say(f"  {plans[r.name]:8s} {r.name}")
        return SweepResult(logdir, runs, status, [], [])
    logdir.mkdir(parents=True, exist_ok=True)
    from fedzip.fileio import atomic_write

    atomic_write(logdir / "sweep.json", json.dumps(
        {"sweep": sweep.to_dict(), "runs": [{"name": r.name, "group": r.group, "variant": r.variant,
                                             "point": r.point} for r in runs]}, indent=1).encode("utf-8"))
    for r in todo:
        state = _read_state(logdir / r.name)
        _write_state(logdir / r.name, {"sweep": sweep.name, "config": r.config.to_dict(), "point": r.point,
                                       "variant": r.variant, "group": r.group,
                                       "attempts": state.get("attempts", []), "complete": False})
    done = [0]

    def finish(r: SweepRun, code: int | None, wall: float, started: str) -> None:
        rundir = logdir / r.name
        state = _read_state(rundir)
        state.setdefault("attempts", []).append({"started": started, "wall_s": wall, "exit": code})
        state["complete"] = code == 0
        _write_state(rundir, state)
        done[0] += 1
        resumed = plans[r.name] == "resume"
        if code == 0:
            prune(checkpoint_dir(rundir), keep_checkpoints)
            status[r.name] = "resumed" if resumed else "ran"
            _, history = read_run(rundir)
            last = next((m[metric] for m in reversed(history) if m.get(metric) is not None), None)
            shown = f", {metric} {last:.4f}" if isinstance(last, (int, float)) else ""
            say(f"[{done[0]}/{len(todo)}] {r.name}: {'resumed and ' if resumed else ''}done in {wall:.1f} s{shown}")
        else:
            status[r.name] = "failed"
            say(f"[{done[0]}/{len(todo)}] {r.name}: FAILED (exit {code}) after {wall:.1f} s; "
                f"the end of {rundir / LOG_FILE}:\n{_tail(rundir / LOG_FILE)}")

    for r in todo:
        if plans[r.name] == "resume":
            ck = _checkpoint_round(logdir / r.name)
            say(f"  {r.name}: resuming " + (f"after round {ck}" if ck is not None else "from round 0"))
    if todo:
        if jobs == 0:
            _run_inline(todo, logdir, finish)
        elif backend == "local":
            _run_processes(todo, logdir, jobs, threads or 1, finish)
        else:
            _run_ray(todo, logdir, jobs, threads or 1, ray_address, finish)
    return _report(sweep, runs, status, logdir, metric, confidence, say)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _run_inline(todo: Sequence[SweepRun], logdir: Path, finish) -> None:
    from fedzip.errors import FedzipError
    from fedzip.run import run

    for r in todo:
        rundir = logdir / r.name
        started, t0 = _now(), time.perf_counter()
        code = 0
        with open(rundir / LOG_FILE, "a", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                run(r.config, rundir, resume=True, console=True)
            except FedzipError as e:
                print(f"fedzip: error: {e}")
                code = 2
            except Exception:  # noqa: BLE001 - one run's failure is reported; the sweep goes on
                traceback.print_exc()
                code = 1
        finish(r, code, time.perf_counter() - t0, started)


_WORKER = "import sys; from fedzip.sweep import _worker_main; sys.exit(_worker_main(sys.argv[1:]))"


def _run_processes(todo: Sequence[SweepRun], logdir: Path, jobs: int, threads: int, finish) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[SweepRun, float, str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                rundir = logdir / r.name
                log = open(rundir / LOG_FILE, "ab")
                p = subprocess.Popen([sys.executable, "-c", _WORKER, str(rundir), str(threads)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                running[p] = (r, time.perf_counter(), _now(), log)
            time.sleep(0.05)
            for p in [p for p in running if p.poll() is not None]:
                r, t0, started, log = running.pop(p)
                log.close()
                finish(r, p.returncode, time.perf_counter() - t0, started)
    except BaseException:
        for p in running:  # interrupted: the runs stop; rerun to resume
            p.terminate()
        for p, (r, t0, started, log) in running.items():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
            finish(r, p.returncode, time.perf_counter() - t0, started)
        raise


def _run_ray(todo: Sequence[SweepRun], logdir: Path, jobs: int, threads: int, address: str | None,
             finish) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend 'ray' needs Ray: pip install 'fedzip[ray]'") from None
    started_ray = False
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, threads), include_dashboard=False)
        else:
            ray.init(address=address)
        started_ray = True
    task = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
    pending = list(todo)
    running: dict[Any, tuple[SweepRun, float, str]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                running[task.remote(str((logdir / r.name).resolve()), threads)] = (r, time.perf_counter(), _now())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                r, t0, started = running.pop(ref)
                try:
                    code = int(ray.get(ref))
                except Exception as e:  # noqa: BLE001 - a crashed worker is a failed run
                    with open(logdir / r.name / LOG_FILE, "a", encoding="utf-8") as log:
                        print(f"fedzip sweep: the Ray task failed: {type(e).__name__}: {e}", file=log)
                    code = 1
                finish(r, code, time.perf_counter() - t0, started)
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _parquet_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Columns of one type each: a column that mixes types becomes text."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = [dict.fromkeys(cols) | dict(r) for r in rows]
    for c in cols:
        kinds = {("num" if isinstance(r[c], (int, float)) and not isinstance(r[c], bool) else type(r[c]).__name__)
                 for r in out if r[c] is not None}
        if len(kinds) > 1 or kinds & {"dict", "list"}:
            for r in out:
                if r[c] is not None:
                    r[c] = r[c] if isinstance(r[c], str) else json.dumps(r[c])
    return out


def _report(sweep: Sweep, runs: Sequence[SweepRun], status: dict[str, str], logdir: Path, metric: str,
            confidence: float, say: Callable[[str], None]) -> SweepResult:
    rows: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        rundir = logdir / r.name
        state = _read_state(rundir)
        row: dict[str, Any] = {"name": r.name, "group": r.group}
        complete = state.get("complete") and state.get("config") == r.config.to_dict()
        row["status"] = "complete" if complete else "failed" if status[r.name] == "failed" else "incomplete"
        if r.variant is not None:
            row["variant"] = r.variant
        row.update({p: (json.dumps(v) if isinstance(v, (dict, list)) else v) for p, v in r.point.items()})
        if (rundir / "run.json").exists():
            _, history = read_run(rundir)
            histories[r.name] = history
            summary = summarize_run(rundir, (metric,), history)
            summary.pop("name")
            row.update({k: v for k, v in summary.items() if k not in row})
        attempts = state.get("attempts", [])
        row["wall_s"] = sum(a.get("wall_s") or 0 for a in attempts) if attempts else None
        row["attempts"] = len(attempts)
        if "path" in row:
            row["path"] = row.pop("path")  # last
        rows[r.name] = row
    table = list(rows.values())
    csv_path = write_csv(table, logdir / "results.csv")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        pq.write_table(pa.Table.from_pylist(_parquet_rows(table)), logdir / "results.parquet")
    groups = summarize_groups(runs, rows, metric, confidence)
    write_csv(groups, logdir / "groups.csv")
    curves = {}
    for g in groups:
        members = [histories[r.name] for r in runs if r.group == g["group"] and r.name in histories
                   and rows[r.name]["status"] == "complete"]
        curves[g["group"] + (f" (n={g['n']})" if g["n"] > 1 else "")] = group_curve(members, metric, confidence)
    png = plot_groups(curves, logdir / f"{metric.split('/')[-1]}_vs_bits.png", metric, confidence, sweep.name)
    say("")
    say(format_groups(groups, metric, confidence))
    say(f"\ntable: {csv_path}" + (" (and results.parquet)" if (logdir / "results.parquet").exists() else "")
        + f"; per setting: {logdir / 'groups.csv'}\nplot: {png}")
    return SweepResult(logdir, list(runs), status, table, groups, csv_path, png)


def format_groups(groups: Sequence[Mapping[str, Any]], metric: str, confidence: float = 0.95) -> str:
    """The per-setting table: final and best ``metric`` as mean ± sd with the
    t-interval, and the mean bits and wall time."""
    from fedzip.metrics import format_bits

    pct = f"ci{round(100 * confidence):d}"
    key = column(metric)
    header = (f"{'setting':32s} {'n':>2s}  {'final ' + metric + ' mean ± sd':>28s}  "
              f"{str(round(100 * confidence)) + '% t-interval':>18s}  {'best mean ± sd':>17s}  "
              f"{'uplink':>11s}  {'downlink':>11s}  {'wall s':>7s}")
    lines = [header]

    def pm(prefix: str) -> str:
        m, s = g.get(f"{prefix}_mean"), g.get(f"{prefix}_sd")
        if m is None:
            return ""
        return f"{m:.4f} ± {s:.4f}" if s is not None else f"{m:.4f}"

    for g in groups:
        lo, hi = g.get(f"final_{key}_{pct}_low"), g.get(f"final_{key}_{pct}_high")
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else ""
        up, down, wall = g.get("uplink_bits_mean"), g.get("downlink_bits_mean"), g.get("wall_s_mean")
        name = g["group"] if len(g["group"]) <= 32 else g["group"][:31] + "…"
        lines.append(f"{name:32s} {g['n']:2d}  {pm(f'final_{key}'):>28s}  {ci:>18s}  {pm(f'best_{key}'):>17s}  "
                     f"{format_bits(up) if up is not None else '':>11s}  "
                     f"{format_bits(down) if down is not None else '':>11s}  "
                     f"{f'{wall:.1f}' if wall is not None else '':>7s}")
    return "\n".join(lines)
