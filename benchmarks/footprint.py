"""RSS growth over many guarded calls, each subject in a fresh interpreter.

``python -m benchmarks.footprint KEY --calls N`` calls one subject ``N`` times
after a warm-up and prints one JSON object: the RSS growth in bytes after every
tenth of the calls. :func:`measure_footprint` runs those children and collects
their output.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.subjects import StatmReader, build_subjects

#: Calls before the first RSS read, so that caches, free lists and the baseline
#: of memwatch exist before the measurement starts.
WARM_UP_CALLS = 10_000
CHECKPOINTS = 10

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class FootprintRun:
    """RSS growth of one child process over its calls, in bytes."""

    key: str
    calls: int
    #: Growth after each tenth of the calls, the last one after all of them.
    growth: list[int]

    @property
    def final(self) -> int:
        """Growth after all calls."""
        return self.growth[-1]

    @property
    def peak(self) -> int:
        """Largest growth seen at any checkpoint."""
        return max(self.growth)


def measure_in_this_process(key: str, calls: int) -> FootprintRun:
    """Call subject ``key`` ``calls`` times and record the RSS growth.

    :raises ValueError: when ``key`` is not a sync subject
    """
    subjects = build_subjects()
    subject = subjects.get(key)
    if subject is None or subject.is_async:
        choices = ", ".join(k for k, s in subjects.items() if not s.is_async)
        raise ValueError(f"subject {key!r} is unknown or async; use one of {choices}")
    call = subject.function
    statm = StatmReader()
    for _ in itertools.repeat(None, WARM_UP_CALLS):
        call()
    gc.collect()
    before = statm.read()
    chunk = max(calls // CHECKPOINTS, 1)
    growth = []
    done = 0
    while done < calls:
        step = min(chunk, calls - done)
        for _ in itertools.repeat(None, step):
            call()
        done += step
        growth.append(statm.read() - before)
    statm.close()
    return FootprintRun(key, calls, growth)


def measure_footprint(
    keys: Sequence[str], calls: int, repeats: int, parallel: int = 2
) -> dict[str, list[FootprintRun]]:
    """Run one child per subject and repeat, ``parallel`` at a time.

    :return: the runs of each subject, by key
    :raises RuntimeError: when a child fails; the message contains its output
    """
    jobs = [key for _ in range(repeats) for key in keys]
    runs: dict[str, list[FootprintRun]] = {key: [] for key in keys}
    env = dict(os.environ)
    # The caller's PYTHONPATH goes first, so that the children import the same memwatch.
    python_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = (
        str(_SOURCE_ROOT) if not python_path else os.pathsep.join([python_path, str(_SOURCE_ROOT)])
    )
    for start in range(0, len(jobs), parallel):
        batch = jobs[start : start + parallel]
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.footprint", key, f"--calls={calls}"],
                cwd=_SOURCE_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for key in batch
        ]
        for key, child in zip(batch, children, strict=True):
            output, errors = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(
                    f"footprint child for {key!r} exited with status {child.returncode}:\n"
                    f"{errors.strip()}"
                )
            record = json.loads(output)
            runs[key].append(FootprintRun(record["key"], record["calls"], record["growth"]))
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Measure one subject and print the result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.footprint",
        description="Call one benchmark subject many times and print its RSS growth as JSON.",
    )
    parser.add_argument("key", help="subject key, for example memory or count-time")
    parser.add_argument(
        "--calls", type=int, default=1_000_000, help="calls after the warm-up (default 1000000)"
    )
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be 1 or more, got {args.calls}")
    try:
        run = measure_in_this_process(args.key, args.calls)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps({"key": run.key, "calls": run.calls, "growth": run.growth}))


if __name__ == "__main__":
    main()
