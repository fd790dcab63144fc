"""``benchmarks/round_time.py``'s interval and verdict, and
``benchmarks/revision_ab.py`` run end to end on this repository (a worktree
of HEAD against this tree: one timed round each)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binom

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("benchmarks_round_time", BENCH / "round_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [6, 9, 11, 15, 20, 40])
def test_the_median_interval_is_the_sign_tests(rt, n):
    values = [float(v) for v in range(100, 100 + n)][::-1]  # any order
    lo, hi = rt.median_interval(values)
    k = int(lo) - 99  # the k-th smallest .. the k-th largest
    assert hi == 100 + n - k
    coverage = 1 - 2 * binom.cdf(k - 1, n, 0.5)
    assert coverage >= 0.95  # what it claims, and no narrower interval would hold it
    if k < n // 2:
        assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95


def test_too_few_rounds_give_the_whole_range(rt):
    # up to 5 values even min..max covers the median with less than 95%
    assert rt.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert rt.median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0)


def test_a_goal_is_met_or_missed_only_by_the_whole_interval(rt):
    assert rt.verdict(1.02, 0.98, 1.01).endswith("met")
    assert rt.verdict(1.02, 1.03, 1.10).endswith("MISSED")
    assert "unresolved" in rt.verdict(1.02, 1.00, 1.04)
    assert rt.verdict(None, 1.0, 2.0) == "no goal"
    assert "too few rounds" in rt.verdict(1.02, 1.03, 1.10, n=5)  # 5 rounds prove nothing at 95%


def test_a_device_that_is_not_there_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    out = subprocess.run([sys.executable, str(BENCH / "round_time.py"), "--device", "cuda", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--device" in out.stderr and "CUDA is not available" in out.stderr
    assert "Traceback" not in out.stderr


def _git_ok() -> bool:
    root = BENCH.parent
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.skipif(not _git_ok(), reason="not a git checkout")
def test_revision_ab_runs_both_sides_in_lockstep_and_cleans_up():
    root = BENCH.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    out = subprocess.run([sys.executable, str(BENCH / "revision_ab.py"), "HEAD", "--rounds", "1",
                          "--aggregators", "mean"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("mean "))
    this_s, rev_s, ratio = (float(v) for v in row.split()[1:4])
    assert this_s > 0 and rev_s > 0 and ratio == pytest.approx(this_s / rev_s, rel=1e-3)
    after = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before  # the temporary worktree is gone
    bad = subprocess.run([sys.executable, str(BENCH / "revision_ab.py"), "no-such-revision-xyz"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "no-such-revision-xyz" in bad.stderr


def test_clients_together_are_a_contender():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "round_time.py"), "--rounds", "1", "--threads", "1",
                          "--layouts", "", "--clients", "3", "--batch-clients", "3"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("seed workload: 3 clients")
    row = next(line for line in out.stdout.splitlines() if line.startswith("fedzip mean, 3 clients together"))
    assert float(row.split()[-4]) > 0  # its median s/round
    assert "ratio fedzip mean, 3 clients together / fedzip mean = " in out.stdout
