"""Restart slots on the real karton stack: replicas of one identity restart K at a time.

The fleet tests run 4 replicas of one leaking consumer (``demo.leaky_consumer``),
each under its own ``demo.supervisor.RestartLoop``, with
``KARTON_MEMWATCH_MAX_CONCURRENT_RESTARTS=1``. The other tests call the
decision engine in this process against the stack's Redis.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from karton.core import Producer, Resource, Task
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline
from demo.processes import free_port
from demo.stack import KartonStack
from demo.supervisor import RestartDecision, RestartLoop
from memwatch import RestartBehavior, restart_slots, restart_when
from memwatch.behavior import Decision
from memwatch.checker import decide
from memwatch.config import (
    DEFAULT_RESTART_LEASE_SECONDS,
    MAX_CONCURRENT_RESTARTS,
    Settings,
    parse_options,
)
from memwatch.fleet import (
    DEFAULT_TTL_SECONDS,
    HANDOVER_VARIABLE,
    MAX_SLOTS,
    Lease,
    RestartLeases,
    lease_client,
    slot_key,
)
from memwatch.guard import Guard
from memwatch.memory import MIB
from memwatch.rules import Snapshot

pytestmark = pytest.mark.stack

#: Seconds to wait for the replicas to register or for all tasks to end.
DEADLINE = 120.0
REPLICAS = 4
#: Seconds between two samples of the replicas' state.
SAMPLE_SECONDS = 0.02
#: karton logs this once the service's bind is registered, right before its loop.
SERVING_LINE = "Binding on:"
#: memwatch's decision line, from which the replica takes no more tasks.
STOPPING_PATTERN = re.compile(r"restart rule \w+ tripped.*exiting with code \d+")


# Replicas under restart loops.


def start_replicas(
    stack: KartonStack, identity: str, logs: Path, env: dict[str, str], **consumer: object
) -> list[RestartLoop]:
    """Start REPLICAS restart loops of one consumer command, each with its own log files."""
    argv = leaky_consumer.command(identity=identity, rss_log=logs / "rss.jsonl", **consumer)  # type: ignore[arg-type]
    loops = [
        RestartLoop(
            argv,
            logs,
            env={**leaky_consumer.child_env(stack.env), **env},
            cwd=stack.workdir,
            wake=functools.partial(stack.unblock_clients, identity),
            name=f"replica-{number}",
        )
        for number in range(REPLICAS)
    ]
    for loop in loops:
        loop.start()
    return loops


def stop_replicas(loops: list[RestartLoop]) -> None:
    for loop in loops:
        loop.stop()


@dataclass
class ReplicaState:
    """What the monitor has read from one replica's current generation."""

    generation: int = 0
    offset: int = 0
    partial: str = ""
    serving: bool = False
    stopping: bool = False
    #: ``time.monotonic()`` when the monitor first saw the replica down, else ``None``.
    down_since: float | None = None


@dataclass
class DownMonitor:
    """Sample which replicas are down, every SAMPLE_SECONDS, in a background thread.

    A replica is down from memwatch's decision line in its log (it takes no
    more tasks) until the next generation has logged SERVING_LINE. Before every
    replica has served once, nothing is recorded.
    """

    loops: list[RestartLoop]
    max_down: int = 0
    #: (replica, seconds down) per completed down period.
    periods: list[tuple[int, float]] = field(default_factory=list)
    #: Samples with more than one replica down: (monotonic time, replicas down).
    overlaps: list[tuple[float, list[int]]] = field(default_factory=list)
    samples: int = 0
    all_serving: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._states = [ReplicaState() for _ in self.loops]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="down-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            down = [index for index, loop in enumerate(self.loops) if self._is_down(index, loop)]
            if not self.all_serving.is_set():
                if not down:
                    self.all_serving.set()
                continue
            self.samples += 1
            self.max_down = max(self.max_down, len(down))
            if len(down) > 1:
                self.overlaps.append((now, down))
            for index, state in enumerate(self._states):
                if index in down and state.down_since is None:
                    state.down_since = now
                elif index not in down and state.down_since is not None:
                    self.periods.append((index, now - state.down_since))
                    state.down_since = None

    def _is_down(self, index: int, loop: RestartLoop) -> bool:
        generations = loop.generations
        if not generations:
            return True
        current = generations[-1]
        state = self._states[index]
        if state.generation != current.number:
            down_since = state.down_since
            state = self._states[index] = ReplicaState(current.number, down_since=down_since)
        if current.exit_code is not None:
            return True
        self._read_new_lines(current.log_path, state)
        return state.stopping or not state.serving

    @staticmethod
    def _read_new_lines(path: Path, state: ReplicaState) -> None:
        try:
            with path.open("rb") as log_file:
                log_file.seek(state.offset)
                chunk = log_file.read()
        except FileNotFoundError:
            return
        state.offset += len(chunk)
        lines = (state.partial + chunk.decode("utf-8", errors="replace")).split("\n")
        state.partial = lines.pop()
        for line in lines:
            if SERVING_LINE in line:
                state.serving = True
            if STOPPING_PATTERN.search(line):
                state.stopping = True


def count_lines(loops: list[RestartLoop], text: str) -> int:
    total = 0
    for loop in loops:
        for generation in loop.generations:
            log = generation.log_path.read_text(encoding="utf-8", errors="replace")
            total += log.count(text)
    return total


@pytest.fixture
def stack_redis(karton_stack: KartonStack) -> Iterator[redis.Redis]:
    client = redis.Redis(
        host="127.0.0.1", port=karton_stack.redis_port, decode_responses=True, socket_timeout=5
    )
    yield client
    client.close()


def test_fleet_restarts_one_replica_at_a_time(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 1000
    # A restart took 0.4 to 1.7 s from the decision to the new process's binds,
    # with 4 replicas on 2 cores. The slot must cover it, or two replicas are down.
    lease_seconds = 5
    env = {
        "KARTON_MEMWATCH_MAX_CONCURRENT_RESTARTS": "1",
        "KARTON_MEMWATCH_RESTART_LEASE_SECONDS": str(lease_seconds),
    }
    started = time.monotonic()
    loops = start_replicas(
        karton_stack,
        consumer_identity,
        worker_logs,
        env,
        mode="decorator",
        leak_kib=512,
        extra_mb=24,
        # About 25 s of work in all, so that several slots expire during the test.
        sleep=0.1,
    )
    monitor = DownMonitor(loops)
    monitor.start()
    try:
        assert monitor.all_serving.wait(DEADLINE), "the replicas did not all start serving"
        pipeline.wait_for_binds(karton_backend, consumer_identity, DEADLINE)
        task_uids = pipeline.send_tasks(karton_stack.config(), sent, 64)
        states = pipeline.wait_until_done(
            karton_backend, consumer_identity, sent, DEADLINE, task_uids
        )
    finally:
        monitor.stop()
        stop_replicas(loops)
    elapsed = time.monotonic() - started

    restarts = sum(loop.restarts for loop in loops)
    deferred = count_lines(loops, "restart deferred: all 1 restart slots")
    taken_late = count_lines(loops, "after the restart was deferred for")
    downs = sorted(seconds for _, seconds in monitor.periods)
    summary = (
        f"{elapsed:.1f} s, {monitor.samples} samples, max down {monitor.max_down}, "
        f"{restarts} restarts, {deferred} deferrals, down periods {downs}"
    )
    print(summary)

    assert pipeline.count_lost(sent, states) == 0, summary
    assert states[TaskState.FINISHED] == sent, summary
    assert monitor.overlaps == [], summary
    assert monitor.max_down <= 1, summary
    # The monitor saw the restarts, so max_down <= 1 was measured, not missed.
    assert monitor.max_down == 1, summary
    assert restarts >= 3, summary
    assert deferred >= 1, summary
    assert taken_late >= 1, summary
    for loop in loops:
        for generation in loop.generations[:-1]:
            assert generation.decision == RestartDecision("extra_mb", 0), generation.log_path


def test_killed_holder_blocks_only_until_expiry(
    karton_stack: KartonStack,
    consumer_identity: str,
    worker_logs: Path,
    stack_redis: redis.Redis,
) -> None:
    lease_seconds = 3.0
    env = {
        "KARTON_MEMWATCH_MAX_CONCURRENT_RESTARTS": "1",
        "KARTON_MEMWATCH_RESTART_LEASE_SECONDS": str(lease_seconds),
    }
    # An async consumer drains its tasks in flight after its decision, so a
    # replica holds the slot for up to --sleep seconds before it exits. Tasks
    # sent one at a time start at different times, so the drain is not empty.
    loops = start_replicas(
        karton_stack,
        consumer_identity,
        worker_logs,
        env,
        mode="async",
        leak_kib=0,
        extra_mb=None,
        max_tasks=3,
        sleep=2.0,
        concurrency=2,
    )
    key = slot_key(consumer_identity, 0)
    sending = threading.Event()
    sending.set()
    sender = threading.Thread(
        target=send_slowly, args=(karton_stack, sending), name="sender", daemon=True
    )
    try:
        for loop in loops:
            loop.wait_for_generation(1, DEADLINE)
        sender.start()
        killed_token, killed_taken, killed_pid = kill_a_holder(
            stack_redis, key, loops, lease_seconds
        )
        next_token, next_taken = wait_for_holder(stack_redis, key, killed_token, lease_seconds)
    finally:
        sending.clear()
        sender.join(DEADLINE)
        stop_replicas(loops)

    waited = next_taken - killed_taken
    print(f"slot taken by {killed_token}, killed; next holder {next_token} after {waited:.2f} s")
    assert next_token.split(":")[1] != str(killed_pid)
    # No replica can take the slot before it expires, and a waiting replica
    # tries again at most a second after its next task ends.
    assert waited >= lease_seconds - 0.1
    assert waited <= lease_seconds + 2.5


def send_slowly(stack: KartonStack, sending: threading.Event) -> None:
    """Send a task every 0.3 s while ``sending`` is set, at most 200."""
    producer = Producer(config=stack.config(), identity="memwatch-fleet-test-producer")
    for index in range(200):
        if not sending.is_set():
            return
        task = Task(
            headers={"type": pipeline.TASK_TYPE},
            payload={"sample": Resource("sample", b"sample"), "index": index},
        )
        producer.send_task(task)
        time.sleep(0.3)


def kill_a_holder(
    client: redis.Redis, key: str, loops: list[RestartLoop], ttl: float
) -> tuple[str, float, int]:
    """SIGKILL the replica that holds the slot, before it exits by itself.

    A holder whose drain was too short to catch has exited by itself; then
    the next holder is tried.

    :return: the killed holder's token, when it took the slot, and its PID
    """
    previous = None
    for _ in range(6):
        token, taken = wait_for_holder(client, key, previous, ttl)
        previous = token
        pid = int(token.split(":")[1])
        holder = [
            (loop, generation)
            for loop in loops
            for generation in loop.generations
            if generation.pid == pid
        ]
        if not holder:
            continue
        loop, generation = holder[0]
        if generation.exit_code is not None:
            continue
        # The restart loop reaps its child only after recording its exit, so a
        # PID whose exit is not recorded yet is still that replica's.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if loop.wait_for_exit(generation.number, 10).exit_code == -signal.SIGKILL:
            return token, taken, pid
    raise AssertionError("every holder of the slot exited before the test could kill it")


def wait_for_holder(
    client: redis.Redis, key: str, previous: str | None, ttl: float
) -> tuple[str, float]:
    """Wait until ``key`` contains a token other than ``previous``.

    :return: the token and the ``time.monotonic()`` at which it was taken,
        computed from the key's remaining expiry
    """
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        reads = client.pipeline()
        reads.get(key)
        reads.pttl(key)
        token, pttl = reads.execute()
        now = time.monotonic()
        if token and token != previous and pttl > 0:
            return str(token), now - (ttl - pttl / 1000)
        time.sleep(0.01)
    raise TimeoutError(f"no new holder of {key} within {DEADLINE} s (previous {previous})")


def test_reexec_releases_handed_slot(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
    stack_redis: redis.Redis,
) -> None:
    sent = 12
    env = {"KARTON_MEMWATCH_MAX_CONCURRENT_RESTARTS": "1"}
    loop = RestartLoop(
        leaky_consumer.command(
            mode="decorator",
            identity=consumer_identity,
            leak_kib=0,
            extra_mb=None,
            max_tasks=5,
            rss_log=worker_logs / "rss.jsonl",
            reexec_in_place=True,
        ),
        worker_logs,
        env={**leaky_consumer.child_env(karton_stack.env), **env},
        cwd=karton_stack.workdir,
        wake=functools.partial(karton_stack.unblock_clients, consumer_identity),
    )
    with loop:
        pipeline.wait_for_binds(karton_backend, consumer_identity, DEADLINE)
        task_uids = pipeline.send_tasks(karton_stack.config(), sent, 64)
        states = pipeline.wait_until_done(
            karton_backend, consumer_identity, sent, DEADLINE, task_uids
        )
        # The default lease lasts 30 s: a free slot now means the new image released it.
        remaining = stack_redis.pttl(slot_key(consumer_identity, 0))
    log = loop.generations[0].log_path.read_text(encoding="utf-8", errors="replace")

    assert states[TaskState.FINISHED] == sent
    assert len(loop.generations) == 1, "re-executing keeps the process"
    assert log.count("took restart slot") == 2
    assert log.count("which the previous image took before re-executing") == 2
    assert remaining == -2, "the slot key still exists"


# The decision engine against the stack's Redis, in this process.


def slot_guard(
    stack: KartonStack, identity: str, ttl: float = 30.0, **limits: object
) -> tuple[Guard, logging.Logger]:
    """Build a guard whose restart slots live in the stack's Redis, as a service's would."""
    settings = Settings(
        limits=limits,
        reclaim=False,
        min_lifetime_seconds=0,
        max_concurrent_restarts=1,
        restart_lease_seconds=ttl,
    )
    guard = Guard(settings, name="process")
    logger = logging.getLogger(f"memwatch-test.{identity}")
    service = types.SimpleNamespace(identity=identity, config=stack.config())
    restart_slots.setup(service, guard, logger)
    assert guard.tracker.slots.leases is not None
    return guard, logger


def other_replica(stack: KartonStack, identity: str) -> RestartLeases:
    client = lease_client({"host": "127.0.0.1", "port": stack.redis_port})
    return RestartLeases(client, identity, 1, 30.0)


def snapshot(tasks: int, rss_mib: float = 100.0) -> Snapshot:
    return Snapshot(tasks=tasks, uptime=1.0, rss=int(rss_mib * MIB), baseline=int(50 * MIB))


def test_busy_slot_defers_then_restarts(
    karton_stack: KartonStack,
    consumer_identity: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(restart_slots, "RETRY_SECONDS", 0.2)
    guard, logger = slot_guard(karton_stack, consumer_identity, max_tasks=5)
    other = other_replica(karton_stack, consumer_identity)
    other_lease = other.try_acquire()
    assert isinstance(other_lease, Lease)
    caplog.set_level(logging.INFO, logger=logger.name)

    assert decide(guard, snapshot(5), False, False, logger) is None
    assert decide(guard, snapshot(6), False, False, logger) is None
    deferred = [r.message for r in caplog.records if "restart deferred" in r.message]
    assert len(deferred) == 1
    assert "all 1 restart slots of" in deferred[0]
    assert guard.tracker.deferrals == 1
    assert guard.stats().deferrals == 1

    assert other.release(other_lease)
    # Within RETRY_SECONDS of the last attempt the slot is not tried again.
    assert decide(guard, snapshot(7), False, False, logger) is None
    time.sleep(0.25)
    decision = decide(guard, snapshot(9), False, False, logger)

    assert isinstance(decision, Decision)
    assert decision.rule == "max_tasks"
    assert other.holders() == [guard.tracker.slots.leases.token]  # type: ignore[union-attr]
    slot_lines = [r.message for r in caplog.records if "took restart slot" in r.message]
    assert len(slot_lines) == 1
    assert "after the restart was deferred for" in slot_lines[0]
    assert "and 4 tasks" in slot_lines[0]
    assert guard.tracker.deferrals == 1


def test_hard_limit_restarts_without_slot(
    karton_stack: KartonStack, consumer_identity: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard, logger = slot_guard(karton_stack, consumer_identity, max_rss_mb=80)
    other = other_replica(karton_stack, consumer_identity)
    assert isinstance(other.try_acquire(), Lease)

    decision = decide(guard, snapshot(3, rss_mib=100), False, False, logger)

    assert isinstance(decision, Decision)
    assert decision.rule == "max_rss_mb"
    assert guard.tracker.deferrals == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_rss_mb is a hard limit" in warnings[0].message


def test_hard_limit_takes_free_slot(karton_stack: KartonStack, consumer_identity: str) -> None:
    guard, logger = slot_guard(karton_stack, consumer_identity, max_rss_mb=80)

    decision = decide(guard, snapshot(3, rss_mib=100), False, False, logger)

    assert isinstance(decision, Decision)
    leases = guard.tracker.slots.leases
    assert leases is not None
    assert leases.holders() == [leases.token]


def test_unreachable_redis_restarts_anyway(
    karton_stack: KartonStack, consumer_identity: str, caplog: pytest.LogCaptureFixture
) -> None:
    guard, logger = slot_guard(karton_stack, consumer_identity, max_tasks=2)
    # A port with no listener: the connection is refused at once.
    client = lease_client({"host": "127.0.0.1", "port": free_port()})
    guard.tracker.slots.leases = RestartLeases(client, consumer_identity, 1)

    decision = decide(guard, snapshot(2), False, False, logger)

    assert isinstance(decision, Decision)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot take a restart slot" in warnings[0]
    assert "restarting without one" in warnings[0]


def test_reexec_decision_hands_slot_over(
    karton_stack: KartonStack, consumer_identity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HANDOVER_VARIABLE, raising=False)
    guard, logger = slot_guard(karton_stack, consumer_identity, max_tasks=1)
    guard.behavior = RestartBehavior.REEXEC

    assert decide(guard, snapshot(1), False, False, logger) is not None
    handed = Lease.from_json(os.environ[HANDOVER_VARIABLE])

    # The next image: setup takes the variable, the loop's first turn releases the slot.
    next_image, _ = slot_guard(karton_stack, consumer_identity, max_tasks=1)
    assert HANDOVER_VARIABLE not in os.environ
    assert next_image.tracker.slots.handover == handed
    restart_slots.release_handover(next_image, logger)
    leases = next_image.tracker.slots.leases
    assert leases is not None
    assert leases.holders() == []


def test_option_ignored_outside_karton(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("memwatch-test.plain")
    caplog.set_level(logging.INFO, logger=logger.name)

    @restart_when(max_tasks=1000, max_concurrent_restarts=2, logger=logger)
    def work() -> int:
        return 1

    assert work() == 1
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_concurrent_restarts=2 is ignored for" in warnings[0]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_concurrent_restarts", "3", 3),
        ("max_concurrent_restarts", "off", None),
        ("restart_lease_seconds", "2.5", 2.5),
    ],
)
def test_options_parse(name: str, value: str, expected: object) -> None:
    assert parse_options({name: value}, environment_variable) == {name: expected}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_concurrent_restarts", "0"),
        ("max_concurrent_restarts", "1.5"),
        ("max_concurrent_restarts", str(MAX_CONCURRENT_RESTARTS + 1)),
        ("restart_lease_seconds", "0"),
        ("restart_lease_seconds", "inf"),
        ("restart_lease_seconds", "off"),
    ],
)
def test_options_reject_invalid(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"KARTON_MEMWATCH_{name.upper()} = '{value}' is invalid"):
        parse_options({name: value}, environment_variable)


def environment_variable(name: str) -> str:
    return f"KARTON_MEMWATCH_{name.upper()}"


def test_decorator_rejects_bad_slot_count() -> None:
    with pytest.raises(ValueError, match="max_concurrent_restarts"):
        restart_when(max_tasks=1, max_concurrent_restarts=0)
    with pytest.raises(TypeError, match="max_concurrent_restarts"):
        restart_when(max_tasks=1, max_concurrent_restarts=True)


def test_defaults_match_fleet() -> None:
    assert DEFAULT_RESTART_LEASE_SECONDS == DEFAULT_TTL_SECONDS
    assert MAX_CONCURRENT_RESTARTS == MAX_SLOTS
