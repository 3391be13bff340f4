"""Options set without code: karton's config (``[memwatch]``, ``KARTON_MEMWATCH_*``) and
``MEMWATCH_*`` environment variables.

Values from these sources override the decorator's arguments, as karton's config
overrides a service's class attributes. They are validated like the arguments: a
bad value raises :class:`ValueError` naming where it came from, the value and the
accepted range, so a misconfigured service stops at start instead of running
unguarded.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .behavior import Behavior, RestartBehavior
from .rules import RULE_TYPES, Rule, build_rules, check_limit
from .validate import check_number

#: A value that removes a rule the decorator set, for example ``max_tasks = off``.
REMOVED = "off"
_REMOVED_WORDS = frozenset({"off", "none"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

#: karton config section and prefix of plain environment variables.
SECTION = "memwatch"
ENV_PREFIX = "MEMWATCH_"


@dataclass(frozen=True)
class Option:
    """One option that can be set without code."""

    name: str
    unit: str
    default: str
    meaning: str
    parse: Callable[[str, object], object]


def _removes_rule(name: str, value: object) -> bool:
    """Return whether a text value is ``off`` or ``none``; reject an empty one."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    if not text:
        raise ValueError(f"{name} must not be empty; use off to remove the rule")
    return text.lower() in _REMOVED_WORDS


def _number(name: str, value: object, *, integer: bool) -> object:
    if _removes_rule(name, value):
        return REMOVED
    if isinstance(value, str):
        text = value.strip()
        try:
            number: object = float(text)
        except ValueError:
            kind = "a positive integer" if integer else "a positive finite number"
            raise ValueError(f"{name} must be {kind} or off, got {value!r}") from None
    else:
        number = value
    checked = check_limit(name, number, integer=integer)
    return int(checked) if integer else checked


def _limit(integer: bool = False) -> Callable[[str, object], object]:
    def parse(name: str, value: object) -> object:
        return _number(name, value, integer=integer)

    return parse


def _seconds(name: str, value: object) -> object:
    result = _number(name, value, integer=False)
    if result == REMOVED:
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    return result


def _behavior(name: str, value: object) -> object:
    if isinstance(value, RestartBehavior):
        return value
    text = str(value).strip().upper()
    if isinstance(value, str) and text in RestartBehavior.__members__:
        return RestartBehavior[text]
    choices = ", ".join(member.name.lower() for member in RestartBehavior)
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def parse_bool(name: str, value: object) -> object:
    """Parse an on/off value as karton's ``Config.getboolean`` does."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1, true, yes, on, 0, false, no, off, got {value!r}")


def _ranged(
    integer: bool = False, removable: bool = False, **bounds: Any
) -> Callable[[str, object], object]:
    def parse(name: str, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if removable and text.lower() in _REMOVED_WORDS:
                return None
            if not text:
                raise ValueError(f"{name} must not be empty")
            try:
                value = float(text)
            except ValueError:
                check_number(name, text, integer=integer, **bounds)
        number = check_number(name, value, integer=integer, **bounds)
        return int(number) if integer else number

    return parse


_parse_percent = _ranged(low=0, low_inclusive=False, high=100)


def _percent_limit(name: str, value: object) -> object:
    """Parse a rule limit in percent of a whole, in (0, 100]; off removes the rule."""
    if _removes_rule(name, value):
        return REMOVED
    return _parse_percent(name, value)


#: Highest max_concurrent_restarts, the same as memwatch.fleet.MAX_SLOTS.
MAX_CONCURRENT_RESTARTS = 1024

METRICS = ("rss", "uss", "pss")


def _metric(name: str, value: object) -> object:
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in METRICS:
        raise ValueError(f"{name} must be one of {', '.join(METRICS)}, got {value!r}")
    return text


OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("max_tasks", "tasks", "unset", "restart after this many tasks", _limit(True)),
        Option("max_seconds", "seconds", "unset", "restart after this long", _limit()),
        Option("extra_mb", "MiB", "unset", "restart once RSS grew this much", _limit()),
        Option("extra_percent", "%", "unset", "restart once RSS grew this share", _limit()),
        Option("max_rss_mb", "MiB", "unset", "restart once RSS reaches this", _limit()),
        Option(
            "limit_percent",
            "%",
            "unset",
            "restart at this share of the container's memory limit",
            _percent_limit,
        ),
        Option("behavior", "", "exit_0", "exit_0, exit_1, dry_run or reexec", _behavior),
        Option("enabled", "", "true", "false turns the guard off", parse_bool),
        Option(
            "idle_check_seconds",
            "seconds",
            "5",
            "how often an idle karton consumer checks the rules",
            _seconds,
        ),
        Option("warmup", "tasks", "0", "tasks before the baseline is taken", _ranged(True, low=0)),
        Option(
            "jitter",
            "share",
            "0",
            "each process lowers its limits by a random share up to this",
            _ranged(low=0, high=1, high_inclusive=False),
        ),
        Option("reclaim", "", "true", "try gc and malloc_trim before a restart", parse_bool),
        Option("metric", "", "rss", "memory figure of the memory rules: rss, uss or pss", _metric),
        Option(
            "min_lifetime_seconds",
            "seconds",
            "60",
            "least lifetime when a ceiling is below the start-up footprint",
            _ranged(low=0),
        ),
        Option(
            "report_every",
            "tasks",
            "off",
            "tasks between two growth reports",
            _ranged(True, removable=True, low=1),
        ),
        Option(
            "before_exit_timeout",
            "seconds",
            "5",
            "how long the before-exit callbacks may take in all",
            _ranged(low=0, low_inclusive=False),
        ),
        Option(
            "exit_timeout",
            "seconds",
            "30",
            "after this, a process that caught the exit is ended; 0 never",
            _ranged(low=0),
        ),
        Option(
            "max_concurrent_restarts",
            "replicas",
            "off",
            "replicas of a karton identity that may restart at once",
            _ranged(True, removable=True, low=1, high=MAX_CONCURRENT_RESTARTS),
        ),
        Option(
            "restart_lease_seconds",
            "seconds",
            "30",
            "how long a restart slot stays taken unless released",
            _ranged(low=0, low_inclusive=False),
        ),
    )
}


def parse_options(raw: Mapping[str, object], source: Callable[[str], str]) -> dict[str, Any]:
    """Validate raw option values and return them parsed.

    :param raw: option name to value, as read from a file or the environment
    :param source: returns where an option was set, for error messages
    :raises ValueError: for an unknown option or an invalid value
    """
    parsed: dict[str, Any] = {}
    for name, value in raw.items():
        option = OPTIONS.get(name)
        if option is None:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(
                f"unknown memwatch option {source(name)}{hint} "
                f"(known options: {', '.join(OPTIONS)})"
            )
        try:
            parsed[name] = option.parse(name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source(name)} = {value!r} is invalid: {exc}") from None
    return parsed


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the options set as ``MEMWATCH_<OPTION>`` environment variables."""
    raw = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX)
    }
    return parse_options(raw, lambda name: f"{ENV_PREFIX}{name.upper()}")


def from_karton(config: object, environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the options of a karton ``Config``'s ``[memwatch]`` section.

    karton merges ``KARTON_MEMWATCH_<OPTION>`` variables into that section, so
    both sources are read here; ``environ`` only shows which one set a value.
    """
    # karton's Config has no public way to list a section's options.
    sections = getattr(config, "_config", None)
    section = sections.get(SECTION) if isinstance(sections, dict) else None
    if not isinstance(section, Mapping):
        return {}

    def source(name: str) -> str:
        variable = f"KARTON_{SECTION.upper()}_{name.upper()}"
        if variable in environ:
            return variable
        return f"[{SECTION}] {name} in the karton config"

    return parse_options(dict(section), source)


def describe_overrides(options: Mapping[str, Any]) -> str:
    """Return ``name=value`` pairs for the start-up log line."""
    parts = []
    for name, value in options.items():
        if isinstance(value, RestartBehavior):
            text = value.name
        elif isinstance(value, float) and not math.isinf(value) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        parts.append(f"{name}={text}")
    return ", ".join(parts)


#: Seconds between two rule checks of an idle karton consumer, unless configured.
DEFAULT_IDLE_CHECK_SECONDS = 5.0
DEFAULT_MIN_LIFETIME_SECONDS = 60.0
DEFAULT_BEFORE_EXIT_TIMEOUT = 5.0
DEFAULT_EXIT_TIMEOUT = 30.0
# The same value as memwatch.fleet.DEFAULT_TTL_SECONDS, repeated here because
# memwatch.fleet imports redis-py, which plain functions never need.
DEFAULT_RESTART_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class Settings:
    """The limits, the behaviour and the switches that a guard enforces."""

    #: Limit by rule name (see :data:`memwatch.rules.RULE_TYPES`); ``None`` is unset.
    limits: Mapping[str, object]
    behavior: Behavior = RestartBehavior.EXIT_0
    enabled: bool = True
    idle_check_seconds: float = DEFAULT_IDLE_CHECK_SECONDS
    #: Tasks before the baseline is taken; memory rules wait for it.
    warmup: int = 0
    #: Share (0 to 1) by which each process lowers its limits, drawn at random.
    jitter: float = 0.0
    #: Whether a tripped memory rule first tries gc.collect() and malloc_trim().
    reclaim: bool = True
    #: Seconds a process lives at least when a ceiling is below its start-up footprint.
    min_lifetime_seconds: float = DEFAULT_MIN_LIFETIME_SECONDS
    #: Tasks between two growth reports; ``None`` reports nothing.
    report_every: int | None = None
    #: Seconds the before-exit callbacks may take in all.
    before_exit_timeout: float = DEFAULT_BEFORE_EXIT_TIMEOUT
    #: Seconds the process may take to end after memwatch raised SystemExit; 0 waits forever.
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT
    #: The memory figure the memory rules compare: ``rss``, ``uss`` or ``pss``.
    metric: str = "rss"
    #: Replicas of a karton identity that may restart at once; ``None`` sets no limit.
    max_concurrent_restarts: int | None = None
    #: Seconds a restart slot stays taken unless the next image releases it.
    restart_lease_seconds: float = DEFAULT_RESTART_LEASE_SECONDS
    #: Names to show instead of memwatch's own, for karton-memory-watcher's API.
    names: Mapping[str, str] = field(default_factory=dict)
    #: The options that came from configuration, for the start-up log line.
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def rules(self) -> list[Rule]:
        """Build and validate the rules."""
        return build_rules(self.limits, self.names)

    def merged(self, options: Mapping[str, Any]) -> Settings:
        """Return these settings with parsed ``options`` applied over them."""
        if not options:
            return self
        limits = dict(self.limits)
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if name in RULE_TYPES:
                limits[name] = None if value == REMOVED else value
            else:
                changes[name] = value
        return replace(self, limits=limits, overrides={**self.overrides, **options}, **changes)
