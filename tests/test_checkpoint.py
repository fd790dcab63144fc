"""Checkpoints and resume: atomic writes, verification, fallback to the previous
checkpoint, and a training process killed with SIGKILL that resumes to the
same bits as a run that was never interrupted."""

from __future__ import annotations

import functools
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import TensorClients, deterministic
from torch import nn

import fedzip
from fedzip import checkpoint
from fedzip.checkpoint import CheckpointError
from fedzip.codecs import Codec
from fedzip.codecs.base import Float32
from fedzip.config import RunConfig
from fedzip.errors import ConfigError
from fedzip.metrics import read_jsonl
from fedzip.run import run

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared" / "data" / "unipen"


def _data():
    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    return TensorClients(6, 20, seed=1), TensorClients(2, 10, seed=2), info


def _config(**kw):
    base = dict(rounds=4, clients_per_round=2, aggregator="compression", server_momentum=0.9,
                checkpoint_every=2, eval_every=2, seed=3, name="t")
    return RunConfig(**{**base, **kw})


def _lines(logdir):
    """metrics.jsonl lines without wall-clock fields (there are none today)."""
    out = []
    for m in read_jsonl(Path(logdir) / "metrics.jsonl"):
        out.append(json.dumps({k: v for k, v in m.items() if not any(
            w in k for w in ("time", "seconds", "wall"))}, sort_keys=True))
    return out


def _assert_same_state(a: fedzip.ServerState, b: fedzip.ServerState):
    assert a.round == b.round
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    _assert_same_tree(a.optimizer_state, b.optimizer_state)
    _assert_same_tree(a.aggregator_state, b.aggregator_state)
    _assert_same_tree(a.groups, b.groups)
    _assert_same_tree({k: dict(v) for k, v in a.client_states.items()},
                      {k: dict(v) for k, v in b.client_states.items()})


def _assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where  # same keys, same order (LRU)
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _final(logdir) -> checkpoint.Checkpoint:
    ck = checkpoint.latest(checkpoint.checkpoint_dir(logdir), log=None)
    assert ck is not None
    return ck


# --------------------------------------------------------------------------
# The file: round trip, atomic writes, verification
# --------------------------------------------------------------------------


class ErrorFeedback(Codec):
    """Sign-free toy codec with a per-client residual (error feedback): sends
    float32 of the update plus the residual, rounded to a coarse grid, and keeps
    what rounding lost."""

    tag = "efq"

    def encode(self, x, rng):
        return Float32().encode(torch.round(x * 256) / 256, rng)

    def decode(self, data, shape):
        return Float32().decode(data, shape)

    def init_client_state(self, shape):
        return {"residual": torch.zeros(shape), "rounds": 0}

    def encode_stateful(self, x, rng, state):
        corrected = x + state["residual"]
        sent = torch.round(corrected * 256) / 256
        return Float32().encode(sent, rng), {"residual": corrected - sent, "rounds": state["rounds"] + 1}


def _tiny_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def _fedavg(aggregator=None, **kw):
    return fedzip.weighted_fedavg(
        _tiny_model, functools.partial(torch.optim.SGD, lr=0.05),
        functools.partial(torch.optim.SGD, lr=1.0, momentum=0.9), aggregator, seed=5, **kw)


def test_state_round_trips_exactly_and_resumes_to_the_same_bits(tmp_path):
    """Params, momentum buffers, adaptive norms and per-client error-feedback
    residuals survive a checkpoint; the next round from the loaded state is
    bit-identical to the next round from the original."""
    data = TensorClients(4, 10, seed=0)
    agg = fedzip.zeroing(fedzip.clipping(fedzip.mean(ErrorFeedback()), fedzip.AdaptiveNorm(1.0, 0.5, 0.2)), 1e3)
    fa = _fedavg(agg)
    s = fa.init()
    for r in (1, 2):
        s, _ = fa.next(s, data, fedzip.sample_clients(data.client_ids, 3, r, 5))
    assert s.client_states["codec"], "the error-feedback residuals are in the state"
    path = checkpoint.save(tmp_path, s, cumulative={"aggregated_bits": 12}, config={"seed": 5})
    assert path.name == "round-000002.ckpt"
    ck = checkpoint.load(path)
    _assert_same_state(s, ck.state)
    assert ck.cumulative == {"aggregated_bits": 12} and ck.config == {"seed": 5}
    ids = fedzip.sample_clients(data.client_ids, 3, 3, 5)
    a, ma = fa.next(s, data, ids)
    b, mb = _fedavg(agg).next(ck.state, data, ids)  # a fresh algorithm, as after a restart
    _assert_same_state(a, b)
    assert deterministic(ma) == deterministic(mb)


@pytest.mark.parametrize("server_opt", [
    functools.partial(torch.optim.Adam, lr=0.01), functools.partial(torch.optim.Adagrad, lr=0.1),
    functools.partial(torch.optim.SGD, lr=1.0, momentum=0.9, nesterov=True)])
def test_every_server_optimizers_state_resumes_to_the_same_bits(tmp_path, server_opt):
    data = TensorClients(3, 8, seed=0)

    def fa():
        return fedzip.weighted_fedavg(_tiny_model, functools.partial(torch.optim.SGD, lr=0.05),
                                      server_opt, fedzip.compression_aggregator(threshold=100), seed=2)

    s, _ = fa().next(fa().init(), data, ["c0", "c1"])
    ck = checkpoint.load(checkpoint.save(tmp_path, s))
    _assert_same_state(s, ck.state)
    a, ma = fa().next(s, data, ["c1", "c2"])
    b, mb = fa().next(ck.state, data, ["c1", "c2"])
    _assert_same_state(a, b)
    assert deterministic(ma) == deterministic(mb)


def test_a_round_does_not_depend_on_the_global_rng_states():
    """The claim that lets a resume need only the round number: every draw is
    keyed by (seed, round, client, purpose), none comes from the global RNGs."""
    data = TensorClients(3, 10, seed=0)
    fa = _fedavg(fedzip.compression_aggregator())
    s0 = fa.init()
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        s, m = _fedavg(fedzip.compression_aggregator()).next(s0, data, ["c0", "c2"])
        out.append((s, m, _fedavg(fedzip.compression_aggregator()).init()))
    _assert_same_state(out[0][0], out[1][0])
    assert deterministic(out[0][1]) == deterministic(out[1][1])
    _assert_same_state(out[0][2], out[1][2])  # init too


def test_rng_states_are_captured_and_restored():
    saved = checkpoint.capture_rng()
    draws = torch.rand(3), np.random.rand(3), random.random()
    buf = io.BytesIO()
    torch.save(checkpoint._plain(saved, "rng"), buf)  # as it goes to disk
    restored = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    checkpoint.restore_rng(restored)
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_keeps_the_newest_three_and_writes_atomically(tmp_path, monkeypatch):
    fa = _fedavg()
    s = fa.init()
    for r in range(1, 6):
        checkpoint.save(tmp_path, fedzip.ServerState(s.params, s.optimizer_state, s.aggregator_state, r))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "round-000003.ckpt", "round-000004.ckpt", "round-000005.ckpt"]

    # a crash between writing the temporary file and renaming it: nothing half-written remains
    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(tmp_path, fedzip.ServerState(s.params, s.optimizer_state, s.aggregator_state, 6))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-000003.ckpt", "round-000004.ckpt", "round-000005.ckpt"]


def test_truncated_or_corrupt_checkpoints_fall_back_to_the_previous(tmp_path, capsys):
    fa = _fedavg()
    s = fa.init()
    for r in (2, 4, 6):
        checkpoint.save(tmp_path, fedzip.ServerState(s.params, s.optimizer_state, s.aggregator_state, r))
    p6, p4 = checkpoint.checkpoint_path(tmp_path, 6), checkpoint.checkpoint_path(tmp_path, 4)
    raw = p6.read_bytes()
    p6.write_bytes(raw[: len(raw) // 2])  # truncated
    flipped = bytearray(p4.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # one bit flipped in the payload
    p4.write_bytes(bytes(flipped))
    messages = []
    ck = checkpoint.latest(tmp_path, log=messages.append)
    assert ck is not None and ck.round == 2
    assert len(messages) == 2 and "round-000006" in messages[0] and "checksum mismatch" in messages[0]
    assert "round-000004" in messages[1] and "checksum mismatch" in messages[1]
    for bad in (b"", b"FZCKPT1\n", b"PK\x03\x04 a zip, not ours", raw[:70]):
        p6.write_bytes(bad)
        with pytest.raises(CheckpointError, match="round-000006"):
            checkpoint.load(p6)


def test_a_checkpoint_never_unpickles_code(tmp_path):
    """A checkpoint whose payload would run code when unpickled, with a valid
    checksum: loading refuses it and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"format": "fedzip.checkpoint", "version": 1, "round": 1, "params": Evil()}, buf)
    body = buf.getvalue()
    import hashlib

    path = checkpoint.checkpoint_path(tmp_path, 1)
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        checkpoint.load(path)
    assert not marker.exists()


def test_state_that_is_not_plain_data_is_refused_on_save(tmp_path):
    fa = _fedavg()
    s = fa.init()
    stores = {"codec": fedzip.MemoryStates().updated({"c0": {"w": object()}})[0]}
    with pytest.raises(CheckpointError, match=r"client_states.*'c0'.*object"):
        checkpoint.save(tmp_path, fedzip.ServerState(s.params, s.optimizer_state, s.aggregator_state, 1,
                                                     client_states=stores))
    assert checkpoint.list_checkpoints(tmp_path) == []


# --------------------------------------------------------------------------
# run(..., resume=True) in process
# --------------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_at(round_num):
    def on_round(state, metrics):
        if state.round == round_num:
            raise Crash(round_num)

    return on_round


def test_resume_in_process_continues_bits_counters_and_metrics(tmp_path, capsys):
    data = _data()
    full = run(_config(), tmp_path / "full", data=data, console=False)
    with pytest.raises(Crash):
        run(_config(), tmp_path / "cut", data=data, console=False, on_round=_crash_at(3))
    # the crash came after round 3's metrics line and before round 4: the newest checkpoint is round 2
    assert [m["round"] for m in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3]
    resumed = run(_config(), tmp_path / "cut", data=data, resume=True)
    assert "resuming after round 2" in capsys.readouterr().out
    assert _lines(tmp_path / "cut") == _lines(tmp_path / "full")
    assert [m["round"] for m in resumed.history] == [1, 2, 3, 4]
    _assert_same_state(full.state, resumed.state)
    _assert_same_state(_final(tmp_path / "full").state, _final(tmp_path / "cut").state)
    last = read_jsonl(tmp_path / "cut" / "metrics.jsonl")[-1]
    assert last["aggregated_bits/cumulative"] == sum(
        m["aggregated_bits"] for m in read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert _final(tmp_path / "cut").cumulative["aggregated_bits"] == last["aggregated_bits/cumulative"]


def _ef_codec_name():
    from fedzip import codecs

    names = set(codecs.registry()) if callable(getattr(codecs, "registry", None)) else set()
    return next((n for n in ("topk_ef", "powersgd_ef", "sign_ef") if n in names), None)


@pytest.mark.skipif(_ef_codec_name() is None, reason="no error-feedback codec in fedzip.codecs.registry()")
def test_resume_keeps_every_clients_error_feedback_residuals(tmp_path):
    data = _data()
    config = _config(rounds=2, aggregator=_ef_codec_name(), checkpoint_every=1, eval_every=0)
    full = run(config, tmp_path / "full", data=data, console=False)
    assert full.state.client_states["codec"], "the codec keeps per-client state"
    with pytest.raises(Crash):
        run(config, tmp_path / "cut", data=data, console=False, on_round=_crash_at(1))
    resumed = run(config, tmp_path / "cut", data=data, console=False, resume=True)
    _assert_same_state(full.state, resumed.state)  # params, momentum, and every residual
    assert _lines(tmp_path / "cut") == _lines(tmp_path / "full")


def test_resume_with_other_settings_is_refused_and_rounds_may_grow(tmp_path):
    data = _data()
    run(_config(rounds=2), tmp_path, data=data, console=False)
    with pytest.raises(ConfigError, match=r"other settings: seed=3 \(now 4\)"):
        run(_config(rounds=2, seed=4), tmp_path, data=data, console=False, resume=True)
    with pytest.raises(ConfigError, match="past rounds=1"):
        run(_config(rounds=1), tmp_path, data=data, console=False, resume=True)
    more = run(_config(rounds=3), tmp_path, data=data, console=False, resume=True)
    assert [m["round"] for m in more.history] == [1, 2, 3]
    assert checkpoint.latest(checkpoint.checkpoint_dir(tmp_path), log=None).round == 3


def test_a_fresh_run_in_an_old_folder_replaces_its_metrics_and_checkpoints(tmp_path):
    data = _data()
    run(_config(rounds=2), tmp_path, data=data, console=False)
    run(_config(rounds=1, seed=9), tmp_path, data=data, console=False)
    assert [m["round"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["round-000001.ckpt"]
    with pytest.raises(ConfigError, match="logdir"):
        run(_config(), None, data=data, console=False)


def test_one_run_at_a_time_writes_a_folder(tmp_path):
    from fedzip.run import _exclusive

    with _exclusive(tmp_path):  # as another process resuming the same folder would
        with pytest.raises(ConfigError, match=f"{tmp_path} is in use by another fedzip run"):
            run(_config(rounds=1), tmp_path, data=_data(), console=False, resume=True)
    run(_config(rounds=1), tmp_path, data=_data(), console=False, resume=True)  # free again
    # (the SIGKILL tests below show a killed run's lock does not outlive it)


# --------------------------------------------------------------------------
# The real CLI in a subprocess, killed with SIGKILL
# --------------------------------------------------------------------------

# `fedzip.cli.main` with the data loader pointed at small in-memory clients
# (tests/fakes.py), so these tests need no data files.
_FAKE_CLI = r"""
import sys, types
sys.path.insert(0, sys.argv.pop(1))
from fakes import TensorClients
import fedzip.run

def load_data(config):
    info = types.SimpleNamespace(name=config.dataset, description="fake clients", num_classes=10,
                                 pixels="28x28")
    return TensorClients(6, 20, seed=1), TensorClients(2, 10, seed=2), info

fedzip.run.load_data = load_data
from fedzip.cli import main
sys.exit(main(sys.argv[1:]))
"""

_FLAGS = ["--rounds", "5", "--clients-per-round", "2", "--aggregator", "compression",
          "--server-momentum", "0.9", "--checkpoint-every", "2", "--eval-every", "3", "--seed", "3"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDZIP_TEST_")}
    env.update(extra)
    return env


def _cli_cmd(*args, real=False):
    if real:
        return [sys.executable, "-m", "fedzip.cli", *args]
    return [sys.executable, "-c", _FAKE_CLI, str(TESTS), *args]


def _cli(*args, real=False, expect=0, **env):
    p = subprocess.run(_cli_cmd(*args, real=real), env=_env(**env), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _tensorboard_steps(logdir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run through the CLI in a subprocess."""
    root = tmp_path_factory.mktemp("baseline")
    _cli("run", "--logdir", str(root), "--name", "base", *_FLAGS)
    return root / "base"


def _assert_same_as(baseline_dir, logdir):
    assert [json.loads(x)["round"] for x in _lines(logdir)] == [1, 2, 3, 4, 5]
    assert _lines(logdir) == _lines(baseline_dir)
    a, b = _final(baseline_dir), _final(logdir)
    assert a.round == b.round == 5
    _assert_same_state(a.state, b.state)
    assert a.cumulative == b.cumulative
    assert _tensorboard_steps(logdir) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_round_then_resume_is_bit_identical(tmp_path, baseline):
    """Killed mid-round, after the metrics line, right after a checkpoint write
    and with the newest checkpoint then torn: each resume goes on from the last
    good checkpoint and the end is bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "k"
    _cli("run", "--logdir", str(tmp_path), "--name", "k", *_FLAGS, expect=-signal.SIGKILL,
         FEDZIP_TEST_KILL="round@3")  # round 3 trained, nothing of it written
    assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["round-000002.ckpt"]

    p = _cli("run", "--resume", str(run_dir), expect=-signal.SIGKILL, FEDZIP_TEST_KILL="metrics@4")
    assert "resuming after round 2" in p.stdout
    # round 4's line was written, its checkpoint was not
    assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]

    p = _cli("run", "--resume", str(run_dir), expect=-signal.SIGKILL, FEDZIP_TEST_KILL="checkpoint@4")
    assert "resuming after round 2" in p.stdout
    assert [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    ck4 = checkpoint.checkpoint_path(run_dir / "checkpoints", 4)
    raw = ck4.read_bytes()
    ck4.write_bytes(raw[: len(raw) - 1000])  # the newest checkpoint torn (a disk that lied)

    p = _cli("run", "--resume", str(run_dir))
    assert "round-000004.ckpt: checksum mismatch" in p.stderr and "previous checkpoint" in p.stderr
    assert "resuming after round 2" in p.stdout
    _assert_same_as(baseline, run_dir)
    assert json.loads((run_dir / "run.json").read_text())["config"] == json.loads(
        (baseline / "run.json").read_text())["config"] | {"name": "k"}


def _kill_after_first_checkpoint(cmd, run_dir, env):
    """Start ``cmd``, wait for its round-2 checkpoint, SIGKILL it (each round sleeps
    first, so the kill lands in round 3, mid-round)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck2 = checkpoint.checkpoint_path(run_dir / "checkpoints", 2)
    deadline = time.monotonic() + 240
    try:
        while not ck2.exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rounds = [m["round"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert rounds in ([1, 2], [1, 2, 3]), rounds


def _real_unipen() -> str | None:
    """Why ``python -m fedzip.cli`` cannot run on UNIPEN here, or None."""
    try:
        from fedzip.data import load_dataset  # noqa: F401
    except ImportError:
        return "fedzip.data.load_dataset does not exist yet"
    if not (SHARED / "fed_unipen_digitsonly_tiny_train.h5").exists():
        return f"UNIPEN data not found at {SHARED} (the repository's sibling shared/ folder)"
    return None


@pytest.mark.slow
def test_sigkill_from_outside_mid_round_then_resume_is_bit_identical(tmp_path, baseline):
    """``python -m fedzip.cli run --dataset unipen-digits-tiny`` killed from outside
    in the round after its first checkpoint, then resumed (on fake clients through
    the same CLI where the UNIPEN files are absent)."""
    why = _real_unipen()
    real = why is None
    if not real:
        print(f"UNIPEN run skipped ({why}); killing the CLI on fake clients instead")
    flags = [*_FLAGS, "--dataset", "unipen-digits-tiny"] if real else _FLAGS
    if real:
        _cli("run", "--logdir", str(tmp_path), "--name", "base", *flags, real=True)
        baseline = tmp_path / "base"
    run_dir = tmp_path / "ext"
    _kill_after_first_checkpoint(
        _cli_cmd("run", "--logdir", str(tmp_path), "--name", "ext", *flags, real=real), run_dir,
        _env(FEDZIP_TEST_SLEEP="0.5"))
    p = _cli("run", "--resume", str(run_dir), real=real)
    assert "resuming after round 2" in p.stdout
    _assert_same_as(baseline, run_dir)
    if real:
        assert json.loads((run_dir / "run.json").read_text())["data"]["name"] == "unipen-digits-tiny"
