"""The C allocator between rounds: memory a round freed goes back to the system.

glibc's malloc keeps what a round frees in its heaps for the next round, and
can return only the free pages at the top of a heap on its own, so the
resident memory after a round drifts by tens of MB with which chunks happen
to sit at the top (measured on UNIPEN digits with the seed CNN: 510 to 602
MiB after a round over 60 rounds). :class:`RoundTrim`, called after each
round, gives the free pages back (``malloc_trim``) when the round left the
resident memory more than ``slack`` above what it was after the last trim:
the resident memory after every round then stays within ``slack`` of the
live memory, and most rounds pay nothing (a trim costs about 10 ms, and the
next round page faults what it takes again). :func:`keep_heap` keeps what
one client frees for the next within a round, and :func:`limit_arenas` bounds
the heaps a worker process keeps. Elsewhere than glibc on Linux they do
nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

__all__ = ["RoundTrim", "keep_heap", "limit_arenas", "resident_bytes"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_kept = False


def _libc(name: str, argtypes: list[Any], restype: Any) -> Callable[..., int] | None:
    """glibc's function ``name`` (None elsewhere)."""
    try:
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def _mallopt(settings: list[tuple[int, int]]) -> bool:
    """Apply ``(param, value)`` settings with ``mallopt``; True when all took."""
    mallopt = _libc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in settings)


def limit_arenas(arenas: int = 2) -> bool:
    """At most ``arenas`` malloc arenas in this process (glibc makes one per
    thread by default, each keeping freed memory of its own); True when applied."""
    return _mallopt([(_M_ARENA_MAX, arenas)])


def keep_heap(pad: int = 64 * 2**20, mmap_threshold: int = 32 * 2**20) -> bool:
    """Keep freed memory in the C heap for the next client instead of giving it
    back to the system at once (glibc; elsewhere it does nothing; once per process).

    Every client of a round allocates and frees the same large buffers (its
    delta, its message, the server's decoded update: 6.6 MB each for the seed
    CNN). With glibc's defaults the heap's free top is returned to the system
    whenever it passes the trim threshold, and the next client page faults
    it back: measured at 3 to 4% of a seed-workload round
    (``benchmarks/round_time.py``, 1.099 against 1.071 times the floor).
    This keeps a ``pad`` above the heap's top, serves blocks up to
    ``mmap_threshold`` from the heap (glibc's largest), and turns automatic
    trimming off: :class:`RoundTrim` gives the memory back between rounds,
    so the resident memory stays within its slack of the live memory.
    True when the settings were applied.
    """
    global _kept
    if not _kept:
        _kept = _mallopt([(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TOP_PAD, pad),
                          (_M_TRIM_THRESHOLD, 2**31 - 1)])
    return _kept


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class RoundTrim:
    """Call after each round: trims the C heap when the resident memory grew by
    more than ``slack`` bytes since the last trim (see the module doc).
    ``trims`` counts the trims done."""

    def __init__(self, slack: int = 32 * 2**20, rss: Callable[[], int | None] = resident_bytes,
                 trim: Callable[[int], int] | None | bool = True) -> None:
        self.slack = slack
        self._rss = rss
        if trim is True:
            trim = _libc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
        self._trim = trim or None
        self._base: int | None = None
        self.trims = 0

    def __call__(self) -> bool:
        """True when it trimmed."""
        if self._trim is None:
            return False
        now = self._rss()
        if now is None or (self._base is not None and now <= self._base + self.slack):
            return False
        self._trim(0)
        self.trims += 1
        self._base = self._rss()
        return True
