"""Per-process state of one guard: baseline, start time, calls completed and in flight.

The state belongs to the process, not to an object: a forked child starts again
with no baseline, no calls and no pending exit, because its memory and its work
are its own. All counters change under one lock, so threads can share a guard.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

from . import footprint
from .memory import RssReader, default_reader
from .reclaim import Reclaimer
from .restart_slots import SlotState
from .rules import Rule, Snapshot

if TYPE_CHECKING:
    from .behavior import Decision


#: How often a call held for a pending exit looks whether the calls in flight ended, in seconds.
_IDLE_POLL_SECONDS = 0.002


class Tracker:
    """Counters and the pending exit of one guard in this process."""

    def __init__(self, reader: RssReader | None = None) -> None:
        self._reader = reader
        #: Whether :meth:`start` takes the baseline; not with a warm-up, which takes it later.
        self.baseline_at_start = True
        #: The memory figure of the memory rules, set by the guard: rss, uss or pss.
        self.metric = "rss"
        self._reset()
        _trackers.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        #: Calls in flight, one marker each (a thread id, or a token for a coroutine).
        #: ``deque.append`` and ``deque.remove`` are atomic, so the hot path needs no lock.
        self.flight: deque[object] = deque()
        #: Counts completed calls; ``next()`` on it is atomic.
        self.counter = itertools.count(1)
        #: Guarded calls completed, as the counter last returned it.
        self.tasks = 0
        #: Thresholds of the hot path: below all of them no rule can trip, so the
        #: full check is skipped. ``fast`` is off until the first full check.
        self.fast = False
        self.next_tasks = 0
        self.timed = False
        self.deadline = math.inf
        self.watch_memory = False
        self.rss_limit = math.inf
        #: RSS in bytes just before the first guarded call, when a memory rule needs it.
        self.baseline: int | None = None
        #: ``time.monotonic()`` at the first guarded call, or ``None`` before it.
        self.started_at: float | None = None
        #: ``time.time()`` at the first guarded call, for logs and karton-memory-watcher's API.
        self.started_wall: float | None = None
        #: Whether the baseline was taken (the first guarded call has started).
        self.started = False
        #: Whether the effective rules were logged in this process.
        self.start_logged = False
        #: ``time.monotonic()`` when the idle checks last saw :attr:`tasks` change.
        self.idle_since: float | None = None
        self.idle_tasks = 0
        #: This process's rules, with its own jitter drawn, once checked.
        self.rules: tuple[Rule, ...] | None = None
        #: Tasks done and uptime when the baseline was taken, for the growth rates.
        self.baseline_tasks = 0
        self.baseline_uptime = 0.0
        #: The last RSS read, for the stats.
        self.last_rss: int | None = None
        self.reclaimer = Reclaimer()
        #: Whether a ceiling is below the start-up footprint, as the first check found it.
        self.storm: bool | None = None
        #: The baseline in the configured metric (USS or PSS), taken with the RSS one.
        self.metric_baseline: int | None = None
        #: The last USS or PSS read, and the RSS at that moment.
        self.last_metric: int | None = None
        self.metric_rss: int | None = None
        #: The task count and the time at which the USS or PSS is read again.
        self.metric_next_tasks = 0
        self.metric_next_time = 0.0
        #: Restarts put off because the fleet's restart slots were taken.
        self.deferrals = 0
        #: The fleet's restart slots and the restart deferred until one is free.
        self.slots = SlotState()
        #: The decision that ends this process, once a rule has tripped.
        self.decision: Decision | None = None
        #: Rules already logged in dry-run mode, each logged once per process.
        self.reported: set[str] = set()
        #: Whether the memory-read failure was logged, so that it is logged once.
        self.memory_failure_logged = False
        self._exit_claimed = False
        #: Set when the exit was carried out and held calls may go on.
        self.released = threading.Event()
        #: The exit status held calls in other threads end with, or ``None`` to let them run.
        self.release_code: int | None = None

    @property
    def reader(self) -> RssReader:
        """Return the RSS reader, the process-wide one unless another was given."""
        if self._reader is None:
            self._reader = default_reader()
        return self._reader

    def start(self, read_memory: bool) -> None:
        """Take the baseline, and start the clock unless it runs already, once per process."""
        if self.started:
            return
        with self._lock:
            if self.started:
                return
            if read_memory and self.baseline_at_start:
                self.baseline = self.reader.read()
                self.metric_baseline = self.read_metric()
            self._start_clock()
            self.started = True

    def read_metric(self) -> int | None:
        """Return the USS or PSS in bytes when that metric is configured, else ``None``."""
        if self.metric == "uss":
            return footprint.default_reader().uss()
        if self.metric == "pss":
            return footprint.default_reader().pss()
        return None

    def start_clock(self) -> None:
        """Start the clock of ``max_seconds`` now, when a karton service starts its loop."""
        with self._lock:
            self._start_clock()

    def _start_clock(self) -> None:
        if self.started_at is None:
            self.started_wall = time.time()
            self.started_at = time.monotonic()

    @property
    def in_flight(self) -> int:
        """Return the number of guarded calls in flight."""
        return len(self.flight)

    def enter(self, read_memory: bool, marker: object) -> None:
        """Record the start of a guarded call, identified by ``marker``."""
        self.start(read_memory)
        self.flight.append(marker)

    def leave(self, marker: object) -> int:
        """Record the end of a call entered with :meth:`enter`; return the tasks done."""
        with contextlib.suppress(ValueError):
            self.flight.remove(marker)
        return self.count()

    def count(self) -> int:
        """Count one completed call and return the tasks done."""
        tasks = next(self.counter)
        self.tasks = tasks
        return tasks

    def record(self, read_memory: bool) -> Snapshot:
        """Count one completed call without in-flight bookkeeping and return a snapshot."""
        self.start(read_memory)
        tasks = self.count()
        return self.snapshot(read_memory, tasks=tasks, in_flight=self.in_flight)

    def snapshot(
        self, read_memory: bool, *, tasks: int | None = None, in_flight: int = 0
    ) -> Snapshot:
        """Return the current state; the RSS is read only when ``read_memory`` is set."""
        started_at = self.started_at
        uptime = 0.0 if started_at is None else time.monotonic() - started_at
        return Snapshot(
            tasks=self.tasks if tasks is None else tasks,
            uptime=uptime,
            rss=self.reader.read() if read_memory else None,
            baseline=self.baseline,
            in_flight=in_flight,
        )

    def set_decision(self, decision: Decision) -> bool:
        """Store the decision that ends the process; return ``False`` if one was already stored."""
        with self._lock:
            if self.decision is not None:
                return False
            self.decision = decision
            return True

    def claim_exit(self) -> bool:
        """Return ``True`` to exactly one caller: the one that carries out the exit."""
        with self._lock:
            if self._exit_claimed:
                return False
            self._exit_claimed = True
            return True

    def release(self, code: int | None) -> None:
        """Wake the calls held while the exit was carried out."""
        self.release_code = code
        self.released.set()

    def wait_idle(self) -> None:
        """Block until no guarded call is in flight.

        It polls, because the hot path keeps no condition variable; it waits only
        while an exit is pending.
        """
        while self.flight:
            time.sleep(_IDLE_POLL_SECONDS)


_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for tracker in list(_trackers):
        tracker._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
