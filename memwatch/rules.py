"""Restart rules: pure checks of one :class:`Snapshot`, and the validation of their limits.

A rule returns a :class:`Trip` that carries its numbers when its limit is reached,
or ``None``. Rules never read memory or clocks themselves: the tracker takes the
snapshot once per task and every rule reads it.
"""

from __future__ import annotations

import decimal
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from .memory import MIB, to_mib


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

    def describe(self) -> str:
        """Return ``rule current >= limit unit`` for the log line."""
        return f"{self.rule} {_number(self.current)} >= {_number(self.limit)} {self.unit}"


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
        # Rounded down, so that a drawn count is never above the configured one.
        return MaxTasks(max(1, math.floor(self.limit * factor)), self.name)

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


#: The rules by their argument name, in the order they are checked and reported.
RULE_TYPES: dict[str, type[Rule]] = {
    "max_tasks": MaxTasks,
    "max_seconds": MaxSeconds,
    "extra_mb": ExtraMemory,
    "extra_percent": ExtraPercent,
    "max_rss_mb": MaxRss,
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
