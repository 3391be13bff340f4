"""karton-memory-watcher 1.0.2's API on top of memwatch's guard.

Code written for that package works after changing its import line to
``memwatch``. Four things are done right instead of as before:

* memory is compared in bytes, where the original truncated it to whole MB;
* time is measured on the monotonic clock, not the wall clock;
* decisions are logged, not printed;
* a ``call_before_exit`` callback that raises no longer keeps the process from
  exiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from . import config
from .behavior import RestartBehavior, check_callbacks, run_before_exit
from .config import Settings
from .guard import Guard
from .karton import start_service
from .memory import MIB, default_reader

#: karton-memory-watcher's parameter names for memwatch's rules, used in error messages.
_ORIGINAL_NAMES = {
    "max_tasks": "proceed_tasks",
    "max_seconds": "elapsed_time",
    "extra_percent": "extra_consumed_memory_percent",
    "extra_mb": "extra_consumed_megabytes",
}


class MemoryWatcherExitException(Exception):
    """Kept for imports of karton-memory-watcher's API; memwatch never raises it."""


class RestartRule:
    """The rules of karton-memory-watcher: at least one limit must be set.

    :param call_before_exit: callables run in order before the exit
    :param proceed_tasks: restart after this many tasks
    :param elapsed_time: restart once this many seconds have passed since the first task
    :param extra_consumed_memory_percent: restart once the RSS has grown this many
        percent over the RSS before the first task (100 means doubled)
    :param extra_consumed_megabytes: restart once the RSS has grown this many MiB
    :param restart_behavior: a :class:`RestartBehavior`
    """

    def __init__(
        self,
        call_before_exit: Iterable[Callable[[], object]] = (),
        proceed_tasks: int | None = None,
        elapsed_time: float | None = None,
        extra_consumed_memory_percent: float | None = None,
        extra_consumed_megabytes: float | None = None,
        restart_behavior: RestartBehavior = RestartBehavior.EXIT_0,
    ) -> None:
        if not isinstance(restart_behavior, RestartBehavior):
            choices = ", ".join(f"RestartBehavior.{m.name}" for m in RestartBehavior)
            raise TypeError(f"restart_behavior must be one of {choices}, got {restart_behavior!r}")
        settings = Settings(
            limits={
                "max_tasks": proceed_tasks,
                "max_seconds": elapsed_time,
                "extra_percent": extra_consumed_memory_percent,
                "extra_mb": extra_consumed_megabytes,
            },
            behavior=restart_behavior,
            names=_ORIGINAL_NAMES,
        )
        settings.rules()
        # MEMWATCH_* variables apply here as to @restart_when, MEMWATCH_ENABLED included.
        settings = settings.merged(config.from_environment(os.environ))
        settings.rules()
        self.call_before_exit = check_callbacks(call_before_exit, "call_before_exit")
        self.rule_proceed_tasks = proceed_tasks
        self.rule_elapsed_time = elapsed_time
        self.rule_extra_consumed_memory_percent = extra_consumed_memory_percent
        self.rule_extra_consumed_megabytes = extra_consumed_megabytes
        self.restart_behavior = restart_behavior
        self._guard = Guard(settings, self.call_before_exit, name="RestartRule")
        self._consumer: object | None = None
        self.prehooked = False

    # karton-memory-watcher exposed its counters as attributes; they stay readable.

    @property
    def tasks_counter(self) -> int | None:
        """Return the tasks counted so far, or ``None`` before the first pre-hook."""
        return self._guard.tracker.tasks if self.prehooked else None

    @property
    def start_time(self) -> float | None:
        """Return the wall-clock time of the first pre-hook, as ``time.time()`` gives it."""
        return self._guard.tracker.started_wall

    @property
    def start_memory_usage(self) -> int | None:
        """Return the baseline RSS in whole MiB, as karton-memory-watcher reported it."""
        baseline = self._guard.tracker.baseline
        return None if baseline is None else baseline // MIB

    @staticmethod
    def get_process_memory_usage() -> int:
        """Return this process's RSS in whole MiB (memwatch's rules compare bytes)."""
        rss = default_reader().read()
        return 0 if rss is None else rss // MIB

    def attach(self, consumer: object) -> None:
        """Bind the rule to a karton consumer, so that its loop carries out the exit.

        :raises ValueError: when the consumer's ``[memwatch]`` config is invalid
        """
        self._consumer = consumer
        start_service(consumer, self._guard)

    def pre_hook_behavior(self, *args: Any, **kwargs: Any) -> None:
        """Take the baseline and the start time before the first task."""
        if not self._guard.enabled:
            return
        self._guard.hold_if_pending(self._consumer)
        self._guard.tracker.start(self._guard.read_memory)
        self.prehooked = True

    def post_hook_behavior(self, *args: Any, **kwargs: Any) -> None:
        """Count a finished task and restart if a rule tripped.

        As a karton post-hook it receives ``(task, exception)``; called by hand
        in a producer it takes no arguments and exits right away when a rule trips.
        """
        if not self.prehooked:
            self.pre_hook_behavior()
        exception = args[1] if len(args) > 1 else kwargs.get("exception")
        self._guard.record(self._consumer, raised=exception is not None)

    def execute_restart_behavior(self, reason: str) -> None:
        """Log ``reason``, run the before-exit callbacks and exit, as the original did."""
        logger = self._guard.logger_for(self._consumer)
        logger.info("memwatch: restarting: %s", reason)
        run_before_exit(self.call_before_exit, logger, self._guard.settings.before_exit_timeout)
        code = self.restart_behavior.exit_code
        if code is not None:
            raise SystemExit(code)

    def __repr__(self) -> str:
        return f"RestartRule({self._guard.describe()})"
