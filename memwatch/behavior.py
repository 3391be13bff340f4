"""The decision of a tripped rule, the before-exit callbacks and the exit itself."""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from .memory import to_mib
from .rules import Snapshot, Trip


class RestartBehavior(enum.Enum):
    """The action memwatch takes once a rule has tripped and the task has finished.

    ``EXIT_0`` and ``EXIT_1`` keep karton-memory-watcher's names and values.
    """

    #: Exit with status 0: systemd ``Restart=always``, docker ``always`` or ``unless-stopped``.
    EXIT_0 = 1
    #: Exit with status 1: systemd ``Restart=on-failure``, docker ``on-failure``.
    EXIT_1 = 2
    #: Only log the decision and keep running, to tune limits on a live worker.
    DRY_RUN = 3
    #: Replace the process in place with a fresh interpreter running the same
    #: command line: same PID and container, no supervisor needed.
    REEXEC = 4

    @property
    def exit_code(self) -> int | None:
        """Return the process exit status, or ``None`` for a behaviour that does not exit."""
        return _EXIT_CODES.get(self)


_EXIT_CODES = {RestartBehavior.EXIT_0: 0, RestartBehavior.EXIT_1: 1}


@dataclass(frozen=True)
class Decision:
    """The rules that tripped after one guarded call, and the state they read."""

    trips: tuple[Trip, ...]
    snapshot: Snapshot
    #: Whether the call that tripped the rule raised an exception of its own.
    task_raised: bool = False
    #: Whether the rule tripped while a karton consumer waited for tasks.
    idle: bool = False

    @property
    def rule(self) -> str:
        """Return the name of the first rule that tripped, the one that decides."""
        return self.trips[0].rule

    def describe(self) -> str:
        """Return the log line's text: every rule that tripped with the numbers behind it."""
        first, *others = self.trips
        when = "while idle after" if self.idle else "after"
        text = f"restart rule {first.rule} tripped {when} task {self.snapshot.tasks}"
        if self.task_raised:
            text += " (the task raised)"
        text += f": {first.describe()}"
        if others:
            text += "; also " + ", ".join(trip.describe() for trip in others)
        return f"{text} ({describe_state(self.snapshot)})"


def describe_state(snapshot: Snapshot) -> str:
    """Return baseline, current RSS, tasks and uptime as one phrase for log lines."""
    parts = []
    unit = "MiB" if snapshot.metric == "rss" else f"MiB {snapshot.metric.upper()}"
    if snapshot.baseline is not None:
        parts.append(f"baseline {to_mib(snapshot.baseline):.1f} {unit}")
    if snapshot.rss is not None:
        parts.append(f"current {to_mib(snapshot.rss):.1f} {unit}")
    parts.append(f"tasks {snapshot.tasks}")
    parts.append(f"uptime {snapshot.uptime:.1f} s")
    return ", ".join(parts)


#: A custom behaviour: any callable that takes the :class:`Decision`.
BehaviorCallable = Callable[[Decision], object]
Behavior = RestartBehavior | BehaviorCallable


def _accepts(function: object, arguments: int) -> bool:
    """Return whether ``function`` can be called with this many positional arguments."""
    try:
        signature = inspect.signature(function)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        # Builtins without a signature: let them through rather than reject a good one.
        return True
    try:
        signature.bind(*([None] * arguments))
    except TypeError:
        return False
    return True


def check_behavior(behavior: object, name: str = "behavior") -> Behavior:
    """Validate a behaviour argument and return it."""
    if isinstance(behavior, RestartBehavior):
        return behavior
    choices = ", ".join(f"RestartBehavior.{member.name}" for member in RestartBehavior)
    if callable(behavior) and not isinstance(behavior, type):
        if _accepts(behavior, 1):
            return behavior
        raise TypeError(
            f"{name}={behavior!r} must take one argument, the Decision; or use one of {choices}"
        )
    raise TypeError(
        f"{name} must be one of {choices} or a callable that takes the decision, got {behavior!r}"
    )


def check_callbacks(
    callbacks: object, name: str = "before_exit"
) -> tuple[Callable[[], object], ...]:
    """Validate before-exit callbacks: one callable or a sequence of callables taking no
    arguments."""
    if callable(callbacks) and not isinstance(callbacks, type):
        checked: tuple[object, ...] = (callbacks,)
        label = name
    elif isinstance(callbacks, (str, bytes, Mapping, type)) or not isinstance(callbacks, Iterable):
        raise TypeError(f"{name} must be a callable or a sequence of callables, got {callbacks!r}")
    else:
        checked = tuple(callbacks)
        label = f"{name}[{{index}}]"
    for index, callback in enumerate(checked):
        where = label.format(index=index)
        if not callable(callback) or isinstance(callback, type):
            raise TypeError(f"{where} must be a callable taking no arguments, got {callback!r}")
        if not _accepts(callback, 0):
            raise TypeError(
                f"{where} must be a callable taking no arguments, got {callback!r}, "
                "which needs arguments"
            )
    return checked  # type: ignore[return-value]


def callback_name(callback: object) -> str:
    """Return a readable name of a callable for log lines."""
    name = getattr(callback, "__qualname__", None) or getattr(callback, "__name__", None)
    return str(name) if name else repr(callback)


def run_before_exit(
    callbacks: Sequence[Callable[[], object]], logger: logging.Logger, timeout: float
) -> None:
    """Run the before-exit callbacks in order, for ``timeout`` seconds in all at most.

    One that raises is logged and the rest still run. They run in a daemon thread,
    so that one that hangs cannot keep the process from exiting: after ``timeout``
    the exit goes on and the log names the callback still running.
    """
    if not callbacks:
        return
    running: list[str] = []

    def run_all() -> None:
        for callback in callbacks:
            running[:] = [callback_name(callback)]
            try:
                callback()
            except BaseException:
                logger.exception(
                    "memwatch: before-exit callback %s raised; the exit goes on",
                    callback_name(callback),
                )
        running.clear()

    started = time.monotonic()
    worker = threading.Thread(target=run_all, name="memwatch-before-exit", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        logger.error(
            "memwatch: before-exit callback %s still running after %.1f s "
            "(before_exit_timeout=%g); exiting without waiting for it",
            running[0] if running else "?",
            time.monotonic() - started,
            timeout,
        )


def shield_exit_from_signals(logger: logging.Logger) -> None:
    """Let SIGTERM and SIGINT that arrive during memwatch's exit path only log.

    The process is already on its way out with the configured code; a second
    stop request must not interrupt the callbacks or run them twice. Only the
    main thread can set signal handlers, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def note(signum: int, frame: object) -> None:
        logger.info(
            "memwatch: %s received while the process is exiting; the exit goes on",
            signal.Signals(signum).name,
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, note)


def exit_process(code: int, logger: logging.Logger, grace: float = 0.0) -> NoReturn:
    """End the whole process with ``code``.

    In the main thread this raises :class:`SystemExit`, so ``finally`` blocks,
    karton's task bookkeeping and ``atexit`` handlers run. In any other thread
    ``SystemExit`` would end only that thread, so the logs are flushed and the
    process ends with :func:`os._exit`.

    :param grace: seconds the process may still run after the ``SystemExit``, for
        ``finally`` blocks and other threads. Past that, something swallowed the
        exit, so the process ends with :func:`os._exit`. 0 waits forever.
    """
    if threading.current_thread() is threading.main_thread():
        if grace > 0:
            _start_exit_timer(code, logger, grace)
        raise SystemExit(code)
    logger.info(
        "memwatch: ending the process from thread %s with os._exit(%d)",
        threading.current_thread().name,
        code,
    )
    hard_exit(code)


def _start_exit_timer(code: int, logger: logging.Logger, grace: float) -> None:
    def expire() -> None:
        logger.warning(
            "memwatch: the process still runs %g s after exiting with code %d "
            "(something caught SystemExit or a thread keeps it alive); "
            "ending it with os._exit(%d)",
            grace,
            code,
            code,
        )
        hard_exit(code)

    timer = threading.Timer(grace, expire)
    timer.name = "memwatch-exit-timer"
    # A daemon timer dies with a process that ends normally.
    timer.daemon = True
    timer.start()


def flush_logs() -> None:
    """Flush every logging handler and the standard streams, keeping them open."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            with contextlib.suppress(Exception):
                handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()


def hard_exit(code: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process at once with ``code``."""
    flush_logs()
    logging.shutdown()
    os._exit(code)
