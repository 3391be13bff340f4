"""A karton consumer that leaks memory on every task, guarded by memwatch.

Run it as ``python -m demo.leaky_consumer`` with the karton settings in the
environment (``KARTON_*`` variables, see :attr:`demo.stack.KartonStack.env`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
from karton.core import Consumer, Task

from demo.pipeline import TASK_TYPE
from memwatch import RestartBehavior, RestartRule, implant_watcher, restart_when
from memwatch.reexec import generation

#: Memory kept alive for the whole process: the leak.
_leaked: list[bytearray] = []


class LeakyConsumer(Consumer):
    """Leak a fixed amount of memory per task and log the RSS after each task.

    :param identity: karton identity of the service
    :param leak_kib: KiB kept alive after every task
    :param rss_log: file to which one JSON line per task is appended
    :param crash_every: raise :class:`ValueError` on every task whose
        ``index`` payload plus one is a multiple of this, or, for tasks without
        an ``index``, whose count in this process is; 0 never raises
    """

    filters = [{"type": TASK_TYPE}]  # noqa: RUF012 (karton reads a class attribute)

    def __init__(self, identity: str, leak_kib: int, rss_log: Path, crash_every: int = 0) -> None:
        super().__init__(identity=identity)
        self.leak_kib = leak_kib
        self.rss_log = rss_log
        self.crash_every = crash_every
        self._process_info = psutil.Process()
        self._tasks_seen = 0
        #: Seconds each task takes after its leak, to keep tasks in flight for a while.
        self.sleep = 0.0

    def process(self, task: Task) -> None:
        """Read the sample, leak memory, log the RSS, and maybe raise."""
        self._tasks_seen += 1
        sample = task.get_resource("sample").content
        # Every byte is written, so the pages count in the RSS at once. An
        # untouched bytes(n) may stay unbacked zero pages.
        _leaked.append(bytearray(b"\x01") * (self.leak_kib * 1024))

        index = task.get_payload("index")
        position = index + 1 if isinstance(index, int) else self._tasks_seen
        raises = self.crash_every > 0 and position % self.crash_every == 0
        if self.sleep:
            time.sleep(self.sleep)
        self._log_rss(task, len(sample), raises)
        if raises:
            raise ValueError(
                f"task {task.task_uid} (index {index}) raised on purpose, "
                f"because --crash-every is {self.crash_every}"
            )

    def _log_rss(self, task: Task, sample_size: int, raises: bool) -> None:
        record = {
            "pid": os.getpid(),
            "task_uid": task.task_uid,
            "index": task.get_payload("index"),
            "rss": self._process_info.memory_info().rss,
            "time": time.time(),
            "sample_size": sample_size,
            "raised": raises,
            # Re-executed images keep the PID; these tell them apart and show that
            # no descriptor leaks from one image into the next.
            "generation": generation(),
            "open_fds": len(os.listdir("/proc/self/fd")),
        }
        # Appending each line in one write() call keeps the lines of worker
        # processes that run at once apart, on a local file system.
        with self.rss_log.open("a", encoding="utf-8") as rss_file:
            rss_file.write(json.dumps(record) + "\n")


def guarded_by_decorator(
    extra_mb: float | None,
    behavior: RestartBehavior,
    max_tasks: int | None = None,
    max_seconds: float | None = None,
) -> type[LeakyConsumer]:
    """Return a subclass whose ``process`` is guarded by :func:`memwatch.restart_when`.

    The limits come from the command line, so the class is built at start-up.
    """

    class DecoratedLeakyConsumer(LeakyConsumer):
        @restart_when(
            extra_mb=extra_mb, max_tasks=max_tasks, max_seconds=max_seconds, behavior=behavior
        )
        def process(self, task: Task) -> None:
            super().process(task)

    return DecoratedLeakyConsumer


def command(
    *,
    mode: str,
    identity: str,
    leak_kib: int,
    extra_mb: float | None,
    rss_log: Path,
    exit_code: int = 0,
    reexec_in_place: bool = False,
    crash_every: int = 0,
    max_tasks: int | None = None,
    max_seconds: float | None = None,
    sleep: float = 0.0,
    concurrency: int = 1,
) -> list[str]:
    """Return the command line that runs this consumer in a new interpreter.

    Run it with :func:`child_env`, because the ``demo`` package is not
    installed and the stack's working folder is elsewhere.
    """
    argv = [
        sys.executable,
        "-m",
        "demo.leaky_consumer",
        f"--mode={mode}",
        f"--identity={identity}",
        f"--leak-kib={leak_kib}",
        f"--rss-log={rss_log}",
        f"--exit-code={exit_code}",
        *(["--reexec"] if reexec_in_place else []),
        f"--crash-every={crash_every}",
    ]
    if extra_mb is not None:
        argv.append(f"--extra-mb={extra_mb}")
    if max_tasks is not None:
        argv.append(f"--max-tasks={max_tasks}")
    if max_seconds is not None:
        argv.append(f"--max-seconds={max_seconds}")
    if sleep:
        argv.append(f"--sleep={sleep}")
    if concurrency != 1:
        argv.append(f"--concurrency={concurrency}")
    return argv


def child_env(env: dict[str, str]) -> dict[str, str]:
    """Return a copy of ``env`` whose ``PYTHONPATH`` starts with the folder of ``demo``."""
    source_root = str(Path(__file__).resolve().parent.parent)
    python_path = env.get("PYTHONPATH")
    child = dict(env)
    child["PYTHONPATH"] = (
        source_root if not python_path else os.pathsep.join([source_root, python_path])
    )
    return child


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the leaking consumer."""
    parser = argparse.ArgumentParser(
        prog="python -m demo.leaky_consumer",
        description="Run a karton consumer that leaks memory and is guarded by memwatch.",
    )
    parser.add_argument(
        "--mode",
        choices=["decorator", "implant", "async", "plain"],
        required=True,
        help=(
            "guard process() with @restart_when, use implant_watcher(), run an "
            "async consumer (karton.core.asyncio) whose async process() is guarded, "
            "or run the consumer unguarded (plain), as a reference for benchmarks"
        ),
    )
    parser.add_argument(
        "--leak-kib", type=int, required=True, help="memory leaked per task, in KiB"
    )
    parser.add_argument(
        "--extra-mb",
        type=float,
        help="restart once the RSS has grown this many MiB over the baseline",
    )
    parser.add_argument(
        "--max-tasks", type=int, help="restart after this many tasks in one process"
    )
    parser.add_argument(
        "--reexec",
        action="store_true",
        help="restart in place (RestartBehavior.REEXEC) instead of exiting",
    )
    parser.add_argument(
        "--max-seconds", type=float, help="restart after this many seconds in one process"
    )
    parser.add_argument(
        "--sleep", type=float, default=0.0, help="seconds each task takes, after its leak"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="tasks an async consumer runs at once (karton's concurrency_limit)",
    )
    parser.add_argument(
        "--exit-code",
        type=int,
        choices=[0, 1],
        default=0,
        help="exit status on restart: 0 (RestartBehavior.EXIT_0) or 1 (EXIT_1)",
    )
    parser.add_argument("--identity", required=True, help="karton identity")
    parser.add_argument(
        "--rss-log",
        type=Path,
        required=True,
        help="file to which one JSON line per task is appended",
    )
    parser.add_argument(
        "--crash-every",
        type=int,
        default=0,
        help="raise ValueError on every Nth task, by task index; 0 never raises",
    )
    args = parser.parse_args(argv)

    if args.leak_kib < 0:
        parser.error(f"--leak-kib must be 0 or more, got {args.leak_kib}")
    if args.crash_every < 0:
        parser.error(f"--crash-every must be 0 or more, got {args.crash_every}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build the consumer from the command line and run its loop until SIGTERM."""
    args = parse_args(argv)
    behavior = RestartBehavior.EXIT_0 if args.exit_code == 0 else RestartBehavior.EXIT_1
    if args.reexec:
        behavior = RestartBehavior.REEXEC

    if args.mode == "async":
        from demo.async_consumer import run_async_consumer

        run_async_consumer(args, behavior)
        return

    consumer: LeakyConsumer
    if args.mode == "plain":
        consumer = LeakyConsumer(args.identity, args.leak_kib, args.rss_log, args.crash_every)
    elif args.mode == "decorator":
        consumer_class = guarded_by_decorator(
            args.extra_mb, behavior, args.max_tasks, args.max_seconds
        )
        consumer = consumer_class(args.identity, args.leak_kib, args.rss_log, args.crash_every)
    else:
        consumer = LeakyConsumer(args.identity, args.leak_kib, args.rss_log, args.crash_every)
        rule = RestartRule(
            extra_consumed_megabytes=args.extra_mb,
            proceed_tasks=args.max_tasks,
            elapsed_time=args.max_seconds,
            restart_behavior=behavior,
        )
        implant_watcher(consumer, rule)
    consumer.sleep = args.sleep
    consumer.loop()


if __name__ == "__main__":
    main()
