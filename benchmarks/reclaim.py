"""The reclaim budget: a worker whose every task trips a memory rule.

Each task keeps a little memory and the limit is tiny, so every check finds the
rule tripped and would reclaim (``gc.collect()`` and ``malloc_trim``) if the
budget allowed it. The behaviour is a dry run, so the worker keeps going. The
share of the run spent reclaiming must stay at or under about 1 %.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

_WORKER = """
import sys, time
from memwatch import RestartBehavior, restart_when, stats

# A large heap of small objects makes each gc.collect() slow, as in a parser.
heap = [{"n": n, "s": str(n)} for n in range(400_000)]
kept = []

@restart_when(extra_mb=0.001, behavior=RestartBehavior.DRY_RUN)
def task():
    kept.append(bytearray(b"\\x01") * 4096)

started = time.monotonic()
while time.monotonic() - started < float(sys.argv[1]):
    task()
figures = stats(task)
print(figures.tasks, figures.uptime, figures.reclaim_seconds)
"""


@dataclass(frozen=True)
class ReclaimResult:
    """Tasks run, seconds run and seconds spent reclaiming by one worker."""

    tasks: int
    seconds: float
    reclaim_seconds: float

    @property
    def share(self) -> float:
        """Return the share of the run spent reclaiming."""
        return self.reclaim_seconds / self.seconds if self.seconds else 0.0


def run_reclaim_benchmark(seconds: float) -> ReclaimResult:
    """Run the worker for ``seconds`` in a fresh interpreter and return its figures."""
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER, str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    tasks, uptime, reclaim_seconds = completed.stdout.split()
    return ReclaimResult(int(tasks), float(uptime), float(reclaim_seconds))


def reclaim_section(result: ReclaimResult) -> list[str]:
    """Return the report's lines about the reclaim budget."""
    return [
        "## Reclaim budget",
        "",
        "A dry-run worker whose every task trips `extra_mb`, with 400,000 objects on "
        "its heap so that each `gc.collect()` is slow.",
        "",
        "| tasks | seconds | seconds reclaiming | share |",
        "|---|---|---|---|",
        f"| {result.tasks} | {result.seconds:.1f} | {result.reclaim_seconds:.3f} | "
        f"{result.share:.2%} |",
        "",
    ]
