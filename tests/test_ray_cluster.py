"""``fedzip run --backend ray --ray-address HOST:PORT`` joins a running cluster.

A real Ray head is started with ``ray start --head`` on this machine (loopback,
2 CPUs) and the CLI, in another process, runs on it; the result must be the
same bits as the local backend with the same thread count. The cluster is
killed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedzip.data.unipen import default_unipen_root
from fedzip.execution import ray_available

BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'fedzip[ray]')"),
    pytest.mark.skipif(not (default_unipen_root() / "fed_unipen_digitsonly_tiny_train.h5").exists(),
                       reason=f"UNIPEN data absent at {default_unipen_root()}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray >= 2.59 starts clusters with token authentication: the head and every
# driver share one token (here in the environment, as on a real cluster)
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head():
    port = _free_port()
    # a temp dir of its own: Ray writes the address of "the cluster on this
    # machine" there, and a killed head must not leave it for later ray.init calls
    # (short: Ray's socket paths must fit in 107 characters)
    temp_dir = tempfile.mkdtemp(prefix="fzray", dir="/tmp")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
         "--temp-dir", temp_dir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **AUTH},
    )
    try:
        deadline = time.monotonic() + 120
        seen = []
        for line in head.stdout:
            seen.append(line)
            if "Ray runtime started" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail("ray start --head exited:\n" + "".join(seen[-20:]))
        if not any("Ray runtime started" in s for s in seen):
            pytest.fail("ray start --head did not start in 120 s:\n" + "".join(seen[-20:]))
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(tmp_path: Path, name: str, *flags: str, env: dict | None = None) -> list[dict]:
    cmd = [str(BIN / "fedzip"), "run", "--dataset", "unipen-digits-tiny", "--rounds", "2",
           "--clients-per-round", "4", "--seed", "3", "--logdir", str(tmp_path), "--name", name, *flags]
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    # wall-clock timings differ by nature; every other metric must match
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def test_cli_joins_a_running_cluster_and_matches_the_local_backend(ray_head, tmp_path):
    on_cluster = _run(tmp_path, "cluster", "--backend", "ray", "--ray-address", ray_head,
                      "--num-workers", "2", "--threads", "1", env=AUTH)
    local = _run(tmp_path, "local", "--threads", "1")
    assert [m["clients/succeeded"] for m in on_cluster] == [4, 4]
    assert on_cluster == local  # every metric, bit for bit


def test_joining_without_the_clusters_token_is_one_clear_error(ray_head, tmp_path):
    cmd = [str(BIN / "fedzip"), "run", "--dataset", "unipen-digits-tiny", "--rounds", "1", "--backend", "ray",
           "--ray-address", ray_head, "--logdir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)  # the wrong token
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fedzip: error: ray_address") and "RAY_AUTH_TOKEN" in last
