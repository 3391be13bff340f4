"""Restart downtime on the real karton stack: re-exec in place against exit and restart.

Downtime is measured from memwatch's decision line to the new worker's "Binding on"
line, the last line karton logs before its loop requests the next task from Redis. Both
come from the consumer's own log, so both ends are on the same clock.
"""

from __future__ import annotations

import functools
import re
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from karton.core.backend import KartonBackend

from benchmarks.stats import Summary, summarize
from demo import leaky_consumer, pipeline
from demo.processes import terminate
from demo.stack import KartonStack
from demo.supervisor import RestartLoop

#: karton's log line prefix: ``[2026-12-04 20:59:33,462][INFO]``.
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_DEADLINE = 120.0


@dataclass(frozen=True)
class DowntimeResult:
    """Seconds from each decision to the next worker's first queue poll, per way of restarting."""

    reexec: list[float]
    exit_and_restart: list[float]

    def summaries(self) -> dict[str, Summary]:
        """Return the summary of each way that has measurements."""
        found = {"re-exec in place": self.reexec, "exit + restart loop": self.exit_and_restart}
        return {name: summarize(values) for name, values in found.items() if values}


def _stamp(line: str) -> datetime | None:
    match = _STAMP.match(line)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f") if match else None


def gaps(lines: list[str]) -> list[float]:
    """Return the seconds from each decision line to the next "Binding on" line."""
    found: list[float] = []
    decided: datetime | None = None
    for line in lines:
        stamp = _stamp(line)
        if stamp is None:
            continue
        if "memwatch: restart rule" in line and "tripped" in line:
            decided = stamp
        elif "Binding on:" in line and decided is not None:
            found.append((stamp - decided).total_seconds())
            decided = None
    return found


def _read(paths: list[Path]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines


def _run(stack: KartonStack, folder: Path, reexec: bool, restarts: int, every: int) -> list[float]:
    backend = KartonBackend(stack.config())
    identity = f"memwatch-bench-downtime-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    argv = leaky_consumer.command(
        mode="decorator",
        identity=identity,
        leak_kib=0,
        extra_mb=None,
        max_tasks=every,
        rss_log=folder / "rss.jsonl",
        reexec_in_place=reexec,
    )
    env = leaky_consumer.child_env(stack.env)
    wake = functools.partial(stack.unblock_clients, identity)
    sent = every * restarts + 1
    if reexec:
        log_path = folder / "consumer.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv, env=env, cwd=stack.workdir, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            pipeline.wait_for_binds(backend, identity, _DEADLINE)
            uids = pipeline.send_tasks(stack.config(), sent, 64)
            pipeline.wait_until_done(backend, identity, sent, _DEADLINE, uids)
        finally:
            terminate(process, "consumer", 15, wake)
        return gaps(_read([log_path]))
    loop = RestartLoop(argv, folder, env=env, cwd=stack.workdir, wake=wake)
    with loop:
        pipeline.wait_for_binds(backend, identity, _DEADLINE)
        uids = pipeline.send_tasks(stack.config(), sent, 64)
        pipeline.wait_until_done(backend, identity, sent, _DEADLINE, uids)
    return gaps(_read([generation.log_path for generation in loop.generations]))


def run_downtime_benchmark(folder: Path, restarts: int, every: int = 20) -> DowntimeResult:
    """Restart a consumer ``restarts`` times each way and return the measured downtimes."""
    with KartonStack(log_dir=folder / "stack") as stack:
        reexec = _run(stack, folder / "reexec", True, restarts, every)
        exit_and_restart = _run(stack, folder / "exit", False, restarts, every)
    return DowntimeResult(reexec, exit_and_restart)


def downtime_section(result: DowntimeResult) -> list[str]:
    """Return the report's table of restart downtimes."""
    lines = [
        "## Restart downtime",
        "",
        "Seconds from memwatch's decision to the new worker's first poll of its queue "
        "(its 'Binding on' line), on the embedded karton stack.",
        "",
        "| way of restarting | restarts | median s | range s |",
        "|---|---|---|---|",
    ]
    for name, summary in result.summaries().items():
        lines.append(f"| {name} | {summary.count} | {summary.median:.3f} | {summary.spread(3)} |")
    return [*lines, ""]
