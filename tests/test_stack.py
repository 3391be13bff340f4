"""Tests of the demo harness: the karton stack, the restart loop and the pipeline helpers."""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline, stack
from demo.stack import KartonStack, StackError
from demo.supervisor import RestartDecision, RestartLoop, read_decision

#: Seconds a test waits for a process to start or exit before it fails.
DEADLINE = 30.0


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for_text(path: Path, text: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def producer_copies_finished(backend: KartonBackend, root_uids: list[str]) -> bool:
    """Return whether karton-system has routed every task, which marks it Finished."""
    states = [
        task.status
        for task in backend.iter_all_tasks(parse_resources=False)
        if task.root_uid in root_uids and task.receiver is None
    ]
    return len(states) == len(root_uids) and all(state == TaskState.FINISHED for state in states)


@pytest.mark.stack
def test_stack_services_answer(karton_stack: KartonStack, karton_backend: KartonBackend) -> None:
    assert karton_backend.redis.ping()
    assert karton_backend.check_bucket_exists(karton_stack.bucket)
    online = {service.identity for service in karton_backend.get_online_services()}
    assert stack.SYSTEM_IDENTITY in online


@pytest.mark.stack
def test_stack_config_and_env_agree(karton_stack: KartonStack) -> None:
    config = karton_stack.config()
    env = karton_stack.env

    assert config.get("redis", "port") == env["KARTON_REDIS_PORT"]
    assert config.get("redis", "port") == str(karton_stack.redis_port)
    assert config.get("s3", "address") == env["KARTON_S3_ADDRESS"]
    assert config.get("s3", "bucket") == env["KARTON_S3_BUCKET"]
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert (karton_stack.workdir / "karton.ini").is_file()


@pytest.mark.stack
def test_stack_leaves_os_environ_alone(karton_stack: KartonStack) -> None:
    before = dict(os.environ)

    karton_stack.config()
    karton_stack.env  # noqa: B018 (the property builds a new dict each time)

    assert dict(os.environ) == before


@pytest.mark.stack
def test_stack_stop_leaves_no_process(tmp_path: Path) -> None:
    karton = KartonStack(log_dir=tmp_path)
    karton.start()
    pids = karton.pids
    workdir = karton.workdir

    karton.stop()
    karton.stop()

    assert set(pids) == {"redis-server", "moto-server", "karton-system"}
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid), f"{name} (pid {pid}) still exists"
    assert not workdir.exists()
    assert (tmp_path / "karton-system.log").is_file()


@pytest.mark.stack
def test_stack_start_failure_reports_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        monkeypatch.setattr(stack, "free_port", lambda: port)
        karton = KartonStack(log_dir=tmp_path, start_timeout=10)

        with pytest.raises(StackError) as raised:
            karton.start()

    assert "redis-server" in str(raised.value)
    assert "Address already in use" in str(raised.value)
    assert karton.pids == {}
    with pytest.raises(RuntimeError, match="not started"):
        _ = karton.workdir


def test_restart_loop_records_each_exit(worker_logs: Path) -> None:
    code = (
        "import sys; "
        "print('[INFO] memwatch: restart rule max_tasks tripped after task 3; "
        "exiting with code 3'); "
        "sys.exit(3)"
    )
    with RestartLoop(python_command(code), worker_logs) as loop:
        loop.wait_for_exit(3, DEADLINE)
    generations = loop.generations

    assert len(generations) >= 3
    assert [g.number for g in generations[:3]] == [1, 2, 3]
    assert len({g.pid for g in generations}) == len(generations)
    for generation in generations[:3]:
        assert generation.exit_code == 3
        assert generation.decision == RestartDecision("max_tasks", 3)
        assert generation.ended_at is not None
        assert generation.ended_at >= generation.started_at
        assert generation.log_path == worker_logs / f"worker-{generation.number}.log"


def test_restart_loop_without_decision(worker_logs: Path) -> None:
    code = "import sys; print('plain output'); sys.exit(7)"

    with RestartLoop(python_command(code), worker_logs, name="plain") as loop:
        first = loop.wait_for_exit(1, DEADLINE)

    assert first.exit_code == 7
    assert first.decision is None
    assert read_decision(first.log_path) is None
    assert "plain output" in first.log_path.read_text(encoding="utf-8")


def test_restart_loop_waits_delay(worker_logs: Path) -> None:
    with RestartLoop(python_command("pass"), worker_logs, delay=0.5) as loop:
        first = loop.wait_for_exit(1, DEADLINE)
        second = loop.wait_for_generation(2, DEADLINE)

    assert first.ended_at is not None
    assert second.started_at - first.ended_at >= 0.45


def test_restart_loop_stop_ends_child(worker_logs: Path) -> None:
    code = "import time; print('ready', flush=True); time.sleep(600)"
    loop = RestartLoop(python_command(code), worker_logs)
    loop.start()
    first = loop.wait_for_generation(1, DEADLINE)
    wait_for_text(first.log_path, "ready")

    loop.stop()
    loop.stop()

    assert first.exit_code == -signal.SIGTERM
    assert not psutil.pid_exists(first.pid)
    assert len(loop.generations) == 1
    assert loop.restarts == 0


def test_restart_loop_kills_stubborn_child(worker_logs: Path) -> None:
    code = (
        "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); "
        "time.sleep(600)"
    )
    loop = RestartLoop(python_command(code), worker_logs, stop_timeout=0.5)
    loop.start()
    first = loop.wait_for_generation(1, DEADLINE)
    wait_for_text(first.log_path, "ready")

    loop.stop()

    assert first.exit_code == -signal.SIGKILL
    assert not psutil.pid_exists(first.pid)


def test_restart_loop_reports_missing_command(worker_logs: Path) -> None:
    loop = RestartLoop([str(worker_logs / "no-such-command")], worker_logs)
    loop.start()

    with pytest.raises(RuntimeError, match="failed"):
        loop.wait_for_generation(1, DEADLINE)
    loop.stop()


@pytest.mark.stack
def test_tasks_before_bind_reach_nobody(
    karton_stack: KartonStack, karton_backend: KartonBackend, consumer_identity: str
) -> None:
    task_uids = pipeline.send_tasks(karton_stack.config(), 3, 16)
    deadline = time.monotonic() + DEADLINE
    while not producer_copies_finished(karton_backend, task_uids):
        assert time.monotonic() < deadline, "karton-system did not route the tasks"
        time.sleep(0.05)

    states = pipeline.count_states(karton_backend, consumer_identity, task_uids)

    assert sum(states.values()) == 0
    assert pipeline.count_lost(3, states) == 3


@pytest.mark.stack
def test_leaky_consumer_restarts_without_loss(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 60
    argv = leaky_consumer.command(
        mode="decorator",
        identity=consumer_identity,
        leak_kib=1024,
        extra_mb=12,
        rss_log=worker_logs / "rss.jsonl",
        crash_every=10,
    )
    loop = RestartLoop(
        argv,
        worker_logs,
        env=leaky_consumer.child_env(karton_stack.env),
        cwd=karton_stack.workdir,
        wake=functools.partial(karton_stack.unblock_clients, consumer_identity),
    )
    with loop:
        pipeline.wait_for_binds(karton_backend, consumer_identity, DEADLINE)
        task_uids = pipeline.send_tasks(karton_stack.config(), sent, 256)
        states = pipeline.wait_until_done(karton_backend, consumer_identity, sent, 60, task_uids)
    generations = loop.generations

    assert pipeline.count_lost(sent, states) == 0
    assert states[TaskState.CRASHED] == sent // 10
    assert states[TaskState.FINISHED] == sent - sent // 10
    assert loop.restarts >= 2
    for generation in generations[:-1]:
        assert generation.decision == RestartDecision("extra_mb", 0)
        assert generation.exit_code == 0
    for generation in generations:
        assert not psutil.pid_exists(generation.pid)
