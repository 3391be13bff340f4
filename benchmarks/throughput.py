"""Throughput of the demo's consumer on the real karton stack, unguarded and guarded.

Both consumers run the same ``process``: download a small sample and append one
line with the RSS to a log. The guarded one has ``@restart_when(max_tasks=N,
extra_mb=1e9)`` on it, so it exits after every ``N`` tasks. A restart loop, like
systemd's ``Restart=always``, then starts it again.

One round:

1. Start both consumers until karton lists their binds, then stop them. The
   binds stay registered, so karton-system routes every task to both queues.
2. Send the tasks once and wait until both queues hold all of them, so that
   neither the producer nor karton-system's routing limits the consumers.
3. Run each consumer alone (the order alternates between rounds) under a
   restart loop until it has processed every task, then read the final task
   states from Redis.

The throughput is measured from the end of the first task to the end of the
last, as the consumers log them, so the first start-up of each consumer is left
out and every restart of the guarded one counts.
"""

from __future__ import annotations

import functools
import itertools
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from karton.core.backend import KartonBackend

from benchmarks.stats import Summary, summarize
from benchmarks.subjects import NEVER
from demo import leaky_consumer, pipeline
from demo.report import RssRecord, read_rss_log
from demo.stack import KartonStack
from demo.supervisor import RestartLoop

logger = logging.getLogger("benchmarks.throughput")

VARIANTS = ("unguarded", "guarded")

#: Seconds a consumer may take to start and register its bind.
BIND_TIMEOUT = 60.0
#: Seconds between two looks at a consumer's progress.
POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class ConsumerRun:
    """One consumer's pass over every task of a round."""

    variant: str
    sent: int
    #: Routed copies by final state (``Finished``, ``Crashed``, ...).
    states: dict[str, int]
    lost: int
    #: Worker processes that exited because a memwatch rule tripped.
    restarts: int
    #: Wall-clock times at which the first and the last task ended.
    first_done: float
    last_done: float
    #: Seconds from the last task of one worker process to the first task of the next.
    gaps: list[float]

    @property
    def tasks_per_second(self) -> float:
        """Tasks per second from the end of the first task to the end of the last."""
        return (self.sent - 1) / (self.last_done - self.first_done)

    @property
    def busy_tasks_per_second(self) -> float:
        """Tasks per second while a worker process was serving the queue: gaps left out."""
        intervals = self.sent - 1 - len(self.gaps)
        return intervals / (self.last_done - self.first_done - sum(self.gaps))


@dataclass(frozen=True)
class StackRound:
    """Both consumers' runs in one round."""

    number: int
    runs: dict[str, ConsumerRun]

    @property
    def ratio(self) -> float:
        """Guarded throughput divided by unguarded throughput."""
        return self.runs["guarded"].tasks_per_second / self.runs["unguarded"].tasks_per_second


@dataclass(frozen=True)
class StackResult:
    """Every round, and the start-up costs that make up a restart."""

    tasks: int
    restart_every: int
    rounds: list[StackRound]
    #: Seconds from a new interpreter's start to its exit, for each of :data:`START_UP_STEPS`.
    start_up: dict[str, Summary]


def consumer_command(variant: str, identity: str, rss_log: Path, restart_every: int) -> list[str]:
    """Return the command line of the ``unguarded`` or ``guarded`` consumer."""
    if variant == "unguarded":
        return leaky_consumer.command(
            mode="plain", identity=identity, leak_kib=0, extra_mb=None, rss_log=rss_log
        )
    return leaky_consumer.command(
        mode="decorator",
        identity=identity,
        leak_kib=0,
        extra_mb=NEVER,
        rss_log=rss_log,
        max_tasks=restart_every,
    )


def queued_tasks(backend: KartonBackend, identity: str) -> int:
    """Return how many tasks wait in the queues of ``identity``."""
    return sum(int(backend.redis.llen(name)) for name in backend.get_queue_names(identity))


def wait_for_queues(backend: KartonBackend, identities: Sequence[str], count: int) -> None:
    """Wait until each identity's queues hold ``count`` tasks.

    :raises TimeoutError: when karton-system has not routed them within 120 s
    """
    deadline = time.monotonic() + 120.0
    while True:
        queued = {identity: queued_tasks(backend, identity) for identity in identities}
        if all(number >= count for number in queued.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after 120 s waiting for karton-system to route {count} tasks to "
                f"every consumer (tasks queued by identity: {queued})"
            )
        time.sleep(0.2)


def count_lines(path: Path) -> int:
    """Return the number of complete lines in ``path``, 0 when it does not exist."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def restart_gaps(records: Sequence[RssRecord]) -> list[float]:
    """Return the seconds from each worker process's last task to the next one's first."""
    by_pid: dict[int, list[float]] = {}
    for record in records:
        by_pid.setdefault(record.pid, []).append(record.time)
    spans = sorted((min(times), max(times)) for times in by_pid.values())
    return [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)]


class StackBenchmark:
    """Runner of the benchmark's rounds on one karton stack.

    :param stack: a started :class:`~demo.stack.KartonStack`
    :param output: folder for the workers' logs
    """

    def __init__(
        self,
        stack: KartonStack,
        output: Path,
        tasks: int,
        restart_every: int,
        resource_size: int,
    ) -> None:
        self.stack = stack
        self.backend = KartonBackend(stack.config())
        self.output = output
        self.tasks = tasks
        self.restart_every = restart_every
        self.resource_size = resource_size
        #: Seconds all tasks of a consumer may take, about 15 times what 1,000 tasks
        #: took the guarded consumer on 2 busy cores.
        self.timeout = 120.0 + 0.25 * tasks

    def _loop(self, variant: str, identity: str, folder: Path) -> RestartLoop:
        argv = consumer_command(variant, identity, folder / "rss.jsonl", self.restart_every)
        return RestartLoop(
            argv,
            folder,
            env=leaky_consumer.child_env(self.stack.env),
            cwd=self.stack.workdir,
            wake=functools.partial(self.stack.unblock_clients, identity),
            name=variant,
        )

    def run_round(self, number: int) -> StackRound:
        """Register both consumers, fill their queues, and run each over every task."""
        folder = self.output / f"round-{number}"
        identities = {v: f"memwatch-bench-{v}-{uuid.uuid4().hex[:8]}" for v in VARIANTS}

        logger.info("round %d: registering the consumers' binds", number)
        loops = [self._loop(v, identities[v], folder / f"{v}-register") for v in VARIANTS]
        for loop in loops:
            loop.start()
        try:
            for identity in identities.values():
                pipeline.wait_for_binds(self.backend, identity, BIND_TIMEOUT)
        finally:
            for loop in loops:
                loop.stop()

        logger.info("round %d: sending %d tasks", number, self.tasks)
        task_uids = pipeline.send_tasks(self.stack.config(), self.tasks, self.resource_size)
        wait_for_queues(self.backend, list(identities.values()), self.tasks)

        order = VARIANTS if number % 2 else tuple(reversed(VARIANTS))
        runs = {}
        for variant in order:
            logger.info("round %d: running the %s consumer", number, variant)
            runs[variant] = self._run_consumer(
                variant, identities[variant], folder / variant, task_uids
            )
        for identity in identities.values():
            self.backend.unregister_bind(identity)
        return StackRound(number, runs)

    def _run_consumer(
        self, variant: str, identity: str, folder: Path, task_uids: list[str]
    ) -> ConsumerRun:
        rss_log = folder / "rss.jsonl"
        loop = self._loop(variant, identity, folder)
        deadline = time.monotonic() + self.timeout
        with loop:
            while count_lines(rss_log) < self.tasks:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"timed out after {self.timeout} s: the {variant} consumer processed "
                        f"{count_lines(rss_log)} of {self.tasks} tasks; its logs are in {folder}"
                    )
                time.sleep(POLL_INTERVAL)
            states = pipeline.wait_until_done(
                self.backend, identity, self.tasks, self.timeout, task_uids
            )
        records = read_rss_log(rss_log)
        restarts = sum(1 for generation in loop.generations if generation.decision is not None)
        return ConsumerRun(
            variant=variant,
            sent=self.tasks,
            states={state.value: count for state, count in states.items()},
            lost=pipeline.count_lost(self.tasks, states),
            restarts=restarts,
            first_done=records[0].time,
            last_done=records[-1].time,
            gaps=restart_gaps(records),
        )


#: Python code run by each start-up step: a restart pays for all of them, and more.
START_UP_STEPS = {
    "interpreter": "pass",
    "import": "import demo.leaky_consumer",
    "construct": (
        "from pathlib import Path; from demo.leaky_consumer import LeakyConsumer; "
        "LeakyConsumer('memwatch-bench-start-up', 0, Path('unused.jsonl'))"
    ),
}


def time_start_up(argv: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    """Return the seconds ``argv`` takes from start to exit."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure_start_up(stack: KartonStack, repeats: int) -> dict[str, Summary]:
    """Time each of :data:`START_UP_STEPS` from the start of a new interpreter to its exit.

    :return: seconds, by step
    """
    env = leaky_consumer.child_env(stack.env)
    seconds: dict[str, list[float]] = {step: [] for step in START_UP_STEPS}
    for _ in range(repeats):
        for step, code in START_UP_STEPS.items():
            seconds[step].append(time_start_up([sys.executable, "-c", code], env, stack.workdir))
    return {step: summarize(values) for step, values in seconds.items()}


def run_stack_benchmark(
    output: Path,
    *,
    tasks: int,
    restart_every: int,
    rounds: int,
    resource_size: int = 1024,
) -> StackResult:
    """Start a karton stack, run ``rounds`` rounds on it, and stop it.

    :param output: folder for the stack's and the workers' logs
    """
    with KartonStack(log_dir=output / "stack") as stack:
        benchmark = StackBenchmark(stack, output, tasks, restart_every, resource_size)
        finished = [benchmark.run_round(number) for number in range(1, rounds + 1)]
        start_up = measure_start_up(stack, repeats=5)
    return StackResult(tasks, restart_every, finished, start_up)
