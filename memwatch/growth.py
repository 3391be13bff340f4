"""The growth estimate: how fast the process grows and when each memory rule will trip.

The estimate is linear from the baseline: growth divided by the tasks and the
hours since the baseline was taken. It needs no history, so it costs the same
after a million tasks as after ten.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .memory import MIB, to_mib
from .rules import ExtraMemory, ExtraPercent, MaxRss, Rule


@dataclass(frozen=True)
class Stats:
    """A guard's figures in this process, as :func:`memwatch.stats` returns them."""

    tasks: int
    uptime: float
    #: RSS in bytes when these stats were taken, or ``None`` when no memory rule reads it.
    rss: int | None
    baseline: int | None
    #: Growth over the baseline, in bytes.
    growth: int | None
    #: Average growth per task since the baseline, in bytes.
    growth_per_task: float | None
    #: Average growth per hour since the baseline, in bytes.
    growth_per_hour: float | None
    #: The decision that ends this process, as logged, once a rule tripped.
    decision: str | None
    #: Seconds spent reclaiming memory, and bytes it gave back.
    reclaim_seconds: float
    reclaimed: int
    #: Restarts deferred because another replica held the restart slots.
    deferrals: int = 0


def rates(
    rss: int | None, baseline: int | None, tasks: int, hours: float
) -> tuple[float | None, float | None]:
    """Return the growth per task and per hour in bytes, or ``None`` where unknown."""
    if rss is None or baseline is None:
        return None, None
    growth = rss - baseline
    per_task = growth / tasks if tasks > 0 else None
    per_hour = growth / hours if hours > 0 else None
    return per_task, per_hour


def headroom(rule: Rule, rss: int, baseline: int) -> float | None:
    """Return the bytes left before ``rule`` trips, or ``None`` for a rule of another kind."""
    if isinstance(rule, ExtraMemory):
        return baseline + rule.limit * MIB - rss
    if isinstance(rule, ExtraPercent):
        return baseline * (1 + rule.limit / 100) - rss
    if isinstance(rule, MaxRss):
        return rule.limit * MIB - rss
    return None


def describe_report(
    rules: Sequence[Rule], rss: int, baseline: int, tasks: int, hours: float
) -> str:
    """Return the summary line: current, baseline, growth, rates and time to each rule."""
    per_task, per_hour = rates(rss, baseline, tasks, hours)
    text = (
        f"rss {to_mib(rss):.1f} MiB, baseline {to_mib(baseline):.1f} MiB, "
        f"growth {to_mib(rss - baseline):.1f} MiB"
    )
    if per_task is not None and per_hour is not None:
        text += f" ({to_mib(per_task):.3f} MiB/task, {to_mib(per_hour):.1f} MiB/h)"
    for rule in rules:
        left = headroom(rule, rss, baseline)
        if left is None:
            continue
        if per_task is None or per_task <= 0 or per_hour is None or per_hour <= 0:
            text += f"; {rule.name}: {to_mib(left):.1f} MiB left, not growing"
        else:
            text += (
                f"; {rule.name} trips in about {max(left, 0) / per_task:.0f} tasks "
                f"({max(left, 0) / per_hour:.1f} h)"
            )
    return text
