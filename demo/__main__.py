"""Demo: a leaking karton consumer restarted by memwatch, with no task lost.

Run ``python -m demo``. It starts Redis, an S3 endpoint and karton-system on
127.0.0.1, runs the leaking consumer under a restart loop, sends tasks,
prints progress and a summary, and draws the RSS per task to a PNG file.
The exit status is 1 when a task was lost or the run failed, 130 on Ctrl-C
and 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline, report
from demo.processes import log_tail
from demo.stack import KartonStack, StackError
from demo.supervisor import Generation, RestartLoop

IDENTITY = "memwatch-demo-leaky"

#: Seconds the consumer may take to start and register its bind.
BIND_TIMEOUT = 60.0


class DemoError(RuntimeError):
    """The demo could not run to the end."""


@dataclass
class Outcome:
    """Task counts and worker generations of one run, and the error that ended it early."""

    sent: int
    states: Counter[TaskState]
    generations: list[Generation]
    error: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description=(
            "Run a leaking karton consumer under memwatch on an embedded karton "
            "stack and show that it restarts without losing a task."
        ),
    )
    parser.add_argument(
        "--tasks", type=int, default=300, help="number of tasks to send (default 300)"
    )
    parser.add_argument(
        "--leak-kib",
        type=int,
        default=1024,
        help="memory leaked per task, in KiB (default 1024)",
    )
    parser.add_argument(
        "--extra-mb",
        type=float,
        default=40.0,
        help="restart once the RSS has grown this many MiB (default 40)",
    )
    parser.add_argument(
        "--mode",
        choices=["decorator", "implant"],
        default="decorator",
        help="guard with @restart_when or with implant_watcher (default decorator)",
    )
    parser.add_argument(
        "--exit-code",
        type=int,
        choices=[0, 1],
        default=0,
        help="exit status of a restarting worker (default 0)",
    )
    parser.add_argument(
        "--crash-every",
        type=int,
        default=0,
        help="make every Nth task raise ValueError; 0 never (default 0)",
    )
    parser.add_argument(
        "--resource-size",
        type=int,
        default=1024,
        help="size of each task's sample resource, in bytes (default 1024)",
    )
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=0.0,
        help="seconds between a worker's exit and its restart (default 0)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds the tasks may take to be done (default 120)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo-output"),
        help="folder for the chart and the logs (default demo-output/)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log the stack's and the loop's steps"
    )
    args = parser.parse_args(argv)

    if args.tasks < 1:
        parser.error(f"--tasks must be 1 or more, got {args.tasks}")
    if args.extra_mb is not None and args.extra_mb <= 0:
        parser.error(f"--extra-mb must be more than 0, got {args.extra_mb}")
    for option in ("leak_kib", "crash_every", "resource_size", "restart_delay"):
        if getattr(args, option) < 0:
            flag = "--" + option.replace("_", "-")
            parser.error(f"{flag} must be 0 or more, got {getattr(args, option)}")
    return args


class Progress:
    """Printer of one progress line a second while tasks are sent and processed."""

    def __init__(self, total: int, loop: RestartLoop) -> None:
        self.total = total
        self.loop = loop
        self.started_at = time.monotonic()
        self._printed_at = 0.0

    def sent(self, count: int) -> None:
        """Print the number of tasks sent so far, at most once a second."""
        if self._is_due() or count == self.total:
            self._print(f"tasks sent {count}/{self.total}")

    def __call__(self, states: Counter[TaskState]) -> None:
        """Print the counts, at most once a second, and check the workers.

        :raises DemoError: a worker exited without a memwatch decision
        """
        for generation in self.loop.generations:
            if generation.exit_code is not None and generation.decision is None:
                raise DemoError(
                    f"worker generation {generation.number} (pid {generation.pid}) "
                    f"exited with status {generation.exit_code} without a memwatch "
                    f"decision. End of {generation.log_path}:\n"
                    f"{log_tail(generation.log_path)}"
                )
        if self._is_due():
            done = states[TaskState.FINISHED] + states[TaskState.CRASHED]
            self._print(f"tasks done {done}/{self.total} (Crashed {states[TaskState.CRASHED]})")

    def _is_due(self) -> bool:
        return time.monotonic() - self._printed_at >= 1.0

    def _print(self, text: str) -> None:
        self._printed_at = time.monotonic()
        elapsed = self._printed_at - self.started_at
        print(f"[{elapsed:5.1f} s] {text}, restarts {self.loop.restarts}", flush=True)


def wait_for_consumer(backend: KartonBackend, loop: RestartLoop) -> None:
    """Wait for the consumer's bind, or raise with the end of the worker's log."""
    try:
        pipeline.wait_for_binds(backend, IDENTITY, BIND_TIMEOUT)
    except TimeoutError as error:
        generations = loop.generations
        tail = log_tail(generations[-1].log_path) if generations else "(no worker)"
        raise DemoError(f"{error}. End of the worker's log:\n{tail}") from error


def run(args: argparse.Namespace, logs: Path, rss_log: Path) -> Outcome:
    """Start everything, send the tasks, wait for them and stop everything."""
    with KartonStack(log_dir=logs) as stack:
        backend = KartonBackend(stack.config())
        argv = leaky_consumer.command(
            mode=args.mode,
            identity=IDENTITY,
            leak_kib=args.leak_kib,
            extra_mb=args.extra_mb,
            rss_log=rss_log.resolve(),
            exit_code=args.exit_code,
            crash_every=args.crash_every,
        )
        loop = RestartLoop(
            argv,
            logs,
            env=leaky_consumer.child_env(stack.env),
            cwd=stack.workdir,
            delay=args.restart_delay,
            wake=functools.partial(stack.unblock_clients, IDENTITY),
            name="leaky-consumer",
        )
        with loop:
            wait_for_consumer(backend, loop)
            progress = Progress(args.tasks, loop)
            task_uids = pipeline.send_tasks(
                stack.config(), args.tasks, args.resource_size, on_sent=progress.sent
            )
            outcome = Outcome(args.tasks, Counter(), [])
            try:
                outcome.states = pipeline.wait_until_done(
                    backend,
                    IDENTITY,
                    args.tasks,
                    args.timeout,
                    task_uids,
                    on_poll=progress,
                )
            except (TimeoutError, DemoError) as error:
                outcome.error = str(error)
                outcome.states = pipeline.count_states(backend, IDENTITY, task_uids)
        outcome.generations = loop.generations
    return outcome


def print_report(args: argparse.Namespace, outcome: Outcome, rss_log: Path) -> None:
    """Print the summary and draw the chart."""
    records = report.read_rss_log(rss_log)
    print()
    print(report.format_summary(outcome.sent, outcome.states, outcome.generations, records))
    if not records:
        print("no task was processed, so no chart was drawn")
        return
    if args.mode == "decorator":
        guard = f"@restart_when(extra_mb={args.extra_mb:g})"
    else:
        guard = f"implant_watcher(RestartRule(extra_consumed_megabytes={args.extra_mb:g}))"
    title = f"RSS after each task\n{args.leak_kib} KiB leaked per task, {guard}"
    chart = report.plot_rss(records, outcome.generations, args.output / "rss-per-task.png", title)
    print(f"chart: {chart}")


class Terminated(BaseException):
    """The demo got SIGTERM.

    A :class:`BaseException`, like :class:`KeyboardInterrupt`, so that no
    ``except Exception`` on the way swallows it.
    """


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # The exception unwinds the with-blocks, which stop every child process.
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _raise_terminated)

    logs = args.output / "logs"
    rss_log = args.output / "rss.jsonl"
    # Old worker logs and RSS lines would mix with this run's.
    shutil.rmtree(logs, ignore_errors=True)
    rss_log.unlink(missing_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)

    started_at = time.monotonic()
    try:
        outcome = run(args, logs, rss_log)
    except KeyboardInterrupt:
        print("\ninterrupted: every process of the demo was stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("got SIGTERM: every process of the demo was stopped", file=sys.stderr)
        return 143
    except (StackError, DemoError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1

    print_report(args, outcome, rss_log)
    print(f"run time: {time.monotonic() - started_at:.1f} s; logs in {logs}")
    if outcome.error is not None:
        print(f"demo failed: {outcome.error}", file=sys.stderr)
        return 1
    lost = pipeline.count_lost(outcome.sent, outcome.states)
    if lost > 0:
        print(f"{lost} tasks were lost", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
