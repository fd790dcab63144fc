"""The command line: bad input ends in one ``fedzip: error: ...`` line and exit
status 2, naming the field or file, before any training; a run's ``run.json``
repeats it bit for bit; ``--resume`` and ``tutorial`` work."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from fakes import TensorClients, deterministic

import fedzip.run
from fedzip import checkpoint
from fedzip.cli import main
from fedzip.data.federated import ClientExamples
from fedzip.metrics import read_jsonl

SMALL = ["--rounds", "2", "--clients-per-round", "2", "--eval-every", "1"]


def _registry():
    from fedzip import codecs

    return set(codecs.registry()) if callable(getattr(codecs, "registry", None)) else {"uniform"}


def _info(num_classes=10):
    return SimpleNamespace(name="fake", description="fake clients", num_classes=num_classes, pixels="28x28")


@pytest.fixture
def fake_data(monkeypatch):
    """Point the CLI's data loader at small in-memory clients; record the calls."""
    calls = []

    def load(config):
        calls.append(config.dataset)
        return TensorClients(4, 12, seed=1), TensorClients(2, 6, seed=2), _info()

    monkeypatch.setattr(fedzip.run, "load_data", load)
    return calls


def _fails(argv, capsys, match, code=2):
    """Run the CLI; it must exit ``code`` with one clean error line matching ``match``."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fedzip: error:")]
    assert len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    ([], "required: command"),
    (["fly"], "invalid choice: 'fly'"),
    (["run", "--roundz", "3"], "unrecognized arguments: --roundz 3"),
    (["run", "--rounds", "ten"], "argument --rounds: invalid int value: 'ten'"),
    (["run", "--rounds", "2.5"], "argument --rounds: invalid int value: '2.5'"),
    (["run", "--client-lr", "fast"], "argument --client-lr: invalid float value: 'fast'"),
    (["run", "--rounds", "0"], "rounds must be >= 1, got 0"),
    (["run", "--rounds", "-3"], "rounds must be >= 1, got -3"),
    (["run", "--clients-per-round", "0"], "clients_per_round must be >= 1, got 0"),
    (["run", "--client-lr", "-0.1"], r"client_lr must be > 0, got -0\.1"),
    (["run", "--server-lr", "0"], "server_lr must be > 0"),
    (["run", "--client-lr", "nan"], "client_lr must be a finite number, got nan"),
    (["run", "--server-momentum", "-1"], "server_momentum must be >= 0"),
    (["run", "--batch-size", "0"], "batch_size must be >= 1"),
    (["run", "--seed", "-1"], "seed must be >= 0"),
    (["run", "--min-clients", "0"], "min_clients must be >= 1"),
    (["run", "--checkpoint-every", "-2"], "checkpoint_every must be >= 0"),
    (["run", "--client-optimizer", "adamw"], r"client_optimizer 'adamw' unknown; choose from \['adagrad', 'adam', 'sgd'\]"),
    (["run", "--backend", "spark"], "backend must be 'local', 'processes' or 'ray', got 'spark'"),
    (["run", "--device", "gpu0"], "device 'gpu0' is not a torch device"),
    (["run", "--threads", "0"], "threads must be >= 1"),
    (["run", "--aggregator", "meen"], "aggregator 'meen' unknown"),
    (["run", "--aggregator", "compression:bits=40"], "bits.*1..16.*40"),
    (["run", "--aggregator", "compression:bits=0"], "bits.*1..16.*0"),
    (["run", "--aggregator", "compression:bitz=4"], "unexpected keyword argument 'bitz'"),
    (["run", "--aggregator", "compression:bits"], "option 'bits' must be key=value"),
    (["run", "--broadcast", "zip"], "broadcast codec 'zip' unknown"),
    *[pytest.param(["run", flag, spec], match, marks=pytest.mark.skipif(
        spec.split(":")[0] not in _registry(), reason=f"no codec {spec.split(':')[0]!r} in the registry"))
      for flag, spec, match in [
          ("--aggregator", "uniform:bits=17", r"uniform:bits=17.*bits must be an integer in 1\.\.16, got 17"),
          ("--broadcast", "uniform:bits=0", r"bits must be an integer in 1\.\.16, got 0"),
          ("--aggregator", "eden:bits=0", r"EDEN\.bits must be in \(0, 8\], got 0"),
          ("--aggregator", "qsgd:levels=0", r"QSGD\.levels must be .*got 0"),
          ("--aggregator", "topk:fraction=2", r"TopK\.fraction must be in \(0, 1\], got 2"),
          ("--aggregator", "uniform:bits=4,threshold=-1", r"threshold must be a non-negative integer, got -1"),
          ("--aggregator", "uniform:bitz=3", "unexpected keyword argument 'bitz'"),
      ]],
    (["run", "--name", "../up"], "name '../up' must be a plain folder name"),
    (["run", "--name", ""], "name '' must be a plain folder name"),
])
def test_bad_flags_fail_before_loading_data(argv, match, capsys, fake_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(argv, capsys, match)
    assert fake_data == [], "no data is read for a bad config"
    assert not any(tmp_path.iterdir()), "nothing is written"


@pytest.mark.parametrize("text, match", [
    (None, r"config file .*missing\.json does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"rounds": 2, "roundz": 3}', r"unknown option\(s\) \['roundz'\]"),
    ('{"rounds": "3"}', "rounds must be of type int, got str '3'"),
    ('{"rounds": 3.0}', "rounds must be of type int, got float 3.0"),
    ('{"rounds": true}', "rounds must be of type int, got bool True"),
    ('{"client_lr": null}', "client_lr must not be null"),
    ('{"config": {"clients_per_round": -1}, "versions": {}}', "clients_per_round must be >= 1"),
])
def test_bad_config_files_name_the_file_or_field(text, match, capsys, fake_data, tmp_path):
    path = tmp_path / ("missing.json" if text is None else "c.json")
    if text is not None:
        path.write_text(text)
    _fails(["run", "--config", str(path), "--logdir", str(tmp_path / "runs")], capsys, match)
    assert fake_data == []


@pytest.mark.parametrize("argv", [["--client-lr", "inf"], ["--server-momentum", "nan"],
                                  ["--server-lr", "inf"]])
def test_non_finite_floats_are_refused(argv, capsys, fake_data, tmp_path):
    _fails(["run", *argv, "--logdir", str(tmp_path)], capsys, argv[0][2:].replace("-", "_"))


def test_more_clients_than_the_data_has(capsys, fake_data, tmp_path):
    _fails(["run", "--clients-per-round", "9", "--logdir", str(tmp_path)], capsys,
           "clients_per_round=9 but fake has only 4 training clients")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_min_clients_above_the_cohort(capsys, fake_data, tmp_path):
    _fails(["run", "--clients-per-round", "2", "--min-clients", "3", "--logdir", str(tmp_path)], capsys,
           "min_clients=3 is more than clients_per_round=2")


@pytest.mark.parametrize("images, labels, num_classes, match", [
    (torch.rand(5, 32, 32), torch.zeros(5, dtype=torch.long), 10, r"shape \(32, 32\)\) do not fit the model"),
    (torch.rand(5, 28, 28), torch.full((5,), 40), 10, r"labels outside 0\.\.9"),
    (torch.rand(5, 28, 28), torch.zeros(5, dtype=torch.long), 0, "num_classes=0"),
])
def test_a_data_set_that_does_not_fit_the_model(images, labels, num_classes, match, capsys, monkeypatch, tmp_path):
    bad = SimpleNamespace(client_ids=["w1"], client=lambda cid: ClientExamples(images, labels))
    monkeypatch.setattr(fedzip.run, "load_data", lambda config: (bad, bad, _info(num_classes)))
    _fails(["run", "--clients-per-round", "1", "--logdir", str(tmp_path)], capsys, match)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_data_file_is_named(capsys, monkeypatch, tmp_path):
    def load(config):
        raise FileNotFoundError(2, "No such file or directory", "/data/fed_unipen_tiny_train.h5")

    monkeypatch.setattr(fedzip.run, "load_data", load)
    _fails(["run", "--logdir", str(tmp_path)], capsys,
           "fedzip: error: /data/fed_unipen_tiny_train.h5: No such file or directory")


def _real_loader():
    try:
        from fedzip.data import load_dataset  # noqa: F401
    except ImportError:
        pytest.skip("fedzip.data.load_dataset does not exist yet")


def _h5(path, shape=(5, 28, 28), labels=True):
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        for c in ("w1", "w2"):
            f[f"examples/{c}/pixels"] = np.random.default_rng(0).random(shape, dtype=np.float32)
            if labels:
                f[f"examples/{c}/label"] = np.zeros(shape[0], np.int32)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: "no-such-data", "dataset 'no-such-data' unknown"),
    (lambda d: f"h5:{d}/gone_train.h5,{d}/gone_test.h5", r"gone_train\.h5: no such file"),
    (lambda d: f"h5:{_h5(d / 'a_train.h5')},{d}/gone_test.h5", r"gone_test\.h5: no such file"),
    (lambda d: f"h5:{_garbage(d / 'g_train.h5')},{_garbage(d / 'g_test.h5')}", "not an HDF5 file"),
    (lambda d: f"h5:{_h5(d / 's_train.h5', (5, 32, 32))},{_h5(d / 's_test.h5', (5, 32, 32))}",
     r"shape \(5, 32, 32\), expected \[n, 28, 28\]"),
    (lambda d: f"h5:{_h5(d / 'l_train.h5', labels=False)},{_h5(d / 'l_test.h5', labels=False)}",
     "has no 'label'"),
])
def test_real_loader_errors_name_the_data_set_or_file(make, match, capsys, tmp_path):
    """Through the real data loader: unknown names, missing, corrupt and misshapen files."""
    _real_loader()
    _fails(["run", "--dataset", make(tmp_path), "--clients-per-round", "1", "--logdir", str(tmp_path / "r")],
           capsys, match)
    assert not (tmp_path / "r" / "run" / "metrics.jsonl").exists()


def _garbage(path):
    path.write_bytes(b"not hdf5 at all")
    return path


def test_a_logdir_that_is_a_file(capsys, fake_data, tmp_path):
    (tmp_path / "f").write_text("")
    line = _fails(["run", *SMALL, "--logdir", str(tmp_path / "f")], capsys, "f")
    assert "Not a directory" in line or "File exists" in line


@pytest.mark.parametrize("setup, argv, match", [
    (None, ["--resume", "{d}/nowhere"], "is not a folder"),
    ("empty", ["--resume", "{d}"], r"run\.json does not exist: not a run folder"),
    ("corrupt", ["--resume", "{d}"], "is not valid JSON"),
    ("empty", ["--resume", "{d}", "--config", "x.json"], "give neither --config nor --logdir"),
    ("empty", ["--resume", "{d}", "--logdir", "x"], "give neither --config nor --logdir"),
])
def test_bad_resume(setup, argv, match, capsys, fake_data, tmp_path):
    if setup == "corrupt":
        (tmp_path / "run.json").write_text('{"config": {"rounds": 2,')
    _fails(["run", *[a.format(d=tmp_path) for a in argv]], capsys, match)


# --------------------------------------------------------------------------
# Runs that work
# --------------------------------------------------------------------------


def test_run_json_is_complete_and_repeats_the_run_bit_for_bit(capsys, fake_data, tmp_path):
    flags = [*SMALL, "--aggregator", "compression", "--checkpoint-every", "2", "--seed", "11"]
    assert main(["run", *flags, "--logdir", str(tmp_path / "a"), "--name", "one"]) == 0
    first = tmp_path / "a" / "one"
    meta = json.loads((first / "run.json").read_text())
    assert meta["seed"] == 11 and meta["config"]["seed"] == 11
    assert meta["config"]["aggregator"] == "compression" and meta["config"]["rounds"] == 2
    assert {"fedzip", "torch", "numpy", "python", "platform"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["torch_threads"] == torch.get_num_threads() and meta["data"]["name"] == "fake"
    assert main(["run", "--config", str(first / "run.json"), "--logdir", str(tmp_path / "b")]) == 0
    second = tmp_path / "b" / "one"
    assert deterministic(read_jsonl(first / "metrics.jsonl")) == deterministic(read_jsonl(second / "metrics.jsonl"))
    a = checkpoint.latest(first / "checkpoints", log=None)
    b = checkpoint.latest(second / "checkpoints", log=None)
    assert a.round == b.round == 2
    assert all(torch.equal(a.state.params[k], b.state.params[k]) for k in a.state.params)
    assert "final eval" in capsys.readouterr().out


def test_resume_flag_goes_on_and_may_extend_the_run(capsys, fake_data, tmp_path):
    assert main(["run", *SMALL, "--checkpoint-every", "1", "--logdir", str(tmp_path), "--name", "r"]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "r"), "--rounds", "3"]) == 0
    assert "resuming after round 2" in capsys.readouterr().out
    assert [m["round"] for m in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["rounds"] == 3
    # the checkpoints folder works as DIR too; a finished run resumes to itself
    assert main(["run", "--resume", str(tmp_path / "r" / "checkpoints")]) == 0
    assert [m["round"] for m in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3]
    _fails(["run", "--resume", str(tmp_path / "r"), "--seed", "5"], capsys, r"other settings: seed=0 \(now 5\)")


def test_a_failed_round_is_one_error_line(capsys, monkeypatch, tmp_path):
    poisoned = TensorClients(2, 8, poison={"c0", "c1"})
    monkeypatch.setattr(fedzip.run, "load_data", lambda config: (poisoned, poisoned, _info()))
    _fails(["run", "--rounds", "1", "--clients-per-round", "2", "--logdir", str(tmp_path)], capsys,
           r"round 1: 0 of 2 clients succeeded.*unchanged")


def test_tutorial_still_runs(capsys, fake_data, tmp_path):
    assert main(["tutorial", "--rounds", "1", "--clients-per-round", "2", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "summary:" in out and (tmp_path / "comparison.png").exists()
    for name in ("mean", "compression"):
        assert [m["round"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")] == [1]


def test_every_option_of_every_command_has_a_description(capsys):
    import argparse

    from fedzip import cli

    parser_holder = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        parser_holder.setdefault("root", self)
        return real(self, *a, **k)

    argparse.ArgumentParser.parse_args = capture
    try:
        cli.main(["codecs"])
    finally:
        argparse.ArgumentParser.parse_args = real
    capsys.readouterr()
    root = parser_holder["root"]
    subparsers = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert {"run", "tutorial", "codecs"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and not action.help.startswith("(default"), (name, action.dest)


def test_codecs_command_lists_every_codec_with_arguments_and_paper(capsys):
    from fedzip.codecs import registry

    assert main(["codecs"]) == 0
    out = capsys.readouterr().out
    for name in registry():
        assert f"\n{name}(" in "\n" + out, name
    assert out.count("    paper: ") == len(registry())
    assert "eden(bits=2, block_size=65536)" in out and "ICML 2022" in out
