"""``@restart_when``: the guard as a decorator for functions, methods and coroutines."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, TypeVar

import wrapt

from . import config, karton
from .behavior import Behavior, RestartBehavior, check_behavior, check_callbacks
from .config import (
    DEFAULT_BEFORE_EXIT_TIMEOUT,
    DEFAULT_EXIT_TIMEOUT,
    DEFAULT_IDLE_CHECK_SECONDS,
    DEFAULT_MIN_LIFETIME_SECONDS,
    DEFAULT_RESTART_LEASE_SECONDS,
    Settings,
)
from .growth import Stats
from .guard import Guard

F = TypeVar("F", bound=Callable[..., Any])

#: The environment variable that switches every guard off, for unit tests such as
#: ``KartonTestCase.run_task``, which call ``process`` directly.
ENABLED_VARIABLE = "MEMWATCH_ENABLED"

_logger = logging.getLogger("memwatch")


def restart_when(
    func: Callable[..., Any] | None = None,
    /,
    *,
    max_tasks: int | None = None,
    max_seconds: float | None = None,
    extra_mb: float | None = None,
    extra_percent: float | None = None,
    max_rss_mb: float | None = None,
    limit_percent: float | None = None,
    behavior: Behavior = RestartBehavior.EXIT_0,
    before_exit: Callable[[], object] | Iterable[Callable[[], object]] = (),
    logger: logging.Logger | None = None,
    enabled: bool | None = None,
    warmup: int = 0,
    jitter: float = 0.0,
    reclaim: bool = True,
    min_lifetime_seconds: float = DEFAULT_MIN_LIFETIME_SECONDS,
    report_every: int | None = None,
    idle_check_seconds: float = DEFAULT_IDLE_CHECK_SECONDS,
    before_exit_timeout: float = DEFAULT_BEFORE_EXIT_TIMEOUT,
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
    metric: str = "rss",
    max_concurrent_restarts: int | None = None,
    restart_lease_seconds: float = DEFAULT_RESTART_LEASE_SECONDS,
) -> Callable[[F], F]:
    """Restart the process, right after a guarded call, once a rule trips.

    The rules are checked after every call, whether it returned or raised; the
    call's result or exception passes through unchanged. Memory limits are in MiB
    and compare the resident set size (RSS) with the baseline taken just before
    the first guarded call in this process.

    :param max_tasks: restart after this many calls (a positive integer)
    :param max_seconds: restart once this many seconds have passed since the first call
    :param extra_mb: restart once the RSS has grown this many MiB over the baseline
    :param extra_percent: restart once the RSS has grown this many percent over the
        baseline (100 means doubled)
    :param max_rss_mb: restart once the RSS reaches this many MiB
    :param limit_percent: restart once the container's working set (its memory
        cgroup's usage minus inactive page cache) reaches this many percent of the
        cgroup's memory limit, or of the physical memory where no cgroup sets one
        (0 < limit_percent <= 100)
    :param behavior: a :class:`RestartBehavior`, or a callable that receives the
        :class:`~memwatch.Decision` once and decides itself
    :param before_exit: a callable, or callables, run in order before the exit; one
        that raises is logged and the exit goes on
    :param logger: where decisions are logged when the guard is not on a karton
        service (default: the ``memwatch`` logger)
    :param enabled: ``False`` returns the function unguarded; ``None`` reads the
        ``MEMWATCH_ENABLED`` environment variable (default: enabled)
    :param warmup: take the baseline after this many calls instead of before the
        first; memory rules wait for it (default 0)
    :param jitter: each process lowers its limits by a random share in
        ``[0, jitter)``, so that replicas started together do not restart together
    :param reclaim: when a memory rule trips, run ``gc.collect()`` and glibc's
        ``malloc_trim(0)`` first and restart only if still over (default ``True``)
    :param min_lifetime_seconds: when a ceiling is below the footprint at start, the
        process still lives this long, so that it does not restart in a loop (default 60)
    :param report_every: log the growth summary every this many calls (default off)
    :param idle_check_seconds: how often an idle karton consumer checks the rules
        (default 5)
    :param before_exit_timeout: seconds the before-exit callbacks may take in all
        (default 5)
    :param metric: the memory figure the memory rules compare: ``"rss"`` (default),
        ``"uss"`` (private memory) or ``"pss"`` (private plus a share of shared pages).
        USS and PSS are read again when the RSS has grown by the headroom of the last
        read, and on a schedule that keeps their cost near the RSS read's.
    :param exit_timeout: seconds the process may take to end after memwatch raised
        ``SystemExit``; then it is ended with ``os._exit``; 0 waits forever (default 30)
    :param max_concurrent_restarts: karton services only: at most this many replicas
        of the service's identity restart at once. A replica takes a restart slot in
        the karton Redis before it exits, and one that finds every slot taken keeps
        working and tries again after its next tasks. ``max_rss_mb`` and
        ``limit_percent`` restart without waiting (default off)
    :param restart_lease_seconds: how long a restart slot stays taken; it must cover
        the exit, the supervisor's restart and the new process's start (default 30)
    :raises ValueError: when no rule is set or a limit is out of range
    :raises TypeError: when an argument has the wrong type
    """
    if func is not None:
        raise TypeError(
            "restart_when needs at least one rule and must be called, as in "
            f"@restart_when(max_tasks=1000), not applied bare to {func!r}"
        )
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    if logger is not None and not isinstance(logger, logging.Logger):
        raise TypeError(f"logger must be a logging.Logger or None, got {logger!r}")
    limits = {
        "max_tasks": max_tasks,
        "max_seconds": max_seconds,
        "extra_mb": extra_mb,
        "extra_percent": extra_percent,
        "max_rss_mb": max_rss_mb,
        "limit_percent": limit_percent,
    }
    options: dict[str, Any] = {
        "warmup": warmup,
        "jitter": jitter,
        "reclaim": reclaim,
        "min_lifetime_seconds": min_lifetime_seconds,
        "report_every": report_every,
        "idle_check_seconds": idle_check_seconds,
        "before_exit_timeout": before_exit_timeout,
        "exit_timeout": exit_timeout,
        "metric": metric,
        "max_concurrent_restarts": max_concurrent_restarts,
        "restart_lease_seconds": restart_lease_seconds,
    }
    for name, value in options.items():
        # None means "off" only where the option can be off.
        if value is not None or name not in _NONE_MEANS_OFF:
            options[name] = _check_argument(name, value)
    arguments = Settings(
        limits=limits,
        behavior=check_behavior(behavior),
        enabled=True if enabled is None else enabled,
        **options,
    )
    # Validate the arguments on their own first, so that an error names the argument.
    arguments.rules()
    settings = arguments.merged(config.from_environment(os.environ))
    settings.rules()
    callbacks = check_callbacks(before_exit)

    def decorate(wrapped: F) -> F:
        if isinstance(wrapped, classmethod):
            raise TypeError(
                "restart_when cannot wrap a classmethod object: put @restart_when below "
                "@classmethod, next to the function"
            )
        if not callable(wrapped):
            raise TypeError(f"restart_when can only guard a callable, got {wrapped!r}")
        if inspect.isgeneratorfunction(wrapped) or inspect.isasyncgenfunction(wrapped):
            raise TypeError(
                f"restart_when cannot guard the generator function {wrapped!r}: calling it "
                "only creates the generator, and its body runs later, unguarded; guard "
                "the function that consumes it"
            )
        name = getattr(wrapped, "__qualname__", repr(wrapped))
        if not settings.enabled:
            _logger.debug("memwatch: guard of %s disabled", name)
            return wrapped
        guard = Guard(settings, callbacks, logger, name=name)
        _warn_if_blind(guard)
        if inspect.iscoroutinefunction(wrapped):
            wrapper = _async_wrapper(guard)
        else:
            wrapper = _sync_wrapper(guard)
        decorated = GuardedFunction(wrapped, wrapper)
        decorated._self_guard = guard
        # A plain function needs none of wrapt's binding on a call: __call__ then
        # calls the wrapper directly, which saves about half of wrapt's cost.
        decorated._self_plain_wrapper = (
            wrapper
            if inspect.isfunction(wrapped) and not inspect.iscoroutinefunction(wrapped)
            else None
        )
        return decorated

    return decorate


def _warn_if_blind(guard: Guard) -> None:
    # Only memory rules and no way to read memory: the guard would never trip.
    if not all(rule.needs_memory for rule in guard.rules):
        return
    reader = guard.tracker.reader
    if reader.read() is None:
        message = (
            f"memwatch cannot read this process's memory ({reader.failure}), and "
            f"{guard.name} has only memory rules: it will never restart the process; "
            "add max_tasks or max_seconds"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        _logger.warning("memwatch: %s", message)


_NONE_MEANS_OFF = frozenset({"report_every", "max_concurrent_restarts"})


def _check_argument(name: str, value: object) -> object:
    # The option parsers also read strings from config files; an argument must be
    # of its own type.
    if isinstance(value, str) and name != "metric":
        raise TypeError(f"{name} must not be a string, got {value!r}")
    return config.OPTIONS[name].parse(name, value)


def stats(function: Callable[..., Any]) -> Stats:
    """Return the figures of a function guarded by :func:`restart_when` in this process:
    tasks, uptime, RSS, baseline, growth and its rates, the decision, reclaiming.

    :raises TypeError: when ``function`` is not guarded
    """
    return guard_of(function).stats()


class GuardedFunction(wrapt.FunctionWrapper):  # type: ignore[misc]
    """A function guarded by :func:`restart_when`: it calls like the function it wraps."""

    _self_guard: Guard
    _self_plain_wrapper: Callable[..., Any] | None

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        wrapper = self._self_plain_wrapper
        if wrapper is None:
            return super().__call__(*args, **kwargs)
        return wrapper(self.__wrapped__, None, args, kwargs)

    def __set_name__(self, owner: type, name: str) -> None:
        # Defined in a class body: a karton service's loop must prepare the guard
        # (config, idle checks) before the first task arrives.
        karton.prepare_service_class(owner, self._self_guard)


def guard_of(function: Callable[..., Any]) -> Guard:
    """Return the :class:`~memwatch.guard.Guard` behind a function decorated with
    :func:`restart_when`, for its counters and baseline.

    :raises TypeError: when ``function`` is not guarded (or its guard is disabled)
    """
    guard = getattr(function, "_self_guard", None)
    if guard is None:
        # A method reached through an instance or its class is wrapt's bound
        # wrapper, whose parent is the GuardedFunction.
        guard = getattr(getattr(function, "_self_parent", None), "_self_guard", None)
    if not isinstance(guard, Guard):
        raise TypeError(f"{function!r} is not guarded by restart_when")
    return guard


def _sync_wrapper(guard: Guard) -> Callable[..., Any]:
    tracker = guard.tracker
    get_ident = threading.get_ident
    monotonic = time.monotonic
    read_rss = tracker.reader.read_or_inf

    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # The hot path: no other call in flight, and thresholds below which no rule
        # can trip (see checker.set_thresholds). Everything else, and every
        # call that reaches a threshold, takes the guard's full path. Its steps are
        # written out here because each method call costs as much as the check.
        if not tracker.fast or tracker.flight:
            return guard.call(wrapped, instance, args, kwargs)
        marker = get_ident()
        flight = tracker.flight
        flight.append(marker)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            flight.remove(marker)
            guard.check_after_fast_call(instance, tracker.count(), raised=True)
            raise
        flight.remove(marker)
        tasks = next(tracker.counter)
        tracker.tasks = tasks
        if (
            tasks >= tracker.next_tasks
            or (tracker.timed and monotonic() >= tracker.deadline)
            or (tracker.watch_memory and read_rss() >= tracker.rss_limit)
        ):
            guard.check_after_fast_call(instance, tasks)
        return result

    return wrapper


def _async_wrapper(guard: Guard) -> Callable[..., Any]:
    # Only the outermost call is a task, as in Guard.call; a coroutine's context
    # distinguishes nested calls from concurrent ones.
    depth: ContextVar[bool] = ContextVar(f"memwatch-{guard.name}", default=False)

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if depth.get():
            return await wrapped(*args, **kwargs)
        marker = object()
        await guard.before_call_async(instance, marker)
        token = depth.set(True)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException:
            depth.reset(token)
            guard.after_call(instance, True, marker)
            raise
        depth.reset(token)
        guard.after_call(instance, False, marker)
        return result

    return wrapper
