"""Call one benchmark subject in a loop for a while, for a profiler to watch.

For example::

    py-spy record --rate 2000 --format raw --output memory.txt -- \\
        python -m benchmarks.hotloop memory --seconds 10
    perf stat -e task-clock,context-switches python -m benchmarks.hotloop statm --seconds 5
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

from benchmarks.subjects import build_subjects

#: Calls between two looks at the clock.
BATCH = 10_000


def main(argv: Sequence[str] | None = None) -> None:
    """Call the subject until the time is up, then print the calls made and the µs per call."""
    subjects = build_subjects()
    sync_keys = [key for key, subject in subjects.items() if not subject.is_async]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hotloop",
        description="Call one sync benchmark subject in a loop, for py-spy, perf or line_profiler.",
    )
    parser.add_argument("key", choices=sync_keys, help="the subject to call")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="how long to keep calling (default 10)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds must be more than 0, got {args.seconds}")

    call = subjects[args.key].function
    calls = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        for _ in itertools.repeat(None, BATCH):
            call()
        calls += BATCH
    elapsed = time.perf_counter() - started
    print(
        f"{args.key}: {calls:,} calls in {elapsed:.1f} s, {elapsed / calls * 1e6:.3f} µs per call"
    )


if __name__ == "__main__":
    main()
