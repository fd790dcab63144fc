"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

The recipe, in one place: write a temporary file in the target's folder (a
rename is atomic only within one file system), flush and ``fsync`` it,
``os.replace`` it over the target, then ``fsync`` the folder so the rename
itself survives a power cut. On any error, the temporary file is removed and
the target is left as it was. Temporary files are named
``.<name>.<pid>.tmp``, so stale ones left by a killed process can be found
(:func:`fedzip.checkpoint.prune` deletes them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "atomic_write", "fsync_dir"]


@contextlib.contextmanager
def atomic_file(path: str | Path, check: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A binary file to write; on a clean exit it replaces ``path`` atomically.

    ``check(tmp)``, if given, runs on the complete temporary file before the
    rename: if it raises, ``path`` is never touched (say, refuse a download
    the loader would reject)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, chunks: Iterable[bytes | bytearray | memoryview] | bytes) -> None:
    """Write ``chunks`` (or one bytes object) to ``path`` atomically (see module doc)."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    with atomic_file(path) as f:
        for c in chunks:
            f.write(c)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
