"""The training loop: sample, run a round, evaluate, write metrics.

``run(config, logdir)`` is the whole experiment: it writes ``run.json`` (the
resolved config, the fedzip, torch and numpy versions, torch's thread count,
the seed) next to ``metrics.jsonl`` and TensorBoard event files in ``logdir``,
and with ``checkpoint_every=N`` a checkpoint of the whole server state every
N rounds and after the last (:mod:`fedzip.checkpoint`).

``run(config, logdir, resume=True)`` (``fedzip run --resume LOGDIR``) goes on
from the newest checkpoint that verifies: ``metrics.jsonl`` is cut back to the
checkpoint's round (rewritten atomically) and TensorBoard purges the later
steps, so every round appears exactly once, and the result is bit-identical
to a run that was never interrupted. Everything random is keyed by (seed,
round, client, purpose), so the round number is all a restart needs; the
global RNG states are restored too, for models that draw from them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedzip import checkpoint
from fedzip.algorithms import FederatedAlgorithm, ServerState
from fedzip.allocator import RoundTrim
from fedzip.config import (
    RunConfig,
    build_aggregator,
    build_algorithm_spec,
    build_broadcast,
    build_optimizer,
)
from fedzip.data.federated import ClientExamples, Preprocess
from fedzip.errors import ConfigError, DataError
from fedzip.metrics import JsonlWriter, MetricWriter, MultiWriter, TensorBoardWriter, console_writer
from fedzip.seeding import derive_seed, sample_clients
from fedzip.tasks import Task, resolve_task


@dataclass
class RunResult:
    config: RunConfig
    state: ServerState
    history: list[dict[str, Any]]
    final_eval: dict[str, float]
    logdir: Path | None


def versions() -> dict[str, str]:
    import numpy

    from fedzip import __version__

    return {"fedzip": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_SCHEMES = ("h5", "shakespeare-h5")  # data set names with a colon that are not import paths


def load_data(config: RunConfig):
    """(train, test, info) for ``config.dataset``: a data set name, or
    ``module.path:function`` returning ``(train, test, info)``."""
    from fedzip.data import load_dataset

    if _IMPORT_PATH.match(config.dataset) and config.dataset.split(":", 1)[0] not in _SCHEMES:
        from fedzip.tasks.registry import import_path

        fn = import_path(config.dataset, "dataset")
        out = fn() if callable(fn) else fn
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ConfigError(f"dataset {config.dataset!r} must return (train, test, info)")
        return out
    return load_dataset(config.dataset)


def build_task(config: RunConfig, info: Any) -> Task:
    return resolve_task(config.task, info)


def build_algorithm(config: RunConfig, info: Any, executor=None) -> FederatedAlgorithm:
    """The algorithm a config describes, for the data set ``info`` describes."""
    cls, extra = build_algorithm_spec(config.algorithm)
    return cls(
        task=build_task(config, info),
        client_optimizer=build_optimizer(config.client_optimizer, config.client_lr, field="client_optimizer"),
        server_optimizer=build_optimizer(config.server_optimizer, config.server_lr, config.server_momentum,
                                         field="server_optimizer"),
        aggregator=build_aggregator(config.aggregator),
        broadcast_codec=build_broadcast(config.broadcast),
        preprocess=Preprocess(config.batch_size, config.epochs, config.shuffle_buffer, config.max_batches),
        seed=config.seed,
        executor=executor,
        min_clients=config.min_clients,
        device=config.device,
        **extra,
    )


def check_data_fits(algorithm: FederatedAlgorithm, train, test=None) -> None:
    """One forward pass on one example of the first training (and test) client
    before training, through the task's checks: a data set whose shapes,
    dtypes or labels do not fit the model fails here, naming the client."""
    for which, data in (("training", train), ("test", test)):
        if data is None:
            continue
        if isinstance(data, ClientExamples):
            cid, ex = "(all)", data
        else:
            if not len(data.client_ids):
                raise DataError(f"the {which} data has no clients")
            cid = data.client_ids[0]
            ex = data.client(cid)
        algorithm.task.check(algorithm.work.model(), ex, f"{which} client {cid!r}", algorithm.work.on_device)


def run(
    config: RunConfig,
    logdir: str | Path | None = None,
    data: tuple[Any, Any, Any] | None = None,
    console: bool = True,
    extra_writers: list[MetricWriter] | None = None,
    on_round: Callable[[ServerState, dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Run ``config`` to the end; metrics go to ``logdir`` (if given) and the console.

    ``resume=True`` goes on from the newest good checkpoint in ``logdir`` (from
    round 0 if there is none); without it, a ``logdir`` holding an earlier run
    has its metrics and checkpoints replaced. One process at a time may write
    a ``logdir`` (a lock file, released even if the process is killed)."""
    with contextlib.ExitStack() as cleanup:
        return _run(config, logdir, data, console, extra_writers, on_round, resume, cleanup)


def _run(config, logdir, data, console, extra_writers, on_round, resume, cleanup) -> RunResult:
    if (config.checkpoint_every or resume) and logdir is None:
        raise ConfigError("checkpoint_every and resume need a logdir to keep checkpoints in")
    train, test, info = data if data is not None else load_data(config)
    if config.clients_per_round > len(train.client_ids):
        raise ConfigError(
            f"clients_per_round={config.clients_per_round} but {info.name} has only "
            f"{len(train.client_ids)} training clients"
        )
    if config.min_clients is not None and config.min_clients > config.clients_per_round:
        raise ConfigError(
            f"min_clients={config.min_clients} is more than clients_per_round={config.clients_per_round}"
        )
    num_classes = getattr(info, "num_classes", None)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise DataError(f"data set {info.name!r} has num_classes={num_classes!r}; it must be >= 1")
    executor = _executor(config)
    if getattr(executor, "close", None) is not None:
        cleanup.callback(executor.close)  # whatever fails from here on
    algorithm = build_algorithm(config, info, executor)
    check_data_fits(algorithm, train, test)
    state = algorithm.init()
    cumulative = {"broadcasted_bits": 0, "aggregated_bits": 0}
    history: list[dict[str, Any]] = []
    say = print if console else (lambda msg: None)

    resumed: checkpoint.Checkpoint | None = None
    run_versions = versions()
    if logdir is not None:
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        cleanup.enter_context(_exclusive(logdir))
        ckdir = checkpoint.checkpoint_dir(logdir)
        if resume:
            resumed = checkpoint.latest(ckdir, log=lambda msg: print(msg, file=sys.stderr))
            if resumed is None:
                say(f"[{config.name}] no usable checkpoint in {ckdir}: starting from round 0")
            else:
                _check_resumable(resumed, config, state)
                state = algorithm.restore(resumed.state)
                cumulative.update({k: int(v) for k, v in resumed.cumulative.items()})
                say(f"[{config.name}] resuming after round {state.round} from {resumed.path}")
            history = _cut_metrics(logdir / "metrics.jsonl", state.round)
        else:
            _clear_previous_run(logdir, say)
        checkpoint.atomic_write(logdir / "run.json", json.dumps(
            {"config": config.to_dict(), "versions": run_versions, "seed": config.seed,
             "torch_threads": torch.get_num_threads(),
             "task": algorithm.task.name,
             "data": {"name": info.name, "description": info.description}}, indent=2).encode("utf-8"))

    writers: list[MetricWriter] = list(extra_writers or [])
    if console:
        # a progress bar over rounds when stderr is a terminal, one line per round either way
        writers.append(console_writer(f"[{config.name}] ", config.rounds, state.round))
    if logdir is not None:
        # purge_step: TensorBoard hides the steps from there on written before, so a
        # resumed (or repeated) run's curves have each round once
        had_events = any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir())
        purge = state.round + 1 if (resume or had_events) else None
        writers += [JsonlWriter(logdir / "metrics.jsonl"), TensorBoardWriter(logdir, purge_step=purge)]
    out = MultiWriter(writers)

    if resumed is not None:
        checkpoint.restore_rng(resumed.rng)
    try:
        trim = RoundTrim()
        for r in range(state.round + 1, config.rounds + 1):
            _test_hook("round-start", r)
            ids = sample_clients(train.client_ids, config.clients_per_round, r, config.seed)
            state, metrics = algorithm.next(state, train, ids)
            for k in cumulative:
                cumulative[k] += metrics[k]
                metrics[f"{k}/cumulative"] = cumulative[k]
            if (config.eval_every and r % config.eval_every == 0) or r == config.rounds:
                t_eval = time.perf_counter()
                ev = _evaluate(algorithm, state, test, config, r)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
                metrics["time/eval_s"] = time.perf_counter() - t_eval
            _test_hook("round", r)
            history.append(metrics)
            out.write(metrics)  # metrics first: a crash before the checkpoint repeats this round
            _test_hook("metrics", r)
            if logdir is not None and config.checkpoint_every and (
                r % config.checkpoint_every == 0 or r == config.rounds
            ):
                checkpoint.save(checkpoint.checkpoint_dir(logdir), state, cumulative=cumulative,
                                config=config.to_dict(), versions=run_versions)
                _test_hook("checkpoint", r)
            trim()  # what the round freed back to the system: RSS after a round stays flat
            if on_round is not None:
                on_round(state, metrics)
    finally:
        out.close()
    final_eval = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
    return RunResult(config, state, history, final_eval, logdir)


def _evaluate(algorithm: FederatedAlgorithm, state: ServerState, test: Any, config: RunConfig,
              round_num: int) -> dict[str, Any]:
    """Pooled figures over the test clients, and per-client summaries; with
    ``eval_clients`` over that many test clients, the same sample at every
    evaluation (so figures of different rounds compare)."""
    if isinstance(test, ClientExamples):
        return algorithm.evaluate(state.params, test, batch_size=config.eval_batch_size)
    ids = None
    if config.eval_clients is not None and config.eval_clients < len(test.client_ids):
        ids = sample_clients(test.client_ids, config.eval_clients, 0, derive_seed(config.seed, "eval"))
    return algorithm.evaluate(state.params, test, ids, batch_size=config.eval_batch_size, per_client=True)


# Fields a resumed run may change: how long it runs, how often it checkpoints and
# evaluates, where client work runs. Anything else would make it a different run.
RESUME_MAY_CHANGE = ("rounds", "checkpoint_every", "eval_every", "eval_batch_size", "eval_clients", "name",
                     "backend",
                     "ray_address", "num_workers", "threads", "device")


def _check_resumable(ck: checkpoint.Checkpoint, config: RunConfig, fresh: ServerState) -> None:
    saved = ck.config
    diff = sorted(k for k, v in config.to_dict().items()
                  if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v)
    if diff:
        raise ConfigError(
            f"checkpoint {ck.path} was written by a run with other settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {getattr(config, k)!r})" for k in diff)
        )
    if ck.round > config.rounds:
        raise ConfigError(f"checkpoint {ck.path} is after round {ck.round}, past rounds={config.rounds}")
    want = {k: tuple(v.shape) for k, v in fresh.params.items()}
    got = {k: tuple(v.shape) for k, v in ck.state.params.items()}
    if want != got:
        raise checkpoint.CheckpointError(f"checkpoint {ck.path}: its tensors do not fit the model")
    for k in ("fedzip", "torch"):
        if ck.versions.get(k) != versions()[k]:
            print(f"fedzip: warning: {ck.path} was written by {k} {ck.versions.get(k)}, this is "
                  f"{versions()[k]}: the resumed rounds may differ in the last bits", file=sys.stderr)


def _cut_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the metrics lines of rounds ``<= last_round`` (rewriting the file
    atomically if anything goes) and return them. A line cut short by a crash
    is dropped."""
    if not path.exists():
        return []
    kept_lines: list[str] = []
    kept: list[dict[str, Any]] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            m = json.loads(line)
            ok = isinstance(m, dict) and isinstance(m.get("round"), int) and m["round"] <= last_round
        except json.JSONDecodeError:
            ok = False
        if ok:
            kept_lines.append(line)
            kept.append(m)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept_lines)
        checkpoint.atomic_write(path, text.encode("utf-8"))
    if [m["round"] for m in kept] != list(range(1, last_round + 1)):
        print(f"fedzip: warning: {path} does not hold rounds 1..{last_round} exactly once; "
              "the resumed run appends after what is there", file=sys.stderr)
    return kept


def _clear_previous_run(logdir: Path, say: Callable[[str], None]) -> None:
    """A fresh run in a folder that held one: its metrics and checkpoints go (a
    later resume must not pick up the old run's checkpoints)."""
    stale = [logdir / "metrics.jsonl", *checkpoint.list_checkpoints(checkpoint.checkpoint_dir(logdir))]
    stale = [p for p in stale if p.exists()]
    if stale:
        say(f"fedzip: {logdir} held an earlier run: replacing its metrics and checkpoints")
    for p in stale:
        p.unlink()


@contextlib.contextmanager
def _exclusive(logdir: Path):
    """Hold ``logdir/.fedzip.lock`` (flock: the kernel drops it when the process
    dies, so a killed run leaves no stale lock) or fail naming the folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(logdir / ".fedzip.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(f"{logdir} is in use by another fedzip run (pid {holder}); "
                              "wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)




def _test_hook(phase: str, round_num: int) -> None:
    """Test-only crash points: ``FEDZIP_TEST_SLEEP=S`` sleeps S seconds at the start
    of every round (so a kill from outside lands mid-round);
    ``FEDZIP_TEST_KILL=PHASE@ROUND`` SIGKILLs this process at that point
    (phases: round-start, round, metrics, checkpoint)."""
    if phase == "round-start":
        try:
            delay = float(os.environ.get("FEDZIP_TEST_SLEEP") or 0)
        except ValueError:
            delay = 0.0
        if math.isfinite(delay) and delay > 0:
            time.sleep(delay)
    if os.environ.get("FEDZIP_TEST_KILL") == f"{phase}@{round_num}":
        os.kill(os.getpid(), signal.SIGKILL)


def _executor(config: RunConfig):
    if config.backend == "local" and config.threads is None:
        return None
    from fedzip.execution import make_executor  # the Ray backend lives there

    return make_executor(config)
