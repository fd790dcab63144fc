"""Clients as index sets into one shared array of 0..255 ink images.

Used for sources that hold every example in one array (the MNIST 5k csv, the
UNIPEN npz). Images stay uint8 with 0 = background, 255 = ink until a client is
read; only then are that client's examples turned into TFF's convention
(float32, 1.0 = background, 0.0 = ink), so the whole population costs one byte
per pixel and a read costs only the client's size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedzip.data.federated import ClientExamples
from fedzip.errors import DataError

__all__ = ["ArrayClientData", "NpzMember", "ink_to_tff"]


def ink_to_tff(ink: np.ndarray) -> np.ndarray:
    """uint8 0..255 (0 = background) → float32 in [0, 1] with 1.0 = background."""
    return (1.0 - ink.astype(np.float32) / np.float32(255.0)).astype(np.float32, copy=False)


class NpzMember:
    """One array of an ``.npz`` file, loaded on first :meth:`get` and kept.

    ``.npz`` members are deflated, so there is no reading part of one: the
    first client read pays for the whole array once (and the process shares it
    between objects reading the same file). Pickles without the array (a Ray
    worker reloads it from ``path``), which keeps shipped payloads small.

    ``rows``: keep only these rows (in this order) of the array: the whole
    array is read once, the rows copied out and the rest freed (UNIPEN's
    digits are 16 k of its 105 k images: 12 MB resident instead of 82 MB, in
    every process that reads clients).
    """

    def __init__(self, path: str | os.PathLike[str], key: str, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.rows = None if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        self._value: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self._value is None:
            try:
                stat = self.path.stat()
            except OSError as e:
                raise DataError(f"{self.path}: cannot read {self.key!r}: {e}") from None
            if self.rows is None:
                self._value = _load_member(str(self.path), self.key, stat.st_size, stat.st_mtime_ns)
            else:
                self._value = _load_rows(str(self.path), self.key, stat.st_size, stat.st_mtime_ns,
                                         self.rows.tobytes())
        return self._value

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "rows": self.rows, "_value": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"rows": None, **state})


@functools.lru_cache(maxsize=2)
def _load_member(path: str, key: str, size: int, mtime_ns: int) -> np.ndarray:
    """Shared per process and file version, so loading train, test and a second
    split of the same npz decompresses it once. Read-only, since it is shared."""
    value = _read_member(path, key)
    value.setflags(write=False)
    return value


@functools.lru_cache(maxsize=2)
def _load_rows(path: str, key: str, size: int, mtime_ns: int, rows: bytes) -> np.ndarray:
    """Some rows of a member, shared like :func:`_load_member`; the whole array
    is not kept."""
    full = _read_member(path, key)
    value = np.ascontiguousarray(full[np.frombuffer(rows, dtype=np.int64)])
    del full
    value.setflags(write=False)
    return value


def _read_member(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(f"{path}: no {key!r} array (has {npz.files})")
            value = npz[key]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read {key!r}: {e}") from None
    value.setflags(write=False)
    return value


class ArrayClientData:
    """A :class:`~fedzip.data.federated.FederatedData` over shared arrays.

    Args:
        ink: uint8 images ``[N, 28, 28]`` with 0 = background, 255 = ink, or an
            :class:`NpzMember` that loads them on first read.
        labels: int labels ``[N]``.
        clients: client id → indices into ``ink`` / ``labels``.
        num_classes: the number of classes of the model's output.
        description: one honest line about where the data comes from and how
            it was split.
        source: the file the data came from.
    """

    def __init__(
        self,
        ink: np.ndarray | NpzMember,
        labels: np.ndarray,
        clients: Mapping[str, np.ndarray],
        num_classes: int,
        description: str,
        source: str | os.PathLike[str] = "",
    ) -> None:
        self._ink = ink
        self._labels = labels
        self._clients = {cid: np.asarray(idx, dtype=np.int64) for cid, idx in clients.items()}
        self._ids = tuple(self._clients)
        self.num_classes = num_classes
        self.description = description
        self.source = str(source)
        self.reads = 0

    @property
    def client_ids(self) -> Sequence[str]:
        return self._ids

    def num_examples(self, client_id: str) -> int:
        """A client's example count, without reading its images."""
        return int(self._indices(client_id).shape[0])

    def _indices(self, client_id: str) -> np.ndarray:
        try:
            return self._clients[client_id]
        except KeyError:
            where = f"{self.source}: " if self.source else ""
            raise DataError(f"{where}unknown client id {client_id!r}") from None

    def client(self, client_id: str) -> ClientExamples:
        """One client: ``x`` float32 ``[n, 28, 28]`` (1.0 = background), ``y`` int64 ``[n]``."""
        idx = self._indices(client_id)
        ink = self._ink.get() if isinstance(self._ink, NpzMember) else self._ink
        if ink.dtype != np.uint8 or ink.shape[1:] != (28, 28) or len(ink) != len(self._labels):
            raise DataError(
                f"{self.source or 'images'}: expected uint8 images [{len(self._labels)}, 28, 28] "
                f"(one per label), got {ink.dtype} {tuple(ink.shape)}"
            )
        self.reads += 1
        return ClientExamples(
            torch.from_numpy(ink_to_tff(ink[idx])),
            torch.from_numpy(self._labels[idx].astype(np.int64)),
        )

    def __repr__(self) -> str:
        return f"ArrayClientData(clients={len(self._ids)}, {self.description!r})"
