"""From a snapshot to a decision: warm-up, jitter, reclaim, the restart storm guard, reports.

:func:`decide` is the one place where a guard turns what it measured after a task
(or while idle) into "restart now" or "not yet", and logs why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import TYPE_CHECKING

from .behavior import Decision, RestartBehavior, describe_state
from .growth import describe_report, headroom
from .memory import to_mib
from .restart_slots import admit
from .rules import (
    ContainerLimit,
    ExtraMemory,
    ExtraPercent,
    MaxRss,
    MaxSeconds,
    MaxTasks,
    Rule,
    Snapshot,
    Trip,
)

if TYPE_CHECKING:
    from .guard import Guard

# Each process draws its own jittered limits; a fresh generator per draw keeps a
# forked child from repeating its parent's draw.
_random = random.SystemRandom()


def decide(
    guard: Guard, snapshot: Snapshot, raised: bool, idle: bool, logger: logging.Logger
) -> Decision | None:
    """Return the decision that ends this process, or ``None`` to keep running."""
    tracker = guard.tracker
    rules = active_rules(guard, snapshot, logger)
    if guard.settings.metric != "rss" and snapshot.rss is not None:
        snapshot = _in_metric(guard, rules, snapshot)
    report(guard, rules, snapshot, logger)
    trips = _trips(rules, snapshot)
    if trips and any(trip.memory for trip in trips) and guard.settings.reclaim:
        snapshot, trips = _reclaim(guard, rules, snapshot, trips, logger)
    if not trips:
        return None
    if _in_storm(guard, rules, snapshot, logger):
        return None
    decision = Decision(trips, snapshot, task_raised=raised, idle=idle)
    if guard.behavior is RestartBehavior.DRY_RUN:
        if decision.rule not in tracker.reported:
            tracker.reported.add(decision.rule)
            logger.info("memwatch: %s; dry run, the process keeps running", decision.describe())
        return None
    # With max_concurrent_restarts, wait for a restart slot of the fleet.
    return admit(guard, decision, logger)


def _trips(rules: tuple[Rule, ...], snapshot: Snapshot) -> tuple[Trip, ...]:
    return tuple(trip for rule in rules if (trip := rule.check(snapshot)))


def active_rules(guard: Guard, snapshot: Snapshot, logger: logging.Logger) -> tuple[Rule, ...]:
    """Return this process's rules: jittered once, and without memory rules during warm-up."""
    tracker = guard.tracker
    rules = tracker.rules
    if rules is None:
        rules = _draw(guard, logger)
        tracker.rules = rules
    warmup = guard.settings.warmup
    if warmup and tracker.baseline is None:
        if snapshot.tasks >= warmup and snapshot.rss is not None:
            # Parsers import and cache lazily on their first tasks: measure growth
            # from the footprint they settle at, not from before their first task.
            tracker.baseline = snapshot.rss
            tracker.metric_baseline = tracker.read_metric()
            tracker.baseline_tasks = snapshot.tasks
            tracker.baseline_uptime = snapshot.uptime
            logger.info(
                "memwatch: baseline %.1f MiB taken after warm-up task %d",
                to_mib(snapshot.rss),
                snapshot.tasks,
            )
        return tuple(rule for rule in rules if not rule.needs_memory)
    return rules


def _draw(guard: Guard, logger: logging.Logger) -> tuple[Rule, ...]:
    jitter = guard.settings.jitter
    if not jitter:
        return guard.rules
    drawn = tuple(rule.scaled(_random.uniform(1 - jitter, 1)) for rule in guard.rules)
    logger.info(
        "memwatch: jitter %g drew this process's limits: %s",
        jitter,
        ", ".join(rule.describe() for rule in drawn),
    )
    return drawn


def report(
    guard: Guard, rules: tuple[Rule, ...], snapshot: Snapshot, logger: logging.Logger
) -> None:
    """Log the growth summary every ``report_every`` tasks."""
    every = guard.settings.report_every
    tracker = guard.tracker
    if snapshot.rss is not None:
        tracker.last_rss = snapshot.rss
    if not every or snapshot.tasks == 0 or snapshot.tasks % every:
        return
    if snapshot.rss is None or snapshot.baseline is None:
        return
    tasks = snapshot.tasks - tracker.baseline_tasks
    hours = (snapshot.uptime - tracker.baseline_uptime) / 3600
    logger.info(
        "memwatch: report after task %d: %s",
        snapshot.tasks,
        describe_report(rules, snapshot.rss, snapshot.baseline, tasks, hours),
    )


#: Seconds that one USS or PSS read may cost per task on average: about the cost
#: of the RSS read, so that the metric at most doubles the memory path.
METRIC_BUDGET_PER_TASK = 2e-6
#: Seconds between two USS or PSS reads at most, while guarded calls go on.
METRIC_MAX_INTERVAL = 10.0


def _in_metric(guard: Guard, rules: tuple[Rule, ...], snapshot: Snapshot) -> Snapshot:
    """Return ``snapshot`` with the RSS and baseline replaced by the USS or PSS.

    A USS or PSS read walks every page of the process (about 1 ms per 80 MiB), so
    it runs only when it can change the decision. Private memory that grows shows
    in the RSS too: the figure is read again once the RSS has grown since the last
    read by the headroom the last read left. Memory that turns private without
    growing the RSS (copy-on-write pages after a fork) shows only in a new read, so
    one also comes after enough tasks to spread its cost to about 2 µs a task, and
    at least every 10 seconds.
    """
    tracker = guard.tracker
    baseline = tracker.metric_baseline
    if baseline is None:
        return snapshot
    now = time.monotonic()
    last = tracker.last_metric
    due = (
        last is None
        or snapshot.tasks >= tracker.metric_next_tasks
        or now >= tracker.metric_next_time
        or (snapshot.rss is not None and snapshot.rss >= metric_gate(guard, rules))
    )
    if due:
        started = time.monotonic()
        value = tracker.read_metric()
        took = time.monotonic() - started
        if value is not None:
            tracker.last_metric = value
            tracker.metric_rss = snapshot.rss
        tracker.metric_next_tasks = snapshot.tasks + int(took / METRIC_BUDGET_PER_TASK) + 1
        tracker.metric_next_time = now + METRIC_MAX_INTERVAL
    if tracker.last_metric is None:
        return snapshot
    return dataclasses.replace(
        snapshot, rss=tracker.last_metric, baseline=baseline, metric=guard.settings.metric
    )


def metric_gate(guard: Guard, rules: tuple[Rule, ...]) -> float:
    """Return the RSS at which the USS or PSS may have reached a memory rule's limit."""
    tracker = guard.tracker
    last, base, at_rss = tracker.last_metric, tracker.metric_baseline, tracker.metric_rss
    if last is None or base is None or at_rss is None:
        return 0.0
    lefts = [left for rule in rules if (left := headroom(rule, last, base)) is not None]
    return at_rss + min(lefts) if lefts else math.inf


def _reclaim(
    guard: Guard,
    rules: tuple[Rule, ...],
    snapshot: Snapshot,
    trips: tuple[Trip, ...],
    logger: logging.Logger,
) -> tuple[Snapshot, tuple[Trip, ...]]:
    reclaimer = guard.tracker.reclaimer
    if snapshot.rss is None:
        return snapshot, trips
    if not reclaimer.allowed(snapshot.uptime):
        # Waiting for the budget could let a leaking worker grow far past its limit
        # (the next attempt may be seconds away), so a trip meanwhile restarts.
        return snapshot, trips
    took = reclaimer.attempt()
    tracker = guard.tracker
    after = tracker.reader.read() if snapshot.metric == "rss" else tracker.read_metric()
    if after is None:
        return snapshot, trips
    if snapshot.metric != "rss":
        tracker.last_metric = after
        tracker.metric_rss = tracker.reader.read()
    freed = max(snapshot.rss - after, 0)
    reclaimer.reclaimed += freed
    snapshot = dataclasses.replace(snapshot, rss=after)
    trips = _trips(rules, snapshot)
    logger.info(
        "memwatch: reclaiming memory gave back %.1f MiB in %.1f ms (rss %.1f -> %.1f MiB); %s",
        to_mib(freed),
        took * 1000,
        to_mib(snapshot.rss or 0) + to_mib(freed),
        to_mib(after),
        "still over a limit" if trips else "back under every limit, no restart",
    )
    return snapshot, trips


def _in_storm(
    guard: Guard, rules: tuple[Rule, ...], snapshot: Snapshot, logger: logging.Logger
) -> bool:
    """Return whether a restart must wait because the limits would restart in a loop.

    A ceiling below the footprint the process had before its first task, or after
    its first task, trips in every new process right away. Such a process keeps
    working until it has lived
    ``min_lifetime_seconds``, so the restarts come no faster than that. The ceilings
    are ``max_rss_mb`` and ``limit_percent``.
    """
    tracker = guard.tracker
    minimum = guard.settings.min_lifetime_seconds
    if tracker.storm is None:
        below = [rule for rule in rules if _reached_at_start(rule, snapshot)]
        tracker.storm = bool(below)
        if below:
            logger.warning(
                "memwatch: %s is below this process's footprint at start (%s): every new "
                "process would restart right away; restarts wait until the process has "
                "lived min_lifetime_seconds=%g s",
                ", ".join(rule.describe() for rule in below),
                describe_state(snapshot),
                minimum,
            )
    return bool(tracker.storm) and snapshot.uptime < minimum


def _reached_at_start(rule: Rule, snapshot: Snapshot) -> bool:
    if not isinstance(rule, (MaxRss, ContainerLimit)):
        return False
    if snapshot.tasks <= 1 and rule.check(snapshot) is not None:
        # Over the ceiling after the very first task: a cache that the first task
        # builds would trip every new process as surely as its start-up footprint.
        return True
    if isinstance(rule, ContainerLimit):
        return rule.check_at_start(snapshot) is not None
    return (
        snapshot.baseline is not None
        and rule.check(dataclasses.replace(snapshot, rss=snapshot.baseline)) is not None
    )


#: The hot path runs a full check at least every this many tasks, so that a
#: logger switched to DEBUG gets its per-task lines within that many tasks.
FULL_CHECK_EVERY = 256


def _rss_threshold(rule: Rule, baseline: int | None) -> float:
    # The tracker's baseline, which a warm-up may have taken during this check;
    # without one the memory rules are inactive.
    if baseline is None:
        return math.inf
    left = headroom(rule, baseline, baseline)
    return math.inf if left is None else baseline + left


def set_thresholds(guard: Guard, snapshot: Snapshot, logger: logging.Logger) -> None:
    """Set the thresholds below which the hot path skips the full check.

    Each is the nearest point at which a rule could trip: the lowest task limit,
    the earliest time limit, the lowest RSS at which a memory rule trips. A rule
    of another kind, the storm guard or a DEBUG logger turn the hot path off.
    """
    tracker = guard.tracker
    tracker.fast = False
    rules = tracker.rules
    if rules is None or not guard.enabled or logger.isEnabledFor(logging.DEBUG):
        return
    next_tasks = snapshot.tasks + FULL_CHECK_EVERY
    every = guard.settings.report_every
    if every:
        next_tasks = min(next_tasks, (snapshot.tasks // every + 1) * every)
    warmup = guard.settings.warmup
    if warmup and tracker.baseline is None:
        next_tasks = min(next_tasks, warmup)
    deadline = math.inf
    rss_limit = math.inf
    started_at = tracker.started_at
    metric = guard.settings.metric != "rss" and tracker.metric_baseline is not None
    for rule in rules:
        if isinstance(rule, MaxTasks):
            next_tasks = min(next_tasks, int(rule.limit))
        elif isinstance(rule, MaxSeconds):
            if started_at is None:
                return
            deadline = min(deadline, started_at + rule.limit)
        elif isinstance(rule, (ExtraMemory, ExtraPercent, MaxRss)) and metric:
            # The USS or PSS is read again by the schedule and gate of _in_metric.
            next_tasks = min(next_tasks, tracker.metric_next_tasks)
            deadline = min(deadline, tracker.metric_next_time)
            rss_limit = min(rss_limit, metric_gate(guard, rules))
        elif isinstance(rule, (ExtraMemory, ExtraPercent, MaxRss)):
            rss_limit = min(rss_limit, _rss_threshold(rule, tracker.baseline))
        else:
            # A rule the thresholds cannot express is checked after every task.
            return
    if tracker.storm and started_at is not None:
        # Over a ceiling already: only the end of the minimum lifetime changes anything.
        deadline = min(deadline, started_at + guard.settings.min_lifetime_seconds)
        rss_limit = math.inf
    tracker.next_tasks = next_tasks
    tracker.deadline = deadline
    tracker.timed = deadline != math.inf
    tracker.rss_limit = rss_limit
    tracker.watch_memory = rss_limit != math.inf
    tracker.fast = True
