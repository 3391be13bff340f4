"""Each rule at its exact boundary: below, at and above its limit."""

from __future__ import annotations

import pytest

from memwatch.rules import (
    ExtraMemory,
    ExtraPercent,
    MaxRss,
    MaxSeconds,
    MaxTasks,
    Rule,
    Snapshot,
)

MIB = 1024 * 1024


def snap(
    tasks: int = 1, uptime: float = 0.0, rss: int | None = None, baseline: int | None = None
) -> Snapshot:
    return Snapshot(tasks=tasks, uptime=uptime, rss=rss, baseline=baseline)


@pytest.mark.parametrize(("tasks", "trips"), [(99, False), (100, True), (101, True)])
def test_max_tasks_boundary(tasks: int, trips: bool) -> None:
    assert (MaxTasks(100).check(snap(tasks=tasks)) is not None) is trips


@pytest.mark.parametrize(("uptime", "trips"), [(59.999, False), (60.0, True), (60.5, True)])
def test_max_seconds_boundary(uptime: float, trips: bool) -> None:
    assert (MaxSeconds(60).check(snap(uptime=uptime)) is not None) is trips


@pytest.mark.parametrize(
    ("growth", "trips"), [(500 * MIB - 1, False), (500 * MIB, True), (500 * MIB + 1, True)]
)
def test_extra_mb_boundary_in_bytes(growth: int, trips: bool) -> None:
    baseline = 60 * MIB
    trip = ExtraMemory(500).check(snap(rss=baseline + growth, baseline=baseline))
    assert (trip is not None) is trips


def test_extra_mb_does_not_truncate_to_whole_megabytes() -> None:
    # karton-memory-watcher floored both figures to whole MB; 0.5 MiB of growth
    # over a baseline of x.9 MiB crossed a whole MB and counted as 1 MB.
    baseline = 60 * MIB + 900 * 1024
    assert ExtraMemory(1).check(snap(rss=baseline + MIB // 2, baseline=baseline)) is None
    assert ExtraMemory(0.5).check(snap(rss=baseline + MIB // 2, baseline=baseline)) is not None


@pytest.mark.parametrize(
    ("rss", "trips"), [(179 * MIB, False), (180 * MIB, True), (181 * MIB, True)]
)
def test_extra_percent_boundary(rss: int, trips: bool) -> None:
    # 80 % over a 100 MiB baseline trips at 180 MiB.
    assert (ExtraPercent(80).check(snap(rss=rss, baseline=100 * MIB)) is not None) is trips


@pytest.mark.parametrize(("rss", "trips"), [(MIB * 1024 - 1, False), (MIB * 1024, True)])
def test_max_rss_boundary(rss: int, trips: bool) -> None:
    assert (MaxRss(1024).check(snap(rss=rss)) is not None) is trips


@pytest.mark.parametrize("rule", [ExtraMemory(1), ExtraPercent(1), MaxRss(1)])
def test_memory_rules_skip_unknown_memory(rule: Rule) -> None:
    assert rule.check(snap(rss=None, baseline=MIB)) is None
    assert rule.needs_memory


def test_relative_rules_skip_missing_baseline() -> None:
    assert ExtraMemory(1).check(snap(rss=500 * MIB, baseline=None)) is None
    assert ExtraPercent(1).check(snap(rss=500 * MIB, baseline=None)) is None


def test_count_and_time_rules_need_no_memory() -> None:
    assert not MaxTasks(1).needs_memory
    assert not MaxSeconds(1).needs_memory


def test_trip_carries_numbers_in_rule_unit() -> None:
    trip = ExtraMemory(500).check(snap(rss=700 * MIB, baseline=150 * MIB))
    assert trip is not None
    assert trip.rule == "extra_mb"
    assert trip.current == 550
    assert trip.limit == 500
    assert trip.describe() == "extra_mb 550 >= 500 MiB"


def test_percent_trip_reports_growth_percent() -> None:
    trip = ExtraPercent(50).check(snap(rss=160 * MIB, baseline=100 * MIB))
    assert trip is not None
    assert trip.current == pytest.approx(60)
    assert trip.describe() == "extra_percent 60.0 >= 50 %"
