"""Property-based tests: the decision engine against a plain reference model."""

from __future__ import annotations

import logging
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from memwatch import checker
from memwatch.behavior import RestartBehavior
from memwatch.config import Settings
from memwatch.guard import Guard
from memwatch.rules import Snapshot

MIB = 1024 * 1024
LOGGER = logging.getLogger("memwatch.test.properties")

limits_strategy = st.fixed_dictionaries(
    {},
    optional={
        "max_tasks": st.integers(1, 500),
        "max_seconds": st.floats(0.01, 5000, allow_nan=False),
        "extra_mb": st.floats(0.01, 4096, allow_nan=False),
        "extra_percent": st.floats(0.01, 1000, allow_nan=False),
        "max_rss_mb": st.floats(1, 8192, allow_nan=False),
    },
).filter(bool)

reading = st.tuples(
    st.integers(0, 20),  # tasks done since the last reading
    st.floats(0, 200, allow_nan=False),  # seconds since the last reading
    st.integers(1 * MIB, 8192 * MIB),  # RSS in bytes
)


def reference(
    limits: dict[str, float], snapshot: Snapshot, minimum: float, storm: bool
) -> list[str]:
    """Return the names of the rules that trip, in order, by plain arithmetic."""
    tripped = []
    rss, baseline = snapshot.rss, snapshot.baseline
    assert rss is not None
    assert baseline is not None
    if "max_tasks" in limits and snapshot.tasks >= limits["max_tasks"]:
        tripped.append("max_tasks")
    if "max_seconds" in limits and snapshot.uptime >= limits["max_seconds"]:
        tripped.append("max_seconds")
    if "extra_mb" in limits and rss - baseline >= limits["extra_mb"] * MIB:
        tripped.append("extra_mb")
    if "extra_percent" in limits and rss >= baseline * (1 + limits["extra_percent"] / 100):
        tripped.append("extra_percent")
    if "max_rss_mb" in limits and rss >= limits["max_rss_mb"] * MIB:
        tripped.append("max_rss_mb")
    # The storm guard: a ceiling over the footprint at start waits for the lifetime.
    if tripped and storm and snapshot.uptime < minimum:
        return []
    return tripped


def is_storm(limits: dict[str, float], snapshot: Snapshot) -> bool:
    """Return whether the first reading with a trip finds the ceiling over the footprint
    at start: before the first task, or right after it."""
    if "max_rss_mb" not in limits:
        return False
    ceiling = limits["max_rss_mb"] * MIB
    assert snapshot.rss is not None
    assert snapshot.baseline is not None
    return snapshot.baseline >= ceiling or (snapshot.tasks <= 1 and snapshot.rss >= ceiling)


@settings(max_examples=300, deadline=None)
@given(
    limits=limits_strategy,
    baseline=st.integers(1 * MIB, 4096 * MIB),
    readings=st.lists(reading, min_size=1, max_size=30),
    minimum=st.sampled_from([0.0, 60.0]),
)
def test_decision_matches_reference(
    limits: dict[str, float], baseline: int, readings: list[tuple[int, float, int]], minimum: float
) -> None:
    guard = Guard(
        Settings(
            limits=limits,
            behavior=RestartBehavior.EXIT_0,
            reclaim=False,
            min_lifetime_seconds=minimum,
        )
    )
    tasks, uptime = 0, 0.0
    storm: bool | None = None
    for step, seconds, rss in readings:
        tasks += step
        uptime += seconds
        snapshot = Snapshot(tasks=tasks, uptime=uptime, rss=rss, baseline=baseline)
        if storm is None and reference(limits, snapshot, minimum, storm=False):
            # The engine decides about a storm once, at the first reading with a trip.
            storm = is_storm(limits, snapshot)
        expected = reference(limits, snapshot, minimum, bool(storm))
        decision = checker.decide(guard, snapshot, raised=False, idle=False, logger=LOGGER)
        if not expected:
            assert decision is None
            continue
        assert decision is not None
        assert [trip.rule for trip in decision.trips] == expected
        assert decision.rule == expected[0]
        return


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, jitter=st.floats(0, 0.99, allow_nan=False))
def test_jitter_never_raises_a_limit(limits: dict[str, float], jitter: float) -> None:
    guard = Guard(Settings(limits=limits, jitter=jitter))
    snapshot = Snapshot(tasks=1, uptime=0.0, rss=MIB, baseline=MIB)
    drawn = checker.active_rules(guard, snapshot, LOGGER)
    assert [rule.name for rule in drawn] == [rule.name for rule in guard.rules]
    for configured, rule in zip(guard.rules, drawn, strict=True):
        assert rule.limit <= configured.limit
        lowest = configured.limit * (1 - jitter)
        if rule.name == "max_tasks":
            lowest = max(1, math.ceil(lowest - 1e-9))
        assert rule.limit >= lowest - 1e-9
