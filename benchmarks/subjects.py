"""The functions whose calls the micro-benchmarks time.

Every subject wraps or guards a no-op, so that the time per call is the cost of
the wrapping alone. memwatch's limits are set so high that no rule ever trips.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wrapt

from memwatch import RestartRule, restart_when
from memwatch.memory import default_reader

#: A limit that no benchmark reaches: 1e9 MiB, 1e9 seconds (about 31 years), 1e9 %.
NEVER = 1e9
#: A task count that no benchmark reaches.
NEVER_TASKS = 10**12

_STATM_PATH = "/proc/self/statm"


@dataclass(frozen=True)
class Subject:
    """A function to call many times, with its row label."""

    key: str
    label: str
    #: Takes no arguments; for an async subject it returns the awaitable to await.
    function: Callable[[], Any]
    is_async: bool = False
    #: The bare call whose time is subtracted to get the overhead; ``None`` for the bare calls.
    baseline: str | None = "bare"


def noop() -> None:
    """Do nothing: the task that every subject wraps."""


async def async_noop() -> None:
    """Do nothing, as a coroutine function."""


def _passthrough(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return wrapped(*args, **kwargs)


async def _async_passthrough(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return await wrapped(*args, **kwargs)


def _method_noop(self: object) -> None:
    """Do nothing, as a method."""


class Service:
    """A class whose methods stand for karton's ``Consumer.process``."""

    plain = _method_noop
    with_wrapt = wrapt.decorator(_passthrough)(_method_noop)
    with_memwatch = restart_when(extra_mb=NEVER)(_method_noop)


def _method_call(name: str) -> Callable[[], None]:
    # karton looks ``process`` up on the service for every task, so each call binds
    # the method again. methodcaller does the same without a Python frame of its own.
    call: Callable[[], None] = functools.partial(operator.methodcaller(name), Service())
    return call


class StatmReader:
    """The cheapest RSS read on Linux: one ``pread`` of a held ``/proc/self/statm`` descriptor."""

    def __init__(self) -> None:
        self._fd = os.open(_STATM_PATH, os.O_RDONLY | os.O_CLOEXEC)
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def read(self) -> int:
        """Return the RSS in bytes (the second field of statm is resident pages)."""
        return int(os.pread(self._fd, 128, 0).split(None, 2)[1]) * self._page_size

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self._fd)


def _wrapt_with_statm(statm: StatmReader) -> Callable[[], None]:
    read = statm.read

    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = wrapped(*args, **kwargs)
        read()
        return result

    decorated: Callable[[], None] = wrapt.decorator(wrapper)(noop)
    return decorated


def _hook_pair(rule: Any) -> Callable[[], None]:
    """Return a call of a rule's pre-hook, the no-op task and its post-hook, as karton makes them.

    karton-core 5 calls pre-hooks with the task and post-hooks with the task and
    the exception (``None`` when the task returned).
    """
    pre_hook = rule.pre_hook_behavior
    post_hook = rule.post_hook_behavior

    def pair() -> None:
        pre_hook(None)
        noop()
        post_hook(None, None)

    return pair


def karton_memory_watcher_rule() -> tuple[Any, str] | None:
    """Return a karton-memory-watcher ``RestartRule`` that never trips and the package version.

    The package is imported at run time because it is installed only in the
    bench session, and it has no type information.

    :return: ``None`` when karton-memory-watcher is not installed
    """
    try:
        module = importlib.import_module("karton.memory_watcher")
        version = importlib.metadata.version("karton-memory-watcher")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None
    # It compares whole MB with this integer, so 10**9 MB never trips.
    return module.RestartRule(extra_consumed_megabytes=10**9), version


def build_subjects() -> dict[str, Subject]:
    """Build every subject, by key; karton-memory-watcher's only when it is installed."""
    statm = StatmReader()
    subjects = [
        Subject("bare", "bare call", noop, baseline=None),
        Subject("wrapt", "no-op wrapt wrapper", wrapt.decorator(_passthrough)(noop)),
        Subject("statm", "statm pread, parsed", statm.read),
        Subject("wrapt+statm", "no-op wrapt wrapper + statm pread", _wrapt_with_statm(statm)),
        Subject("reader", "memwatch RssReader.read()", default_reader().read),
        Subject("memory", "memwatch extra_mb", restart_when(extra_mb=NEVER)(noop)),
        Subject(
            "count-time",
            "memwatch max_tasks + max_seconds",
            restart_when(max_tasks=NEVER_TASKS, max_seconds=NEVER)(noop),
        ),
        Subject(
            "all",
            "memwatch, all five rules",
            restart_when(
                max_tasks=NEVER_TASKS,
                max_seconds=NEVER,
                extra_mb=NEVER,
                extra_percent=NEVER,
                max_rss_mb=NEVER,
            )(noop),
        ),
        Subject(
            "memwatch-hooks",
            "memwatch RestartRule hook pair",
            _hook_pair(RestartRule(extra_consumed_megabytes=NEVER)),
        ),
        Subject("method-bare", "method: bare call", _method_call("plain"), baseline=None),
        Subject(
            "method-wrapt",
            "method: no-op wrapt wrapper",
            _method_call("with_wrapt"),
            baseline="method-bare",
        ),
        Subject(
            "method-memory",
            "method: memwatch extra_mb",
            _method_call("with_memwatch"),
            baseline="method-bare",
        ),
        Subject("async-bare", "async: bare await", async_noop, is_async=True, baseline=None),
        Subject(
            "async-wrapt",
            "async: no-op wrapt wrapper",
            wrapt.decorator(_async_passthrough)(async_noop),
            is_async=True,
            baseline="async-bare",
        ),
        Subject(
            "async-memory",
            "async: memwatch extra_mb",
            restart_when(extra_mb=NEVER)(async_noop),
            is_async=True,
            baseline="async-bare",
        ),
    ]
    found = karton_memory_watcher_rule()
    if found is not None:
        rule, version = found
        label = f"karton-memory-watcher {version} hook pair"
        subjects.append(Subject("kmw-hooks", label, _hook_pair(rule)))
    return {subject.key: subject for subject in subjects}
