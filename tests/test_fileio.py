"""Atomic writes: the old file or the new one, never half of one, never a temporary left."""

from __future__ import annotations

import pytest

from fedzip.errors import DataError
from fedzip.fileio import atomic_file, atomic_write


def test_writes_bytes_or_chunks_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write(path, [b"tw", memoryview(b"o!")])
    assert path.read_bytes() == b"two!"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failure_while_writing_or_a_refused_check_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")

    def refuse(tmp):
        assert tmp.read_bytes() == b"complete but wrong"  # the whole file, flushed
        raise DataError("unusable")

    with pytest.raises(DataError), atomic_file(path, check=refuse) as f:
        f.write(b"complete but wrong")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
