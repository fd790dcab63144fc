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
next round page faults what it takes again). Elsewhere than glibc on Linux it
does nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["RoundTrim", "resident_bytes"]


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class RoundTrim:
    """Call after each round: trims the C heap when the resident memory grew by
    more than ``slack`` bytes since the last trim (see the module doc).
    ``trims`` counts the trims done."""

    def __init__(self, slack: int = 32 * 2**20, rss: Callable[[], int | None] = resident_bytes,
                 trim: Callable[[int], int] | None | bool = True) -> None:
        self.slack = slack
        self._rss = rss
        self._trim = _glibc_trim() if trim is True else (trim or None)
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
