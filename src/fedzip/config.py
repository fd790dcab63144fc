"""A run is defined by a :class:`RunConfig` and nothing else.

This module is where strings become objects: aggregator names, optimizer
names and data set names are resolved here (and only here), with one clear
error naming the field for anything unknown, mistyped or out of range —
before any training starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fedzip.aggregators import Aggregator, compression_aggregator, mean, robust_aggregator
from fedzip.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Defaults are the seed tutorial's."""

    dataset: str = "mnist5k"
    aggregator: str = "mean"
    broadcast: str = "float32"
    rounds: int = 10
    clients_per_round: int = 10
    batch_size: int = 20
    epochs: int = 1
    shuffle_buffer: int = 418
    client_optimizer: str = "sgd"
    client_lr: float = 0.02
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    eval_every: int = 0
    eval_batch_size: int = 500
    seed: int = 0
    min_clients: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    num_workers: int = 2
    threads: int | None = None
    device: str | None = None
    checkpoint_every: int = 0
    name: str = "run"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
        _positive(self, "rounds", "clients_per_round", "batch_size", "epochs", "shuffle_buffer",
                  "eval_batch_size", "num_workers")
        _non_negative(self, "eval_every", "checkpoint_every", "server_momentum", "seed")
        for name in ("client_lr", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.device is not None:
            from fedzip.algorithms.fedavg import resolve_device

            # Ray hides GPUs from actors that do not reserve them (num_gpus)
            if resolve_device(self.device).type != "cpu" and self.backend == "ray":
                raise ConfigError(f"device {self.device!r} works with backend 'local' only; "
                                  "Ray workers train on the CPU")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {self.threads!r}")
        if self.min_clients is not None and self.min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1 or null, got {self.min_clients!r}")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        for name, table in (("client_optimizer", OPTIMIZERS), ("server_optimizer", OPTIMIZERS)):
            if getattr(self, name) not in table:
                raise ConfigError(f"{name} {getattr(self, name)!r} unknown; choose from {sorted(table)}")
        build_aggregator(self.aggregator)  # validates the spec
        build_broadcast(self.broadcast)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if isinstance(raw, dict) and "config" in raw and isinstance(raw["config"], dict):
            raw = raw["config"]  # a run's written run.json: {"config": ..., "versions": ...}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _check_type(name: str, value: Any, annotation: str) -> None:
    ann = str(annotation)
    optional = "None" in ann
    if value is None:
        if not optional:
            raise ConfigError(f"{name} must not be null")
        return
    if ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    elif ann.startswith("str"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name} must be of type {ann}, got {type(value).__name__} {value!r}")


def _positive(cfg: RunConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 1:
            raise ConfigError(f"{n} must be >= 1, got {getattr(cfg, n)!r}")


def _non_negative(cfg: RunConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{n} must be >= 0, got {getattr(cfg, n)!r}")


# --------------------------------------------------------------------------
# Names to objects
# --------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., type[torch.optim.Optimizer]]] = {
    "sgd": lambda: torch.optim.SGD,
    "adam": lambda: torch.optim.Adam,
    "adagrad": lambda: torch.optim.Adagrad,
}


def build_optimizer(name: str, lr: float, momentum: float = 0.0) -> Callable:
    """A factory ``params -> torch.optim.Optimizer``."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r} unknown; choose from {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]()
    if cls is torch.optim.SGD:
        return functools.partial(cls, lr=lr, momentum=momentum)
    return functools.partial(cls, lr=lr)


def _parse_spec(spec: str, field: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` → ``(name, {key: value})`` (values: int, float, bool, str)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{field} must be a non-empty string")
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, raw = part.partition("=")
        if not eq:
            raise ConfigError(f"{field} {spec!r}: option {part!r} must be key=value")
        opts[key.strip()] = _literal(raw.strip())
    return name.strip(), opts


def _literal(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "mean": lambda **kw: mean(**kw),
    "robust": lambda **kw: robust_aggregator(mean(), **kw),
    "compression": lambda **kw: compression_aggregator(**kw),
}


def build_aggregator(spec: str) -> Aggregator:
    """``mean``, ``robust``, ``compression`` or ``compression:bits=4,threshold=20000``;
    codec names from :func:`fedzip.codecs.registry` give ``mean`` over that codec
    above TFF's threshold, e.g. ``eden:bits=2``."""
    name, opts = _parse_spec(spec, "aggregator")
    if name in AGGREGATORS:
        try:
            return AGGREGATORS[name](**opts)
        except TypeError as e:
            raise ConfigError(f"aggregator {spec!r}: {e}") from None
    codec_factory = _codec_registry().get(name)
    if codec_factory is None:
        raise ConfigError(
            f"aggregator {name!r} unknown; choose from {sorted(AGGREGATORS)} or a codec name "
            f"{sorted(_codec_registry())}"
        )
    from fedzip.codecs import above_threshold

    threshold = opts.pop("threshold", 20_000)
    return mean(above_threshold(_make_codec(name, codec_factory, opts, spec), threshold))


def build_broadcast(spec: str):
    """The downlink codec policy: ``float32`` (default) or a codec spec."""
    from fedzip.codecs import CodecPolicy, above_threshold

    name, opts = _parse_spec(spec, "broadcast")
    if name == "float32":
        return CodecPolicy()
    factory = _codec_registry().get(name)
    if factory is None:
        raise ConfigError(f"broadcast codec {name!r} unknown; choose float32 or {sorted(_codec_registry())}")
    threshold = opts.pop("threshold", 20_000)
    return above_threshold(_make_codec(name, factory, opts, spec), threshold)


def _make_codec(name: str, factory: Callable, opts: dict[str, Any], spec: str):
    try:
        return factory(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"codec {spec!r}: {e}") from None


def _codec_registry() -> dict[str, Callable]:
    from fedzip import codecs

    reg = getattr(codecs, "registry", None)
    if callable(reg):
        return dict(reg())
    return {"uniform": codecs.UniformQuantization}
