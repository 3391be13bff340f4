"""Restart rules: pure checks of one :class:`Snapshot`, and the validation of their limits.

A rule returns a :class:`Trip` that carries its numbers when its limit is reached,
or ``None``. Rules never read memory or clocks themselves: the tracker takes the
snapshot once per task and every rule reads it. The one exception is
:class:`ContainerLimit`, which reads the container's memory cgroup in its check,
because the snapshot carries only the process's own RSS.
"""

from __future__ import annotations

import decimal
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

from .cgroup import default_container_memory
from .memory import MIB, to_mib
from .validate import check_number

_logger = logging.getLogger("memwatch")


@dataclass(frozen=True)
class Snapshot:
    """The state of the guarded process right after one guarded call."""

    #: Guarded calls completed in this process, returned or raised.
    tasks: int
    #: Seconds since the first guarded call, on the monotonic clock.
    uptime: float
    #: Resident set size in bytes, or ``None`` when no memory rule needs it or it could not be read.
    rss: int | None
    #: RSS in bytes just before the first guarded call, or ``None`` when not taken.
    baseline: int | None
    #: Guarded calls still running in other threads or coroutines.
    in_flight: int = 0
    #: What ``rss`` and ``baseline`` measure: ``rss``, or ``uss`` or ``pss`` once re-read.
    metric: str = "rss"


@dataclass(frozen=True)
class Trip:
    """A rule whose limit was reached, with the numbers behind it in the rule's unit."""

    #: The parameter that set the rule, such as ``extra_mb`` or ``proceed_tasks``.
    rule: str
    current: float
    limit: float
    unit: str
    #: Whether the rule compares memory, so that reclaiming memory may untrip it.
    memory: bool = False
    #: Readings behind ``current``, such as the bytes it was computed from, for the log line.
    detail: str = ""

    def describe(self) -> str:
        """Return ``rule current >= limit unit`` and the detail for the log line."""
        text = f"{self.rule} {_number(self.current)} >= {_number(self.limit)} {self.unit}"
        return f"{text}, {self.detail}" if self.detail else text


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"


def check_limit(name: str, value: object, *, integer: bool = False) -> float:
    """Validate a rule's limit and return it.

    :param name: the parameter name, used in the error message
    :param value: what the user passed
    :param integer: whether only whole numbers are accepted
    :raises TypeError: for a bool, a string or anything that is not a real number
    :raises ValueError: for zero, a negative number, NaN, infinity or a fraction where
        a whole number is expected
    """
    kind = "a positive integer" if integer else "a positive finite number"
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {kind} that fits a float, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be {kind} (greater than 0), got {value!r}")
    if integer and not number.is_integer():
        raise ValueError(f"{name} must be {kind} (a whole number of tasks), got {value!r}")
    return number


class Rule:
    """Base of the restart rules."""

    #: Whether the rule needs the RSS, so that count and time rules alone skip reading memory.
    needs_memory: ClassVar[bool] = False
    unit: ClassVar[str] = ""

    def __init__(self, limit: object, name: str, *, integer: bool = False) -> None:
        self.limit = check_limit(name, limit, integer=integer)
        self.name = name

    def check(self, snapshot: Snapshot) -> Trip | None:  # pragma: no cover - abstract
        """Return a :class:`Trip` when the limit is reached, else ``None``."""
        raise NotImplementedError

    def describe(self) -> str:
        """Return ``name=limit unit`` for the start-up log line."""
        return f"{self.name}={_number(self.limit)} {self.unit}".rstrip()

    def _trip(self, current: float) -> Trip:
        return Trip(self.name, current, self.limit, self.unit, self.needs_memory)

    def scaled(self, factor: float) -> Rule:
        """Return the same rule with its limit times ``factor`` (0 < factor <= 1), for jitter."""
        return type(self)(self.limit * factor, self.name)


class MaxTasks(Rule):
    """Trips when this many guarded calls have completed."""

    unit = "tasks"

    def __init__(self, limit: object, name: str = "max_tasks") -> None:
        super().__init__(limit, name, integer=True)

    def scaled(self, factor: float) -> Rule:
        # Rounded up, so that a drawn count is never below limit x factor, and
        # never above the configured limit, a whole number.
        return MaxTasks(min(int(self.limit), max(1, math.ceil(self.limit * factor))), self.name)

    def check(self, snapshot: Snapshot) -> Trip | None:
        if snapshot.tasks >= self.limit:
            return self._trip(snapshot.tasks)
        return None


class MaxSeconds(Rule):
    """Trips when this many seconds have passed since the first guarded call."""

    unit = "s"

    def __init__(self, limit: object, name: str = "max_seconds") -> None:
        super().__init__(limit, name)

    def check(self, snapshot: Snapshot) -> Trip | None:
        if snapshot.uptime >= self.limit:
            return self._trip(snapshot.uptime)
        return None


class ExtraMemory(Rule):
    """Trips when the RSS has grown by this many MiB over the baseline."""

    needs_memory = True
    unit = "MiB"

    def __init__(self, limit: object, name: str = "extra_mb") -> None:
        super().__init__(limit, name)
        self._limit_bytes = self.limit * MIB

    def check(self, snapshot: Snapshot) -> Trip | None:
        if snapshot.rss is None or snapshot.baseline is None:
            return None
        growth = snapshot.rss - snapshot.baseline
        if growth >= self._limit_bytes:
            return self._trip(to_mib(growth))
        return None


class ExtraPercent(Rule):
    """Trips when the RSS has grown by this percentage of the baseline (100 means doubled)."""

    needs_memory = True
    unit = "%"

    def __init__(self, limit: object, name: str = "extra_percent") -> None:
        super().__init__(limit, name)
        self._factor = 1 + self.limit / 100

    def check(self, snapshot: Snapshot) -> Trip | None:
        if snapshot.rss is None or not snapshot.baseline:
            return None
        if snapshot.rss >= snapshot.baseline * self._factor:
            return self._trip((snapshot.rss / snapshot.baseline - 1) * 100)
        return None


class MaxRss(Rule):
    """Trips when the RSS reaches this many MiB, whatever the baseline."""

    needs_memory = True
    unit = "MiB"

    def __init__(self, limit: object, name: str = "max_rss_mb") -> None:
        super().__init__(limit, name)
        self._limit_bytes = self.limit * MIB

    def check(self, snapshot: Snapshot) -> Trip | None:
        if snapshot.rss is not None and snapshot.rss >= self._limit_bytes:
            return self._trip(to_mib(snapshot.rss))
        return None


class ContainerMemoryReader(Protocol):
    """Reader of the container's memory, as :class:`~memwatch.cgroup.ContainerMemory` is."""

    @property
    def source(self) -> str:
        """Where the last limit came from."""

    @property
    def failure(self) -> str | None:
        """Why the last read failed, or ``None``."""

    def limit(self) -> int | None:
        """Return the memory limit in bytes, the physical memory when no cgroup sets one."""

    def working_set(self) -> int | None:
        """Return the cgroup's usage minus its inactive page cache, in bytes."""


#: The :attr:`ContainerMemoryReader.source` of a limit that no cgroup sets.
PHYSICAL_MEMORY_SOURCE = "physical memory"


class ContainerLimit(Rule):
    """Trips when the container's working set reaches this percentage of its memory limit.

    The working set is the memory cgroup's usage minus its inactive page cache, which
    the kernel reclaims before its OOM killer ends a process. Where no cgroup sets a
    limit below the physical memory, the rule compares with the physical memory.
    Unlike the other rules, it reads the cgroup itself, through ``memory`` or else
    the process-wide :func:`memwatch.cgroup.default_container_memory`.
    """

    needs_memory = True
    unit = "% of limit"

    def __init__(
        self,
        limit: object,
        name: str = "limit_percent",
        *,
        memory: ContainerMemoryReader | None = None,
    ) -> None:
        check_number(name, limit, low=0, low_inclusive=False, high=100)
        super().__init__(limit, name)
        self._memory = memory
        self._failure_logged = False
        self._source_logged = False

    def scaled(self, factor: float) -> Rule:
        return ContainerLimit(self.limit * factor, self.name, memory=self._memory)

    def check(self, snapshot: Snapshot) -> Trip | None:
        return self._compare(growth=0)

    def check_at_start(self, snapshot: Snapshot) -> Trip | None:
        """Check the working set less this process's growth since its baseline.

        A trip means that a new process would trip the rule right away, as when
        other processes of the container hold most of its memory.

        NOTE: the RSS growth only estimates the working set's growth, because the RSS
        also counts file pages that the working set leaves out while they are inactive.
        """
        growth = 0
        if snapshot.rss is not None and snapshot.baseline is not None:
            growth = max(snapshot.rss - snapshot.baseline, 0)
        return self._compare(growth)

    def _compare(self, growth: int) -> Trip | None:
        if self._memory is None:
            self._memory = default_container_memory()
        memory = self._memory
        # Each read sets memory.failure, so each is checked before the next read.
        working_set = memory.working_set()
        if working_set is None:
            self._log_failure(memory.failure)
            return None
        limit = memory.limit()
        if limit is None or limit <= 0:
            self._log_failure(memory.failure)
            return None
        source = memory.source
        self._log_source(source, limit)
        working_set -= growth
        if working_set < limit * self.limit / 100:
            return None
        return Trip(
            self.name,
            working_set / limit * 100,
            self.limit,
            self.unit,
            memory=True,
            detail=_describe_container(working_set, limit, source),
        )

    def _log_failure(self, failure: str | None) -> None:
        if self._failure_logged:
            return
        self._failure_logged = True
        _logger.warning(
            "memwatch: %s cannot read the container's memory (%s); the rule is inactive "
            "while the reads fail",
            self.name,
            failure or "no limit and no physical memory size",
        )

    def _log_source(self, source: str, limit: int) -> None:
        if self._source_logged or source != PHYSICAL_MEMORY_SOURCE:
            return
        self._source_logged = True
        _logger.info(
            "memwatch: %s compares with the physical memory, %.1f MiB, because no cgroup "
            "sets a lower memory limit",
            self.name,
            to_mib(limit),
        )


def _describe_container(working_set: int, limit: int, source: str) -> str:
    if source == PHYSICAL_MEMORY_SOURCE:
        return (
            f"working set {to_mib(working_set):.1f} MiB of the {to_mib(limit):.1f} MiB "
            "physical memory, since no cgroup sets a lower memory limit"
        )
    return (
        f"working set {to_mib(working_set):.1f} MiB of the {to_mib(limit):.1f} MiB limit "
        f"in {source}"
    )


#: The rules by their argument name, in the order they are checked and reported.
RULE_TYPES: dict[str, type[Rule]] = {
    "max_tasks": MaxTasks,
    "max_seconds": MaxSeconds,
    "extra_mb": ExtraMemory,
    "extra_percent": ExtraPercent,
    "max_rss_mb": MaxRss,
    "limit_percent": ContainerLimit,
}


def build_rules(limits: Mapping[str, object], names: Mapping[str, str] | None = None) -> list[Rule]:
    """Validate the limits and build a rule for each one that is set (not ``None``).

    :param limits: limit by argument name, as in :data:`RULE_TYPES`
    :param names: names to show instead of memwatch's own, in messages and logs
    :raises ValueError: when no limit is set, or a limit is out of range
    :raises TypeError: when a limit is not a number
    """
    names = names or {}
    rules: list[Rule] = []
    for name, rule_type in RULE_TYPES.items():
        value = limits.get(name)
        if value is not None:
            rules.append(rule_type(value, names.get(name, name)))
    if not rules:
        # karton-memory-watcher's API names only the rules it has.
        shown = [name for name in RULE_TYPES if not names or name in names]
        accepted = ", ".join(names.get(name, name) for name in shown)
        raise ValueError(f"at least one restart rule must be set: {accepted}")
    return rules
