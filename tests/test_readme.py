"""Every ```python block of README.md runs as written.

Each block runs on its own, in a fresh interpreter (this one's), from the
repository root, with one torch thread and a time limit; a block that raises
fails the suite, naming its line in README.md. A block that cannot run here
opts out with ``# not run by the suite: <reason>`` as its first line (use
sparingly: shell commands belong in ```bash blocks, which are not run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPT_OUT = "# not run by the suite:"
TIMEOUT_S = 300  # the example trains 10 rounds of the seed CNN: about 10 s on one thread

_FENCE = re.compile(r"^```(?:python|py)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every Python-fenced block, ``line`` where its fence opens."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_fence_parser_finds_python_blocks_only():
    text = "intro\n```bash\nmake run\n```\n\n```python\nprint(1)\n```\ntext\n```py\nx = 2\n```\n"
    assert python_blocks(text) == [(6, "print(1)\n"), (10, "x = 2\n")]
    assert BLOCKS, "README.md has no ```python block: nothing to check"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line: int, code: str) -> None:
    first = code.splitlines()[0].strip() if code.strip() else ""
    if first.startswith(OPT_OUT):
        reason = first[len(OPT_OUT):].strip()
        assert reason, f"README.md:{line}: an opt-out must give its reason"
        pytest.skip(f"README.md:{line}: {reason}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{line}: the example ran past {TIMEOUT_S} s")
    assert proc.returncode == 0, (
        f"README.md:{line}: the example exits with {proc.returncode}:\n{proc.stderr[-4000:]}"
    )
