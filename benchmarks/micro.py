"""Time per call of each subject, in interleaved rounds, with paired ratios.

Each round times every subject once, in an order rotated by one each round, so
that a slow spell of the machine touches every subject alike. A subject's
overhead in a round is its time per call minus the time of its bare call (a
plain call, a method call or an ``await``) in the same round. Its ratio is that
overhead divided by its reference subject's overhead in the same round.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from benchmarks.stats import Summary, summarize
from benchmarks.subjects import Subject

logger = logging.getLogger("benchmarks.micro")

#: Runs the subject this many times and returns the elapsed nanoseconds.
Timer = Callable[[int], int]

#: The subject whose overhead each subject's ratio is divided by.
REFERENCES = {
    "reader": "statm",
    "memory": "wrapt+statm",
    "count-time": "wrapt",
    "all": "wrapt+statm",
    "memwatch-hooks": "wrapt+statm",
    "method-memory": "method-wrapt",
    "async-memory": "async-wrapt",
    "kmw-hooks": "memory",
}

#: Calls per round of the fastest subjects, so that the loop overhead is averaged well.
MAX_CALLS = 2_000_000
#: Calls per round of the slowest subjects, so that the clock's resolution does not matter.
MIN_CALLS = 1_000


@dataclass(frozen=True)
class MicroRow:
    """Times of one subject over all rounds, in µs per call."""

    key: str
    label: str
    calls: int
    per_call: Summary
    #: Time per call minus the bare call's, or ``None`` for the bare calls themselves.
    overhead: Summary | None
    reference: str | None
    #: Overhead divided by the reference's overhead, summarized over the rounds.
    ratio: Summary | None
    #: The same ratio in each round, in round order.
    ratios: tuple[float, ...] = ()


def sync_timer(function: Callable[[], object]) -> Timer:
    """Return a timer that calls ``function`` in a loop."""

    def run(calls: int) -> int:
        call = function
        start = time.perf_counter_ns()
        for _ in itertools.repeat(None, calls):
            call()
        return time.perf_counter_ns() - start

    return run


def async_timer(
    loop: asyncio.AbstractEventLoop, function: Callable[[], Awaitable[object]]
) -> Timer:
    """Return a timer that awaits ``function()`` in a loop inside one task of ``loop``."""

    async def drive(calls: int) -> int:
        call = function
        start = time.perf_counter_ns()
        for _ in itertools.repeat(None, calls):
            await call()
        return time.perf_counter_ns() - start

    def run(calls: int) -> int:
        return loop.run_until_complete(drive(calls))

    return run


def calibrate(timer: Timer, seconds: float) -> int:
    """Return how many calls take about ``seconds``, rounded to two significant digits."""
    timer(MIN_CALLS)
    calls = MIN_CALLS
    elapsed = timer(calls)
    # Grow the sample until it lasts 20 ms, so that one slow call does not decide.
    while elapsed < 20_000_000 and calls < MAX_CALLS:
        calls *= 10
        elapsed = timer(calls)
    target_calls = seconds * 1e9 / max(elapsed / calls, 1.0)
    digits = max(int(math.log10(target_calls)) - 1, 0)
    rounded = round(target_calls, -digits)
    return int(min(max(rounded, MIN_CALLS), MAX_CALLS))


def run_micro(subjects: Mapping[str, Subject], rounds: int, seconds: float) -> dict[str, MicroRow]:
    """Time every subject in ``rounds`` interleaved rounds of about ``seconds`` each.

    :param seconds: target duration of one subject's measurement in one round
    :return: one row per subject, by key, in the order of ``subjects``
    """
    loop = asyncio.new_event_loop()
    try:
        timers = {
            key: async_timer(loop, subject.function)
            if subject.is_async
            else sync_timer(subject.function)
            for key, subject in subjects.items()
        }
        calls = {key: calibrate(timer, seconds) for key, timer in timers.items()}
        samples: dict[str, list[float]] = {key: [] for key in timers}
        keys = list(timers)
        for number in range(rounds):
            logger.info("micro-benchmarks: round %d of %d", number + 1, rounds)
            gc.collect()
            shift = number % len(keys)
            for key in keys[shift:] + keys[:shift]:
                samples[key].append(timers[key](calls[key]) / calls[key] / 1000)
    finally:
        loop.close()
    return {key: _row(subject, calls[key], samples, subjects) for key, subject in subjects.items()}


def _overheads(key: str, samples: Mapping[str, list[float]], base: str) -> list[float]:
    return [total - bare for total, bare in zip(samples[key], samples[base], strict=True)]


def _row(
    subject: Subject,
    calls: int,
    samples: Mapping[str, list[float]],
    subjects: Mapping[str, Subject],
) -> MicroRow:
    key = subject.key
    base = subject.baseline
    overhead = None if base is None else summarize(_overheads(key, samples, base))
    reference = REFERENCES.get(key)
    ratios: tuple[float, ...] = ()
    their_base = None if reference is None else subjects[reference].baseline
    if base is not None and reference is not None and their_base is not None:
        mine = _overheads(key, samples, base)
        theirs = _overheads(reference, samples, their_base)
        ratios = tuple(a / b for a, b in zip(mine, theirs, strict=True))
    else:
        reference = None
    return MicroRow(
        key=key,
        label=subject.label,
        calls=calls,
        per_call=summarize(samples[key]),
        overhead=overhead,
        reference=reference,
        ratio=summarize(ratios) if ratios else None,
        ratios=ratios,
    )
