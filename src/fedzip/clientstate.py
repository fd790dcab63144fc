"""Per-client state that lives across rounds: a store owned by whoever needs it.

Two owners use it today: the aggregator (a codec's per-client state, such as
error-feedback residuals or PowerSGD warm starts) and an algorithm (SCAFFOLD's
client control variates). What a store may do with state it cannot keep is
its owner's choice, and never silent:

* :class:`MemoryStates` with ``max_clients=None`` keeps every client's state
  (what an algorithm that needs all of them asks for).
* :class:`MemoryStates` with ``max_clients=N`` drops the least recently
  updated clients beyond N, and says so: :meth:`ClientStates.updated`
  returns the dropped ids, the round's metrics count them, and a warning says
  once what dropping means for the owner (a dropped error-feedback client
  starts again from a zero residual).
* :class:`DiskStates` keeps each client's state in a file of its own under a
  folder, so the driver's memory holds only the index; reads and writes go
  through ``torch.save`` / ``torch.load(weights_only=True)``.

Stores are values: :meth:`updated` returns a new store and leaves the old one
as it was (a disk store writes new files and never overwrites a file an older
store reads), so a failed round leaves the server state unchanged. A
checkpoint holds the states themselves (:meth:`ClientStates.to_plain`).
"""

from __future__ import annotations

import abc
import hashlib
import io
import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedzip import tree
from fedzip.errors import ConfigError


class ClientStates(Mapping[str, Any], abc.ABC):
    """An immutable mapping client id → state, updated by :meth:`updated`."""

    @abc.abstractmethod
    def updated(self, new: Mapping[str, Any]) -> tuple[ClientStates, list[str]]:
        """A store holding ``new`` on top of this one, and the ids it dropped to make room."""

    @abc.abstractmethod
    def empty(self) -> ClientStates:
        """A store of the same kind with no state."""

    def nbytes(self) -> int:
        """Bytes of state this store keeps in the driver's memory."""
        return tree.nbytes(dict(self.items()))

    def to_plain(self) -> dict[str, Any]:
        """Every client's state as a plain dict (for checkpoints)."""
        return {k: self[k] for k in self}

    def from_plain(self, states: Mapping[str, Any]) -> ClientStates:
        """A store of this kind holding ``states`` (from a checkpoint)."""
        store, dropped = self.empty().updated(dict(states))
        if dropped:
            raise ConfigError(f"{len(dropped)} client states do not fit this store's bound")
        return store


class MemoryStates(ClientStates):
    """States in a dict; ``max_clients`` bounds it (least recently updated
    dropped first, reported), None keeps every client's state."""

    def __init__(self, max_clients: int | None = None, _items: dict[str, Any] | None = None) -> None:
        if max_clients is not None and (not isinstance(max_clients, int) or isinstance(max_clients, bool)
                                        or max_clients < 0):
            raise ConfigError(f"max_clients must be a non-negative integer or None, got {max_clients!r}")
        self.max_clients = max_clients
        self._items: dict[str, Any] = dict(_items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> MemoryStates:
        return MemoryStates(self.max_clients)

    def updated(self, new: Mapping[str, Any]) -> tuple[MemoryStates, list[str]]:
        # updated clients move to the end: the dict's order is recency
        merged = {k: v for k, v in self._items.items() if k not in new}
        merged.update(new)
        dropped: list[str] = []
        if self.max_clients is not None and len(merged) > self.max_clients:
            dropped = list(itertools.islice(merged, len(merged) - self.max_clients))
            for k in dropped:
                del merged[k]
        return MemoryStates(self.max_clients, merged), dropped


class DiskStates(ClientStates):
    """Each client's state in ``directory/<hash of id>-<n>.pt``; only the index
    (client id → file name) stays in memory. Never drops state.

    Files are written once and never overwritten: an update writes a new file
    (atomically), so older stores, such as the state a failed round must keep,
    still read theirs. :meth:`collect` deletes files no store passed to it uses.
    """

    def __init__(self, directory: str | os.PathLike, _index: dict[str, str] | None = None,
                 _counter: list[int] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, str] = dict(_index or {})
        # shared by the stores derived from this one: file names never repeat
        self._counter = _counter if _counter is not None else [_next_free(self.directory)]

    def __getitem__(self, key: str) -> Any:
        name = self._index[key]
        with open(self.directory / name, "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def nbytes(self) -> int:
        return 0  # nothing but the index in memory

    def disk_bytes(self) -> int:
        return sum((self.directory / n).stat().st_size for n in self._index.values())

    def empty(self) -> DiskStates:
        return DiskStates(self.directory, {}, self._counter)

    def updated(self, new: Mapping[str, Any]) -> tuple[DiskStates, list[str]]:
        from fedzip.checkpoint import atomic_write

        index = dict(self._index)
        for cid, state in new.items():
            digest = hashlib.blake2b(cid.encode("utf-8"), digest_size=8).hexdigest()
            name = f"{digest}-{self._counter[0]}.pt"
            self._counter[0] += 1
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write(self.directory / name, buf.getvalue())
            index[cid] = name
        return DiskStates(self.directory, index, self._counter), []

    def collect(self, *live: DiskStates) -> int:
        """Delete the files in this folder that none of ``live`` (and self) uses; returns how many."""
        used = set(self._index.values()).union(*(s._index.values() for s in live))
        gone = 0
        for p in self.directory.glob("*.pt"):
            if p.name not in used:
                p.unlink(missing_ok=True)
                gone += 1
        return gone


def _next_free(directory: Path) -> int:
    numbers = [int(p.stem.rsplit("-", 1)[-1]) for p in directory.glob("*-*.pt")
               if p.stem.rsplit("-", 1)[-1].isdigit()]
    return max(numbers, default=-1) + 1


__all__ = ["ClientStates", "DiskStates", "MemoryStates"]
