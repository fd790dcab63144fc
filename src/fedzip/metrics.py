"""Where round metrics go: the console (one line per round, as the seed
tutorial prints), a JSONL file per run, TensorBoard event files, and a PNG
that compares runs."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

_UNITS = ["bit", "Kibit", "Mibit", "Gibit", "Tibit", "Pibit"]


def format_bits(bits: float) -> str:
    """Binary units, as TFF's tutorial prints them: ``507.62Mibit``."""
    value, unit = float(bits), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.2f}{_UNITS[unit]}"


def format_round(m: Mapping[str, Any]) -> str:
    """One line per round with train metrics and per-round and cumulative bits."""
    parts = [f"round {m['round']:2d}"]
    if "train/loss" in m:
        parts += [
            f"loss={m['train/loss']:.4f}",
            f"accuracy={m['train/accuracy']:.4f}",
            f"num_examples={m['train/num_examples']}",
            f"num_batches={m['train/num_batches']}",
        ]
    for key in ("broadcasted_bits", "aggregated_bits"):
        if key in m:
            # the total on the wire, the tensor data inside it, and the running total
            data = f" [tensors {format_bits(m[key + '/tensors'])}]" if key + "/tensors" in m else ""
            cum = format_bits(m.get(key + "/cumulative", m[key]))
            parts.append(f"{key}={format_bits(m[key])}{data} (cumulative {cum})")
    if "eval/accuracy" in m:
        parts.append(f"eval_loss={m['eval/loss']:.4f} eval_accuracy={m['eval/accuracy']:.4f}")
    if m.get("clients/failed"):
        parts.append(f"failed_clients={m['clients/failed']}")
    return ", ".join(parts)


class MetricWriter(Protocol):
    def write(self, metrics: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    }


class ConsoleWriter:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def write(self, metrics: Mapping[str, Any]) -> None:
        print(self.prefix + format_round(metrics), flush=True)

    def close(self) -> None:
        pass


class ProgressWriter:
    """A tqdm progress bar over rounds (on ``file``, stderr by default), with
    the console's line per round printed above it (``tqdm.write``), so the
    two never garble each other. ``run()`` uses it in place of
    :class:`ConsoleWriter` when stderr is a terminal (:func:`console_writer`)."""

    def __init__(self, total: int, initial: int = 0, prefix: str = "", file: Any = None,
                 lines: bool = True) -> None:
        from tqdm import tqdm

        self.prefix, self.lines, self._tqdm = prefix, lines, tqdm
        self.bar = tqdm(total=total, initial=initial, desc=prefix.strip() or None, unit="round",
                        file=file, dynamic_ncols=True, leave=True)

    def write(self, metrics: Mapping[str, Any]) -> None:
        if self.lines:
            self._tqdm.write(self.prefix + format_round(metrics), file=sys.stdout)
        post = {k: f"{metrics[f'train/{k}']:.4f}" for k in ("loss", "accuracy") if f"train/{k}" in metrics}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def console_writer(prefix: str, total: int, initial: int = 0) -> MetricWriter:
    """The console's writer: a progress bar with the lines above it when stderr
    is a terminal, the plain line per round otherwise (logs, pipes, CI)."""
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is not None and isatty():
        return ProgressWriter(total, initial, prefix)
    return ConsoleWriter(prefix)


class JsonlWriter:
    """Appends one JSON object per round and hands it to the operating system
    at once (flush), so a crash of the process loses at most the line being
    written; it forces it to the disk (fsync) at most every ``sync_every_s``
    seconds and on close, so a crash of the machine loses at most that much.
    (An fsync per round cost 2 to 10 ms, 1-2% of a seed-workload round.)"""

    def __init__(self, path: str | Path, sync_every_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync_every_s = sync_every_s
        self._f = open(self.path, "a", encoding="utf-8")
        self._synced = time.monotonic()

    def write(self, metrics: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._f.write(json.dumps(clean, sort_keys=True) + "\n")
        self._f.flush()
        if time.monotonic() - self._synced >= self.sync_every_s:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class TensorBoardWriter:
    """Scalars under ``logdir``; runs in sibling folders show as separate curves."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step: on resume, TensorBoard hides events from that step on, so
        # each round appears once
        self._w = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def write(self, metrics: Mapping[str, Any]) -> None:
        step = int(metrics["round"])
        for k, v in numeric(metrics).items():
            if math.isfinite(v):
                self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class MultiWriter:
    def __init__(self, writers: Iterable[MetricWriter]) -> None:
        self.writers = list(writers)

    def write(self, metrics: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write(metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path) -> Path:
    """Compare runs: train loss, train accuracy and cumulative aggregated bits
    against round, and accuracy against cumulative uplink bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [
        ("train/loss", "train loss", False),
        ("train/accuracy", "train accuracy", False),
        ("aggregated_bits/cumulative", "cumulative aggregated bits (Mibit)", True),
    ]
    for name, history in runs.items():
        rounds = [m["round"] for m in history]
        for ax, (key, label, mib) in zip(axes, panels, strict=False):
            ys = [m.get(key, float("nan")) for m in history]
            ax.plot(rounds, [y / 2**20 for y in ys] if mib else ys, marker="o", label=name)
            ax.set_xlabel("round")
            ax.set_ylabel(label)
        xs = [m.get("aggregated_bits/cumulative", float("nan")) / 2**20 for m in history]
        axes[3].plot(xs, [m.get("train/accuracy", float("nan")) for m in history], marker="o", label=name)
    axes[3].set_xlabel("cumulative aggregated bits (Mibit)")
    axes[3].set_ylabel("train accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
