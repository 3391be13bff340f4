"""``@restart_when``: the guard as a decorator for functions, methods and coroutines."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import wrapt

from .behavior import Behavior, RestartBehavior, check_behavior, check_callbacks
from .guard import Guard
from .rules import ExtraMemory, ExtraPercent, MaxRss, MaxSeconds, MaxTasks, Rule

F = TypeVar("F", bound=Callable[..., Any])

#: The environment variable that switches every guard off, for unit tests such as
#: ``KartonTestCase.run_task``, which call ``process`` directly.
ENABLED_VARIABLE = "MEMWATCH_ENABLED"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

_logger = logging.getLogger("memwatch")


def build_rules(
    *,
    max_tasks: object = None,
    max_seconds: object = None,
    extra_mb: object = None,
    extra_percent: object = None,
    max_rss_mb: object = None,
    names: dict[str, str] | None = None,
) -> list[Rule]:
    """Validate the limits and build a rule for each one that is set.

    :param names: parameter names to use in messages instead of memwatch's own
    :raises ValueError: when no limit is set, or a limit is out of range
    :raises TypeError: when a limit is not a number
    """
    names = names or {}
    limits: list[tuple[str, object, type[Rule]]] = [
        ("max_tasks", max_tasks, MaxTasks),
        ("max_seconds", max_seconds, MaxSeconds),
        ("extra_mb", extra_mb, ExtraMemory),
        ("extra_percent", extra_percent, ExtraPercent),
        ("max_rss_mb", max_rss_mb, MaxRss),
    ]
    rules = [
        rule_type(value, names.get(name, name))
        for name, value, rule_type in limits
        if value is not None
    ]
    if not rules:
        accepted = ", ".join(names.get(name, name) for name, _, _ in limits)
        raise ValueError(f"at least one restart rule must be set: {accepted}")
    return rules


def read_enabled(enabled: object) -> bool:
    """Resolve the ``enabled`` argument, or :data:`ENABLED_VARIABLE` when it is ``None``."""
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
        return enabled
    raw = os.environ.get(ENABLED_VARIABLE)
    if raw is None:
        return True
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{ENABLED_VARIABLE}={raw!r} is invalid: use 1, true, yes or on to enable the "
        "guard, 0, false, no or off to disable it"
    )


def restart_when(
    func: Callable[..., Any] | None = None,
    /,
    *,
    max_tasks: int | None = None,
    max_seconds: float | None = None,
    extra_mb: float | None = None,
    extra_percent: float | None = None,
    max_rss_mb: float | None = None,
    behavior: Behavior = RestartBehavior.EXIT_0,
    before_exit: Callable[[], object] | Iterable[Callable[[], object]] = (),
    logger: logging.Logger | None = None,
    enabled: bool | None = None,
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
    :param behavior: a :class:`RestartBehavior`, or a callable that receives the
        :class:`~memwatch.Decision` once and decides itself
    :param before_exit: a callable, or callables, run in order before the exit; one
        that raises is logged and the exit goes on
    :param logger: where decisions are logged when the guard is not on a karton
        service (default: the ``memwatch`` logger)
    :param enabled: ``False`` returns the function unguarded; ``None`` reads the
        ``MEMWATCH_ENABLED`` environment variable (default: enabled)
    :raises ValueError: when no rule is set or a limit is out of range
    :raises TypeError: when an argument has the wrong type
    """
    if func is not None:
        raise TypeError(
            "restart_when needs at least one rule and must be called, as in "
            f"@restart_when(max_tasks=1000), not applied bare to {func!r}"
        )
    rules = build_rules(
        max_tasks=max_tasks,
        max_seconds=max_seconds,
        extra_mb=extra_mb,
        extra_percent=extra_percent,
        max_rss_mb=max_rss_mb,
    )
    checked_behavior = check_behavior(behavior)
    callbacks = check_callbacks(before_exit)
    if logger is not None and not isinstance(logger, logging.Logger):
        raise TypeError(f"logger must be a logging.Logger or None, got {logger!r}")
    is_enabled = read_enabled(enabled)

    def decorate(wrapped: F) -> F:
        if not callable(wrapped):
            raise TypeError(f"restart_when can only guard a callable, got {wrapped!r}")
        if not is_enabled:
            _logger.debug(
                "memwatch: guard disabled for %s", getattr(wrapped, "__qualname__", wrapped)
            )
            return wrapped
        guard = Guard(rules, checked_behavior, callbacks, logger)
        if inspect.iscoroutinefunction(wrapped):
            decorated: F = _async_wrapper(guard)(wrapped)
        else:
            decorated = _sync_wrapper(guard)(wrapped)
        decorated.__memwatch_guard__ = guard  # type: ignore[attr-defined]
        return decorated

    return decorate


def guard_of(function: Callable[..., Any]) -> Guard:
    """Return the :class:`~memwatch.guard.Guard` behind a function decorated with
    :func:`restart_when`, for its counters and baseline.

    :raises TypeError: when ``function`` is not guarded (or its guard is disabled)
    """
    guard = getattr(function, "__memwatch_guard__", None)
    if not isinstance(guard, Guard):
        raise TypeError(f"{function!r} is not guarded by restart_when")
    return guard


def _sync_wrapper(guard: Guard) -> Any:
    @wrapt.decorator  # type: ignore[untyped-decorator]
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        guard.before_call(instance)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            guard.after_call(instance, raised=True)
            raise
        guard.after_call(instance, raised=False)
        return result

    return wrapper


def _async_wrapper(guard: Guard) -> Any:
    @wrapt.decorator  # type: ignore[untyped-decorator]
    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        await guard.before_call_async(instance)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException:
            guard.after_call(instance, raised=True)
            raise
        guard.after_call(instance, raised=False)
        return result

    return wrapper
