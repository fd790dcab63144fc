"""The training loop: sample, run a round, evaluate, write metrics.

``run(config, logdir)`` is the whole experiment: it writes ``run.json`` (the
resolved config, the fedzip and torch versions, the seed) next to
``metrics.jsonl`` and TensorBoard event files in ``logdir``.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedzip.algorithms import ServerState, WeightedFedAvg
from fedzip.config import RunConfig, build_aggregator, build_broadcast, build_optimizer
from fedzip.data.federated import Preprocess
from fedzip.errors import DataError
from fedzip.metrics import ConsoleWriter, JsonlWriter, MetricWriter, MultiWriter, TensorBoardWriter
from fedzip.models import FedAvgCNN
from fedzip.seeding import sample_clients


@dataclass
class RunResult:
    config: RunConfig
    state: ServerState
    history: list[dict[str, Any]]
    final_eval: dict[str, float]
    logdir: Path | None


def versions() -> dict[str, str]:
    from fedzip import __version__

    return {"fedzip": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def load_data(config: RunConfig):
    """(train, test, info) for ``config.dataset``."""
    from fedzip.data import load_dataset

    return load_dataset(config.dataset)


def build_algorithm(config: RunConfig, num_classes: int, executor=None) -> WeightedFedAvg:
    return WeightedFedAvg(
        model_fn=lambda: FedAvgCNN(num_classes),
        client_optimizer=build_optimizer(config.client_optimizer, config.client_lr),
        server_optimizer=build_optimizer(config.server_optimizer, config.server_lr, config.server_momentum),
        aggregator=build_aggregator(config.aggregator),
        broadcast_codec=build_broadcast(config.broadcast),
        preprocess=Preprocess(config.batch_size, config.epochs, config.shuffle_buffer),
        seed=config.seed,
        executor=executor,
        min_clients=config.min_clients,
    )


def check_data_fits(algorithm: WeightedFedAvg, train, num_classes: int) -> None:
    """One forward pass on one example before training: a data set whose shapes
    do not fit the model fails here, naming the data set, not mid-round."""
    cid = train.client_ids[0]
    ex = train.client(cid)
    model = algorithm.work.model()
    try:
        with torch.no_grad():
            out = model(ex.x[:1])
    except RuntimeError as e:
        raise DataError(f"examples of client {cid!r} (shape {tuple(ex.x.shape[1:])}) do not fit the model: {e}") from None
    if out.shape[-1] != num_classes:
        raise DataError(f"model outputs {out.shape[-1]} classes, the data set has {num_classes}")
    if len(ex.y) and (int(ex.y.max()) >= num_classes or int(ex.y.min()) < 0):
        raise DataError(f"client {cid!r} has labels outside 0..{num_classes - 1}")


def run(
    config: RunConfig,
    logdir: str | Path | None = None,
    data: tuple[Any, Any, Any] | None = None,
    console: bool = True,
    extra_writers: list[MetricWriter] | None = None,
    on_round: Callable[[ServerState, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``config`` to the end; metrics go to ``logdir`` (if given) and the console."""
    train, test, info = data if data is not None else load_data(config)
    if config.clients_per_round > len(train.client_ids):
        from fedzip.errors import ConfigError

        raise ConfigError(
            f"clients_per_round={config.clients_per_round} but {info.name} has only "
            f"{len(train.client_ids)} training clients"
        )
    executor = _executor(config)
    algorithm = build_algorithm(config, info.num_classes, executor)
    check_data_fits(algorithm, train, info.num_classes)

    writers: list[MetricWriter] = list(extra_writers or [])
    if console:
        writers.append(ConsoleWriter(prefix=f"[{config.name}] "))
    if logdir is not None:
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / "run.json").write_text(json.dumps(
            {"config": config.to_dict(), "versions": versions(), "seed": config.seed,
             "data": {"name": info.name, "description": info.description}}, indent=2))
        writers += [JsonlWriter(logdir / "metrics.jsonl"), TensorBoardWriter(logdir)]
    out = MultiWriter(writers)

    history: list[dict[str, Any]] = []
    state = algorithm.init()
    cumulative = {"broadcasted_bits": 0, "aggregated_bits": 0}
    try:
        for r in range(state.round + 1, config.rounds + 1):
            ids = sample_clients(train.client_ids, config.clients_per_round, r, config.seed)
            state, metrics = algorithm.next(state, train, ids)
            for k in cumulative:
                cumulative[k] += metrics[k]
                metrics[f"{k}/cumulative"] = cumulative[k]
            if (config.eval_every and r % config.eval_every == 0) or r == config.rounds:
                ev = algorithm.evaluate(state.params, test, batch_size=config.eval_batch_size)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            history.append(metrics)
            out.write(metrics)
            if on_round is not None:
                on_round(state, metrics)
    finally:
        out.close()
        close = getattr(executor, "close", None)
        if close is not None:
            close()
    final_eval = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
    return RunResult(config, state, history, final_eval, logdir)


def _executor(config: RunConfig):
    if config.backend == "local":
        return None
    from fedzip.execution import make_executor  # the Ray backend lives there

    return make_executor(config)
