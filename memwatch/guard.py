"""The guard: checks the rules after each guarded call and carries out the decision.

The exit is never carried out in the middle of a task, and never raised over an
exception that a task is propagating:

* in a sync karton consumer, the exit waits for karton's loop to ask whether to
  shut down, which it does only after it recorded the task's final state
  (see :mod:`memwatch.karton`);
* elsewhere, the exit happens when the next guarded call starts, before its body
  runs, once no other guarded call is in flight. The caller has by then received
  the result or the exception of the call that tripped the rule and done what it
  does with it (stored it, acknowledged a message). Calls that start meanwhile in
  other threads or coroutines wait and never run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import checker, ending, karton, reexec, restart_slots
from .behavior import RestartBehavior, callback_name
from .config import Settings, describe_overrides
from .growth import Stats, rates
from .memory import to_mib
from .rules import Snapshot
from .tracker import Tracker

_logger = logging.getLogger("memwatch")

#: How often a held coroutine looks whether the calls in flight have finished, in seconds.
_ASYNC_POLL_SECONDS = 0.01


class Guard:
    """Rules, behaviour and per-process state of one guarded function."""

    def __init__(
        self,
        settings: Settings,
        before_exit: Sequence[Callable[[], object]] = (),
        logger: logging.Logger | None = None,
        name: str = "",
    ) -> None:
        self.before_exit = tuple(before_exit)
        self.tracker = Tracker()
        self.name = name
        self._logger = logger
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Apply new settings; they are validated first, so a bad one changes nothing.

        :raises ValueError: when no rule is left or a limit is out of range
        """
        rules = tuple(settings.rules())
        self.settings = settings
        self.rules = rules
        self.behavior = settings.behavior
        self.enabled = settings.enabled
        self.read_memory = any(rule.needs_memory for rule in rules)
        self.tracker.baseline_at_start = not settings.warmup
        self.tracker.metric = settings.metric
        # Limits drawn and thresholds set for the old settings no longer apply.
        self.tracker.rules = None
        self.tracker.fast = False

    @property
    def fallback_logger(self) -> logging.Logger:
        """Return the ``logger`` argument, else the ``memwatch`` logger."""
        return self._logger or _logger

    def logger_for(self, instance: object) -> logging.Logger:
        """Return the karton service's logger, else the ``logger`` argument, else ``memwatch``."""
        service_logger = karton.service_logger(instance)
        if service_logger is not None:
            return service_logger
        return self._logger or _logger

    def describe(self) -> str:
        """Return the rules and behaviour for the start-up log line."""
        rules = ", ".join(rule.describe() for rule in self.rules)
        return f"rules {rules}; behavior {self._action_name()}"

    def _action_name(self) -> str:
        if isinstance(self.behavior, RestartBehavior):
            return self.behavior.name
        return callback_name(self.behavior)

    def log_start(self, instance: object, where: str = "") -> None:
        """Log the effective rules once per process."""
        tracker = self.tracker
        if tracker.start_logged:
            return
        tracker.start_logged = True
        subject = f"{self.name or 'a function'}{where}"
        text = f"memwatch: guarding {subject}: {self.describe()}"
        if not self.enabled:
            text = f"memwatch: the guard of {subject} is disabled by enabled=false"
        elif self.settings.overrides:
            text += f" (from configuration: {describe_overrides(self.settings.overrides)})"
        previous = reexec.previous_decision()
        if previous is not None:
            text += f"; generation {reexec.generation()}, re-executed after: {previous}"
        self.logger_for(instance).info("%s", text)
        if self.enabled:
            restart_slots.log_start(self, subject, self.logger_for(instance))

    # The call cycle.

    def call(
        self,
        wrapped: Callable[..., Any],
        instance: object,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one guarded call the full way: the first call, a pending exit, nested calls."""
        marker = threading.get_ident()
        if marker in self.tracker.flight:
            # Only the outermost call is a task: a guarded function that calls itself
            # runs its inner calls unguarded, so that they neither count nor wait
            # for the outer call to finish.
            return wrapped(*args, **kwargs)
        self.before_call(instance, marker)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            self.after_call(instance, True, marker)
            raise
        self.after_call(instance, False, marker)
        return result

    def before_call(self, instance: object, marker: object) -> None:
        """Hold or end the process if an exit is pending, then record the call's start."""
        if not self.enabled:
            return
        tracker = self.tracker
        if not tracker.started:
            self._first_call(instance)
        if tracker.decision is not None and not karton.install_gate(instance, self):
            ending.hold(self, instance)
        tracker.enter(self.read_memory, marker)

    async def before_call_async(self, instance: object, marker: object) -> None:
        """Do what :meth:`before_call` does without blocking the event loop."""
        if not self.enabled:
            return
        tracker = self.tracker
        if not tracker.started:
            self._first_call(instance)
        if tracker.decision is not None and not karton.install_gate(instance, self):
            while tracker.in_flight > 0 and not tracker.released.is_set():
                await asyncio.sleep(_ASYNC_POLL_SECONDS)
            ending.end_or_wait(self, instance, blocking=False)
            while not tracker.released.is_set():
                await asyncio.sleep(_ASYNC_POLL_SECONDS)
            ending.after_release(self)
        tracker.enter(self.read_memory, marker)

    def _first_call(self, instance: object) -> None:
        # A karton service not prepared at class creation (a guard applied after
        # the class was built) gets its gate on its first task.
        try:
            karton.install_gate(instance, self)
            self.log_start(instance)
        except Exception:
            self.logger_for(instance).exception("memwatch: preparing the guard failed")

    def after_call(self, instance: object, raised: bool, marker: object) -> None:
        """Record the call's end and check the rules.

        An ``Exception`` inside memwatch is logged, not raised, so the task never fails
        because of the guard.
        """
        if not self.enabled:
            return
        try:
            tracker = self.tracker
            tasks = tracker.leave(marker)
            if tracker.fast and not self.may_trip(tasks):
                return
            snapshot = tracker.snapshot(self.read_memory, tasks=tasks, in_flight=tracker.in_flight)
            self._check(snapshot, instance, raised)
        except Exception:
            # A fault in memwatch must not fail the task: log it and keep running.
            self.logger_for(instance).exception("memwatch: checking the rules failed")

    def may_trip(self, tasks: int) -> bool:
        """Return whether a rule may trip now, from the thresholds of the last full check."""
        tracker = self.tracker
        if tasks >= tracker.next_tasks:
            return True
        if tracker.timed and time.monotonic() >= tracker.deadline:
            return True
        if tracker.watch_memory:
            rss = tracker.reader.read()
            return rss is None or rss >= tracker.rss_limit
        return False

    def check_after_fast_call(self, instance: object, tasks: int, raised: bool = False) -> None:
        """Check the rules after a call the hot path ran and counted; an ``Exception`` is logged."""
        try:
            if raised and not self.may_trip(tasks):
                return
            tracker = self.tracker
            snapshot = tracker.snapshot(self.read_memory, tasks=tasks, in_flight=tracker.in_flight)
            self._check(snapshot, instance, raised=raised)
        except Exception:
            self.logger_for(instance).exception("memwatch: checking the rules failed")

    def record(self, instance: object, raised: bool) -> None:
        """Count one call without in-flight bookkeeping, for karton-memory-watcher's hooks.

        Unless the exit is left to a karton loop or the call raised, a tripped rule
        ends the process right here, as karton-memory-watcher's post-hook did.
        """
        if not self.enabled:
            return
        try:
            snapshot = self.tracker.record(self.read_memory)
            self._check(snapshot, instance, raised, immediate=not raised)
        except Exception:
            self.logger_for(instance).exception("memwatch: checking the rules failed")
            return
        if self.tracker.decision is None or raised or karton.install_gate(instance, self):
            return
        ending.end_or_wait(self, instance, blocking=True)

    def hold_if_pending(self, instance: object) -> None:
        """Carry out a pending exit before a call starts, for karton-memory-watcher's pre-hook."""
        if self.tracker.decision is not None and not karton.install_gate(instance, self):
            ending.hold(self, instance)

    # Checking.

    def check_idle(self, instance: object) -> None:
        """Check the rules while a karton consumer waits for tasks and none is in flight.

        The check runs at most every ``idle_check_seconds``, and only once no task
        has completed for that long, so a busy consumer pays nothing extra.
        """
        tracker = self.tracker
        if not self.enabled or tracker.decision is not None:
            return
        now = time.monotonic()
        if tracker.idle_since is None or tracker.tasks != tracker.idle_tasks:
            tracker.idle_tasks = tracker.tasks
            tracker.idle_since = now
            return
        if now - tracker.idle_since < self.settings.idle_check_seconds:
            return
        tracker.idle_since = now
        try:
            self._check(tracker.snapshot(self.read_memory), instance, raised=False, idle=True)
        except Exception:
            self.logger_for(instance).exception("memwatch: checking the rules while idle failed")

    def _check(
        self,
        snapshot: Snapshot,
        instance: object,
        raised: bool,
        idle: bool = False,
        immediate: bool = False,
    ) -> None:
        logger = self.logger_for(instance)
        tracker = self.tracker
        if self.read_memory and snapshot.rss is None and not tracker.memory_failure_logged:
            tracker.memory_failure_logged = True
            logger.warning(
                "memwatch: cannot read this process's memory (%s); the memory rules are "
                "inactive, the count and time rules still apply",
                tracker.reader.failure,
            )
        if not idle and logger.isEnabledFor(logging.DEBUG):
            logger.debug("memwatch: %s", _describe_task(snapshot))
        if tracker.decision is not None:
            return
        decision = checker.decide(self, snapshot, raised, idle, logger)
        if decision is None or not tracker.set_decision(decision):
            checker.set_thresholds(self, snapshot, logger)
            return
        tracker.fast = False
        gated = karton.install_gate(instance, self)
        if karton.shutting_down(instance):
            plan = "karton is already shutting down on a signal, and its own exit goes on"
        else:
            plan = self._plan(instance, gated, immediate)
        logger.info("memwatch: %s; %s", decision.describe(), plan)

    def stats(self) -> Stats:
        """Return this guard's figures in this process."""
        tracker = self.tracker
        # The hot path reads the RSS without keeping it, so read it afresh; with
        # metric=uss or pss, the figures are the last USS or PSS read.
        rss: int | None
        baseline: int | None
        if self.settings.metric != "rss" and tracker.metric_baseline is not None:
            rss, baseline = tracker.last_metric, tracker.metric_baseline
        else:
            rss = tracker.reader.read() if self.read_memory else tracker.last_rss
            baseline = tracker.baseline
        snapshot = tracker.snapshot(False)
        hours = (snapshot.uptime - tracker.baseline_uptime) / 3600
        per_task, per_hour = rates(rss, baseline, tracker.tasks - tracker.baseline_tasks, hours)
        decision = tracker.decision
        return Stats(
            tasks=tracker.tasks,
            uptime=snapshot.uptime,
            rss=rss,
            baseline=baseline,
            growth=None if rss is None or baseline is None else rss - baseline,
            growth_per_task=per_task,
            growth_per_hour=per_hour,
            decision=None if decision is None else decision.describe(),
            reclaim_seconds=tracker.reclaimer.seconds,
            reclaimed=tracker.reclaimer.reclaimed,
            deferrals=tracker.deferrals,
        )

    def _plan(self, instance: object, gated: bool, immediate: bool) -> str:
        if self.behavior is RestartBehavior.REEXEC:
            action = "re-executing in place"
        elif isinstance(self.behavior, RestartBehavior):
            action = f"exiting with code {self.behavior.exit_code}"
        else:
            action = f"calling {callback_name(self.behavior)}"
        if gated and karton.is_async_consumer(instance):
            return f"{action} once karton has recorded the state of every task in flight"
        if gated:
            return f"{action} once karton has recorded the task's state"
        if immediate:
            return f"{action} now"
        return f"{action} when the next guarded call starts"

    # Ending.

    def end_from_gate(self, instance: object) -> None:
        """Carry out the pending decision from a karton consumer's loop, between tasks."""
        ending.end_or_wait(self, instance, blocking=True)


def _describe_task(snapshot: Snapshot) -> str:
    text = f"task {snapshot.tasks} done after {snapshot.uptime:.1f} s"
    if snapshot.rss is not None:
        text += f", rss {to_mib(snapshot.rss):.1f} MiB"
    if snapshot.baseline is not None:
        text += f", baseline {to_mib(snapshot.baseline):.1f} MiB"
    return text
