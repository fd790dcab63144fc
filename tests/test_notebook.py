"""examples/compression_tutorial.ipynb runs top to bottom, so it never rots.

The notebook is executed with nbclient in a kernel that is this interpreter
(a kernel spec written for the test, so whatever ``python3`` kernel the
machine has installed plays no part), on the offline default data with
``FEDZIP_NOTEBOOK_ROUNDS`` rounds per setting and one torch thread, in a
temporary folder (its TensorBoard logs go there). The notebook is kept in
the repository without outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "compression_tutorial.ipynb"
ROUNDS = 2  # per setting; the notebook's default is the tutorial's 10
KERNEL = "fedzip-test-python"


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{NOTEBOOK.name}: cells {dirty} hold outputs; commit it cleared"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), "the first code cell is the parameters cell"
    assert "FEDZIP_NOTEBOOK_ROUNDS" in first.source


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fedzip (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # the kernel inherits this environment
    monkeypatch.setenv("FEDZIP_NOTEBOOK_ROUNDS", str(ROUNDS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv("FEDZIP_NOTEBOOK_DATASET", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, timeout=300, startup_timeout=180, kernel_name=KERNEL, resources={"metadata": {"path": str(work)}})
    client.execute()  # a cell that raises fails here with its traceback (CellExecutionError)

    text = "\n".join(
        o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"[mean] round  {ROUNDS}" in text and f"[custom] round  {ROUNDS}" in text
    assert "checks passed" in text  # the contract test on the notebook's codec
    assert "fewer uplink bits than compression_aggregator()" in text
    assert images >= 3, f"expected the inline plots, got {images} images"
    for name in ("mean", "compression", "custom"):
        logdir = work / "runs" / "notebook" / name
        assert any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir()), logdir
