"""Giving memory back before deciding to restart: ``gc.collect()`` and glibc's ``malloc_trim``.

A worker can sit over a memory limit because of garbage that a collection frees
or because glibc keeps freed heap pages; both come back without a restart. The
attempts are budgeted: after each one, the next waits for 99 times as long as it
took, so reclaiming costs at most 1 % of the worker's time even when every task
trips a memory rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import time
from collections.abc import Callable

#: The next attempt waits this many times as long as the last one took.
BACKOFF_FACTOR = 99
#: The share of a worker's time that reclaiming may take.
BUDGET_SHARE = 0.01

_malloc_trim: Callable[[int], int] | None = None
_malloc_trim_loaded = False


def _load_malloc_trim() -> Callable[[int], int] | None:
    global _malloc_trim, _malloc_trim_loaded
    if not _malloc_trim_loaded:
        _malloc_trim_loaded = True
        if platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_trim = libc.malloc_trim
            except (OSError, AttributeError):
                _malloc_trim = None
    return _malloc_trim


def reclaim() -> None:
    """Collect garbage, then return free heap pages to the kernel on glibc."""
    gc.collect()
    trim = _load_malloc_trim()
    if trim is not None:
        trim(0)


class Reclaimer:
    """Attempts to reclaim memory, within a budget of about 1 % of the time."""

    def __init__(self) -> None:
        self._next_allowed = 0.0
        self._last = 0.0
        #: Seconds spent reclaiming in this process, for the stats.
        self.seconds = 0.0
        #: Bytes the attempts gave back in this process, for the stats.
        self.reclaimed = 0
        self.attempts = 0

    def allowed(self, uptime: float) -> bool:
        """Return whether the budget allows an attempt now.

        The first attempt is always allowed: without it a worker would restart for
        garbage that one collection frees. After it, an attempt must wait out the
        back-off and keep the total time spent, this attempt included (estimated from
        the slowest one so far), within 1 % of ``uptime``.
        """
        if not self.attempts:
            return True
        if time.monotonic() < self._next_allowed:
            return False
        return self.seconds + self._last <= BUDGET_SHARE * uptime

    def attempt(self) -> float:
        """Reclaim memory and return how long it took, in seconds."""
        started = time.monotonic()
        reclaim()
        finished = time.monotonic()
        took = finished - started
        self._next_allowed = finished + BACKOFF_FACTOR * took
        # The next attempt is estimated from the slowest so far, with a margin,
        # because a collection grows slower as the heap grows.
        self._last = max(self._last, took * 1.25)
        self.seconds += took
        self.attempts += 1
        return took
