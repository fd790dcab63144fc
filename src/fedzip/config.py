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
    task: str = "auto"
    algorithm: str | dict = "fedavg"
    aggregator: str | dict = "mean"
    broadcast: str | dict = "float32"
    rounds: int = 10
    clients_per_round: int = 10
    batch_size: int = 20
    epochs: int = 1
    shuffle_buffer: int = 418
    max_batches: int | None = None
    client_optimizer: str | dict = "sgd"
    client_lr: float = 0.02
    server_optimizer: str | dict = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    eval_every: int = 0
    eval_batch_size: int = 500
    eval_clients: int | None = None
    seed: int = 0
    min_clients: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    num_workers: int = 2
    threads: int | None = None
    batch_clients: int = 1
    device: str | None = None
    checkpoint_every: int = 0
    name: str = "run"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
        _positive(self, "rounds", "clients_per_round", "batch_size", "epochs", "shuffle_buffer",
                  "eval_batch_size", "num_workers", "batch_clients")
        if self.batch_clients > 1 and self.backend != "local":
            raise ConfigError(f"batch_clients > 1 works with backend 'local' only, got {self.backend!r}")
        for name in ("max_batches", "eval_clients"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {getattr(self, name)!r}")
        _non_negative(self, "eval_every", "checkpoint_every", "server_momentum", "seed")
        for name in ("client_lr", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.device is not None:
            from fedzip.algorithms.base import resolve_device

            # Ray hides GPUs from actors that do not reserve them (num_gpus)
            if resolve_device(self.device).type != "cpu" and self.backend == "ray":
                raise ConfigError(f"device {self.device!r} works with backend 'local' only; "
                                  "Ray workers train on the CPU")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {self.threads!r}")
        if self.min_clients is not None and self.min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1 or null, got {self.min_clients!r}")
        if self.backend not in ("local", "processes", "ray"):
            raise ConfigError(f"backend must be 'local', 'processes' or 'ray', got {self.backend!r}")
        for name in ("client_optimizer", "server_optimizer"):
            build_optimizer(getattr(self, name), 1.0, field=name)  # validates the spec
        build_aggregator(self.aggregator)
        build_broadcast(self.broadcast)
        build_algorithm_spec(self.algorithm)
        if ":" not in self.task and self.task not in ("auto", *_task_names()):
            raise ConfigError(f"task {self.task!r} unknown; choose from {['auto', *_task_names()]} "
                              "or give module.path:attribute")

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
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain JSON values (a copy)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


#: one line per field: the CLI's --help and the docs
FIELD_HELP: dict[str, str] = {
    "dataset": "data set name (mnist5k, unipen, shakespeare, h5:TRAIN,TEST, ...) or module:function "
               "returning (train, test, info)",
    "task": "what is learned: auto (the data set's own), images, shakespeare, or module:attribute",
    "algorithm": "fedavg, fedprox:mu=0.01, ... (name:key=value or a JSON object in a config file)",
    "aggregator": "uplink chain: mean, compression, robust, a codec spec like eden:bits=2, or a nested "
                  "JSON object",
    "broadcast": "downlink codec: float32 or a codec spec like eden:bits=4",
    "rounds": "number of rounds to run",
    "clients_per_round": "clients sampled each round (keyed by seed and round)",
    "batch_size": "client batch size",
    "epochs": "local epochs per round",
    "shuffle_buffer": "tf.data-style shuffle buffer of each client",
    "max_batches": "cap on the batches a client trains on per round (TFF's max_elements)",
    "client_optimizer": "client optimizer: sgd, adam, adagrad, module:Class, or a JSON object with "
                        "its arguments",
    "client_lr": "client learning rate (unless the optimizer object sets lr)",
    "server_optimizer": "server optimizer on minus the mean delta: sgd (FedAvg), adam, adagrad, ...",
    "server_lr": "server learning rate (1.0 with sgd is plain FedAvg)",
    "server_momentum": "server SGD momentum (FedAvgM)",
    "eval_every": "evaluate on the test clients every N rounds (0: only after the last)",
    "eval_batch_size": "batch size of evaluation",
    "eval_clients": "evaluate on this many test clients, the same sample every time (default all)",
    "seed": "seed of every random draw (sampling, shuffling, codecs)",
    "min_clients": "clients that must succeed for a round to count (default all)",
    "backend": "where client work runs: local (in process), processes (worker processes here) or ray",
    "ray_address": "a Ray cluster to join (auto, host:6379, ray://...); default a fresh local one",
    "num_workers": "Ray workers",
    "threads": "torch threads per client worker (default: leave torch's setting locally)",
    "batch_clients": "clients trained together in one vectorized step (torch.func.vmap; backend local, "
                     "FedAvg's or FedProx's client step with SGD, a model without buffers; for GPUs)",
    "device": "where clients train and evaluation runs: cpu, cuda, ...",
    "checkpoint_every": "write a checkpoint every N rounds (0: never)",
    "name": "run name: metrics go to LOGDIR/NAME",
}


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
    elif ann.startswith("str | dict"):
        ok = isinstance(value, (str, dict))
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

OPTIMIZERS: dict[str, Callable[[], type[torch.optim.Optimizer]]] = {
    "sgd": lambda: torch.optim.SGD,
    "adam": lambda: torch.optim.Adam,
    "adagrad": lambda: torch.optim.Adagrad,
}


def build_optimizer(spec: str | Mapping[str, Any], lr: float, momentum: float = 0.0,
                    field: str = "optimizer") -> Callable:
    """A factory ``params -> torch.optim.Optimizer`` from a name (``"sgd"``, with
    the flat ``lr`` and ``momentum``) or a dict naming every argument:
    ``{"type": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 0.001}``
    (``lr`` defaults to the flat one). ``type`` may be ``module:Class``."""
    name, opts = name_and_options(spec, field)
    if name in OPTIMIZERS:
        cls: Any = OPTIMIZERS[name]()
    elif ":" in name:
        from fedzip.tasks.registry import import_path

        cls = import_path(name, field)
    else:
        raise ConfigError(f"{field} {name!r} unknown; choose from {sorted(OPTIMIZERS)} or module:Class")
    opts.setdefault("lr", lr)
    if cls is torch.optim.SGD:
        opts.setdefault("momentum", momentum)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    factory = functools.partial(cls, **opts)
    try:
        factory([torch.zeros(1, requires_grad=True)])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field} {spec!r}: {e}") from None
    return factory


def name_and_options(spec: str | Mapping[str, Any], field: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` or ``{"type": name, key: value, ...}`` → (name, options)."""
    if isinstance(spec, str):
        return _parse_spec(spec, field)
    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = opts.pop("type", None)
        if not isinstance(name, str):
            raise ConfigError(f"{field}: an object needs \"type\" (a name), got {dict(spec)!r}")
        return name, opts
    raise ConfigError(f"{field} must be a name or an object, got {spec!r}")


def _task_names() -> list[str]:
    from fedzip.tasks.registry import TASKS

    return list(TASKS)


#: algorithm name → (class path, one line)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "fedavg": ("fedzip.algorithms.fedavg:WeightedFedAvg", "FedAvg (weighted by the task; McMahan et al. 2017)"),
    "fedprox": ("fedzip.algorithms.fedprox:FedProx", "FedProx, proximal term mu (Li et al., MLSys 2020)"),
    "scaffold": ("fedzip.algorithms.scaffold:Scaffold",
                 "SCAFFOLD, control variates, option II (Karimireddy et al., ICML 2020); needs num_clients"),
    "mime": ("fedzip.algorithms.mime:MimeLite",
             "Mime-lite, server momentum beta frozen on clients (Karimireddy et al., NeurIPS 2021)"),
    "fedsgd": ("fedzip.algorithms.fedsgd:FedSGD", "FedSGD, one full-batch gradient per client (McMahan et al. 2017)"),
    "fedadam": ("fedzip.algorithms.adaptive:FedAdamAlgorithm",
                "FedAvg with the FedAdam server: server_lr, tau, betas (Reddi et al., ICLR 2021)"),
    "fedyogi": ("fedzip.algorithms.adaptive:FedYogiAlgorithm",
                "FedAvg with the FedYogi server: server_lr, tau, betas (Reddi et al., ICLR 2021)"),
    "fedadagrad": ("fedzip.algorithms.adaptive:FedAdagradAlgorithm",
                   "FedAvg with the FedAdagrad server: server_lr, tau, beta1 (Reddi et al., ICLR 2021)"),
    "fed_dropout": ("fedzip.algorithms.dropout:FederatedDropout",
                    "federated dropout, sub-models keeping keep (keep_fc, keep_conv, keep_lstm) of the units "
                    "(Caldas et al. 2018)"),
    "lowrank": ("fedzip.algorithms.structured:LowRankUpdates",
                "low-rank structured updates B·A, rank or fraction of fan_in (Konečný et al. 2016)"),
    "randmask": ("fedzip.algorithms.structured:RandomMaskUpdates",
                 "random-mask structured updates, fraction of the entries (Konečný et al. 2016)"),
    "dpfedavg": ("fedzip.algorithms.dp:DPFedAvg",
                 "DP-FedAvg: clipping, Gaussian noise, epsilon every round (McMahan et al., ICLR 2018); "
                 "needs population, cohort, delta, noise_multiplier or target_epsilon"),
}


def build_algorithm_spec(spec: str | Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """``"fedprox:mu=0.1"`` or ``{"type": "fedprox", "mu": 0.1}`` → (class, its extra arguments)."""
    name, opts = name_and_options(spec, "algorithm")
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm {name!r} unknown; choose from {sorted(ALGORITHMS)}")
    from fedzip.tasks.registry import import_path

    cls = import_path(ALGORITHMS[name][0], "algorithm")
    import inspect

    allowed = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"algorithm {name!r}: unknown argument(s) {unknown}")
    return cls, opts


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


def build_aggregator(spec: str | Mapping[str, Any]) -> Aggregator:
    """An aggregator from a string or a nested dict.

    Strings: ``mean``, ``robust``, ``compression`` or ``compression:bits=4,threshold=20000``;
    a codec name from :func:`fedzip.codecs.registry` gives ``mean`` over that codec
    above TFF's threshold, e.g. ``eden:bits=2``.

    Dicts nest any chain, e.g. clipping around EDEN::

        {"type": "clipping", "norm": 1.0,
         "inner": {"type": "mean", "codec": {"type": "eden", "bits": 2}, "threshold": 0}}

    Types: ``mean`` (``codec``, ``threshold``, ``weighted``), ``clipping`` and
    ``zeroing`` (``norm``: a number or ``{"type": "adaptive", ...}`` with
    :class:`~fedzip.AdaptiveNorm`'s arguments; ``inner``; zeroing's ``norm_order``),
    ``robust`` (``inner``), ``compression`` (its keyword arguments),
    ``distributed_dp`` (:func:`fedzip.privacy.ddp.distributed_dp`'s arguments;
    see :data:`DISTRIBUTED_DP_FIELDS`), e.g. the distributed discrete
    Gaussian at 16 bits summed without the protocol's messages, with z and γ
    that :func:`~fedzip.privacy.ddp.ddp_parameters` gives for ε = 8 after 60
    rounds of 30 out of 284 clients and a model of 11,274 parameters::

        {"type": "distributed_dp", "noise_multiplier": 1.946, "clip": 0.2, "cohort": 30, "bits": 16,
         "gamma": 20826.9, "mechanism": "ddg", "secure": false, "population": 284, "delta": 0.0035}
    """
    if isinstance(spec, Mapping):
        return _aggregator_from_dict(spec, "aggregator")
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


def _aggregator_from_dict(spec: Mapping[str, Any], where: str) -> Aggregator:
    from fedzip.aggregators import AdaptiveNorm, clipping, zeroing
    from fedzip.codecs import above_threshold

    opts = dict(spec)
    kind = opts.pop("type", None)
    try:
        if kind == "mean":
            codec = opts.pop("codec", None)
            threshold = opts.pop("threshold", 20_000)
            policy = None if codec is None else above_threshold(build_codec(codec, f"{where}.codec"), threshold)
            return mean(policy, **opts)
        if kind in ("clipping", "zeroing"):
            inner = _aggregator_from_dict(opts.pop("inner", {"type": "mean"}), f"{where}.inner")
            norm = opts.pop("norm", None)
            if isinstance(norm, Mapping):
                nopts = dict(norm)
                if nopts.pop("type", "adaptive") != "adaptive":
                    raise ConfigError(f"{where}.norm: type must be 'adaptive' (or give a number)")
                norm = AdaptiveNorm(**nopts)
            if norm is None:
                raise ConfigError(f"{where}: {kind} needs a norm")
            return (clipping if kind == "clipping" else zeroing)(inner, norm, **opts)
        if kind == "noise":
            from fedzip.aggregators import gaussian_noise

            inner = _aggregator_from_dict(opts.pop("inner", {"type": "mean"}), f"{where}.inner")
            return gaussian_noise(inner, **opts)
        if kind == "robust":
            inner = _aggregator_from_dict(opts.pop("inner", {"type": "mean"}), f"{where}.inner")
            return robust_aggregator(inner, **opts)
        if kind == "compression":
            return compression_aggregator(**opts)
        if kind == "secure_mean":
            # secure aggregation (fedzip.privacy.secagg): a summable codec, SecAgg / SecAgg+ options
            from fedzip.privacy.secagg import secure_mean

            codec = build_codec(opts.pop("codec", {"type": "ssq"}), f"{where}.codec")
            return secure_mean(codec, **opts)
        if kind == "distributed_dp":
            return _distributed_dp_from_dict(opts, where)
        if kind in ("median", "trimmed_mean", "krum", "geometric_median"):
            # Byzantine-robust rules (fedzip.robust): codec/threshold as for "mean", then the rule's arguments
            from fedzip import robust

            codec = opts.pop("codec", None)
            threshold = opts.pop("threshold", 20_000)
            policy = None if codec is None else above_threshold(build_codec(codec, f"{where}.codec"), threshold)
            return getattr(robust, kind)(policy, **opts)
    except TypeError as e:
        raise ConfigError(f"{where} {dict(spec)!r}: {e}") from None
    raise ConfigError(f"{where}: type {kind!r} unknown; choose from mean, clipping, zeroing, noise, "
                      "robust, compression, secure_mean, distributed_dp, median, trimmed_mean, krum, "
                      "geometric_median")


#: the fields of an aggregator ``{"type": "distributed_dp", ...}``: those of
#: :func:`fedzip.privacy.ddp.distributed_dp`, the first three required.
#: ``seed`` is the rotation's public seed (default 0), part of the mechanism
#: as the server must know it; the run's own ``seed`` keys every random draw
#: of the mechanism (each client's conditional rounding and noise share come
#: from a generator keyed by (run seed, round, client)), so runs of other
#: seeds draw other noise through the same rotation.
DISTRIBUTED_DP_FIELDS: dict[str, str] = {
    "noise_multiplier": "z: the noise on the sum of cohort messages has std z*clip per coordinate",
    "clip": "C, the L2 bound of a client's update",
    "cohort": "clients whose noise shares make up the noise: the run's clients_per_round",
    "bits": "bits per coordinate of every message and of the sum, 2..32 (default 16)",
    "gamma": "the scale (the quantization step is 1/gamma); default: chosen from bits for a model of dim",
    "dim": "the model's size, to choose gamma when it is not given",
    "mechanism": "ddg (distributed discrete Gaussian) or skellam (default ddg)",
    "beta": "conditional rounding's beta in [0, 1)",
    "k_stddevs": "standard deviations of the sum that fit in 2^bits, to choose gamma",
    "seed": "the rotation's public seed, an integer >= 0 (default 0; the run's seed keys the noise)",
    "threshold": "secure aggregation's threshold (an integer or a fraction of the holders)",
    "neighbours": "SecAgg+'s neighbours (null: SecAgg's complete graph)",
    "secure": "true: through the secure-aggregation protocol; false: the same sum without its messages",
    "population": "clients the cohorts are drawn from, for the reported epsilon (with delta)",
    "delta": "delta in (0, 1) of the reported epsilon (with population)",
    "sampling": "fixed (exactly cohort clients a round) or poisson, for the reported epsilon",
}


def _distributed_dp_from_dict(opts: dict[str, Any], where: str) -> Aggregator:
    """``{"type": "distributed_dp", ...}``: one ConfigError naming the field for an
    unknown, missing or out-of-range one (the function checks the ranges; the
    checks here are what it leaves open)."""
    from fedzip.privacy.ddp import distributed_dp

    unknown = sorted(set(opts) - set(DISTRIBUTED_DP_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: distributed_dp has no field(s) {unknown}; its fields: "
                          f"{list(DISTRIBUTED_DP_FIELDS)}")
    # null is the function's own default for these: the same as leaving them out
    opts = {k: v for k, v in opts.items()
            if v is not None or k not in ("gamma", "dim", "k_stddevs", "neighbours", "population", "delta")}
    missing = [k for k in ("noise_multiplier", "clip", "cohort") if k not in opts]
    if missing:
        what = "; ".join(f"{k}: {DISTRIBUTED_DP_FIELDS[k]}" for k in missing)
        raise ConfigError(f"{where}: distributed_dp needs {missing} ({what})")
    if "secure" in opts and not isinstance(opts["secure"], bool):
        raise ConfigError(f"{where}.secure must be true or false, got {opts['secure']!r}")
    if ("population" in opts) != ("delta" in opts):
        raise ConfigError(f"{where}: distributed_dp reports epsilon with both population and delta: "
                          f"give both or neither (got only {'population' if 'population' in opts else 'delta'})")
    delta = opts.get("delta")
    if "delta" in opts and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
        raise ConfigError(f"{where}.delta must be a number in (0, 1), got {delta!r}")
    if "gamma" not in opts and "dim" not in opts:
        raise ConfigError(f"{where}: distributed_dp needs gamma, or dim (the model's size) to choose it")
    noise = opts.pop("noise_multiplier")
    clip = opts.pop("clip")
    cohort = opts.pop("cohort")
    try:
        return distributed_dp(noise, clip, cohort, **opts)
    except ConfigError as e:
        # the codec names itself ("DistributedSkellam.bits ..."); the config names the field
        msg = str(e).removeprefix("DistributedDiscreteGaussian.").removeprefix("DistributedSkellam.")
        raise ConfigError(f"{where} (distributed_dp): {msg}") from None


def build_codec(spec: str | Mapping[str, Any], where: str = "codec"):
    """A codec from ``"eden:bits=2"``, ``{"type": "eden", "bits": 2}``, a wrapper
    with an inner codec (``{"type": "error_feedback", "inner": {...}}``), or an
    import path for a codec of your own (``{"type": "mypkg.codecs:MyCodec", ...}``)."""
    from fedzip import codecs

    name, opts = name_and_options(spec, where)
    wrappers = {"error_feedback": codecs.ErrorFeedback, "entropy_coded": codecs.EntropyCoded,
                "zstd": codecs.Zstd, "rotation": codecs.RandomRotation}
    if "inner" in opts:
        opts["inner"] = build_codec(opts["inner"], f"{where}.inner")
    if name in wrappers:
        factory: Any = wrappers[name]
    elif name in _codec_registry():
        factory = _codec_registry()[name]
    elif ":" in name:
        from fedzip.tasks.registry import import_path

        factory = import_path(name, where)
    else:
        raise ConfigError(f"{where}: codec {name!r} unknown; choose from "
                          f"{sorted([*_codec_registry(), *wrappers])} or module:Class")
    codec = _make_codec(name, factory, opts, str(spec))
    if not isinstance(codec, codecs.Codec):
        raise ConfigError(f"{where}: {name!r} made a {type(codec).__name__}, not a fedzip Codec")
    return codec


def build_broadcast(spec: str | Mapping[str, Any]):
    """The downlink codec policy: ``float32`` (default), a codec spec, or a dict
    (``{"type": "eden", "bits": 4, "threshold": 20000}``)."""
    from fedzip.codecs import CodecPolicy, above_threshold

    if isinstance(spec, Mapping):
        opts = dict(spec)
        threshold = opts.pop("threshold", 20_000)
        if opts.get("type") == "float32":
            return CodecPolicy()
        return above_threshold(build_codec(opts, "broadcast"), threshold)
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
