"""karton operations on the real stack: async consumers drained, idle checks, config."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline
from demo.stack import KartonStack
from demo.supervisor import RestartDecision
from tests.stack_runs import restart_loop, run_pipeline

pytestmark = pytest.mark.stack


def test_async_consumer_drains_tasks_in_flight(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 400
    states, generations, _ = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        resource_size=256,
        mode="async",
        leak_kib=256,
        extra_mb=None,
        max_tasks=90,
        sleep=0.05,
        concurrency=4,
        exit_code=1,
    )

    assert pipeline.count_lost(sent, states) == 0
    assert states[TaskState.FINISHED] == sent
    assert states[TaskState.CRASHED] == 0
    assert len(generations) >= 4
    for generation in generations[:-1]:
        assert generation.decision == RestartDecision("max_tasks", 1)
        assert generation.exit_code == 1
        log = generation.log_path.read_text(encoding="utf-8", errors="replace")
        assert "Failed to process task" not in log


def test_idle_consumer_exits_on_max_seconds(
    karton_stack: KartonStack, consumer_identity: str, worker_logs: Path
) -> None:
    loop = restart_loop(
        karton_stack,
        consumer_identity,
        worker_logs,
        mode="decorator",
        leak_kib=0,
        extra_mb=None,
        max_seconds=3,
        exit_code=1,
    )
    started = time.monotonic()
    with loop:
        first = loop.wait_for_exit(1, 30)
    elapsed = time.monotonic() - started

    assert first.exit_code == 1
    assert first.decision == RestartDecision("max_seconds", 1)
    log = first.log_path.read_text(encoding="utf-8", errors="replace")
    assert "tripped while idle after task 0" in log
    # karton waits 5 s at most for a task, so the idle check runs within about 5 s
    # of the limit; the rest is start-up.
    assert elapsed < 20


def test_karton_env_overrides_decorator(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 40
    states, generations, _ = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        env={"KARTON_MEMWATCH_MAX_TASKS": "10", "KARTON_MEMWATCH_BEHAVIOR": "exit_1"},
        resource_size=64,
        mode="decorator",
        leak_kib=0,
        extra_mb=10_000,
    )

    assert states[TaskState.FINISHED] == sent
    assert len(generations) >= 4
    for generation in generations[:-1]:
        assert generation.decision == RestartDecision("max_tasks", 1)
        assert generation.exit_code == 1
    log = generations[0].log_path.read_text(encoding="utf-8", errors="replace")
    assert "from configuration: max_tasks=10, behavior=EXIT_1" in log
    assert "rules max_tasks=10 tasks, extra_mb=10000 MiB; behavior EXIT_1" in log


def test_karton_ini_section_overrides(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
    tmp_path: Path,
) -> None:
    ini = tmp_path / "memwatch.ini"
    ini.write_text("[memwatch]\nmax_tasks = 6\nextra_mb = off\n", encoding="utf-8")
    sent = 18
    states, generations, _ = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        env={"KARTON_CONFIG_FILE": str(ini)},
        resource_size=64,
        mode="implant",
        leak_kib=0,
        extra_mb=10_000,
    )

    assert states[TaskState.FINISHED] == sent
    assert len(generations) >= 3
    for generation in generations[:-1]:
        assert generation.decision == RestartDecision("proceed_tasks", 0)
    log = generations[0].log_path.read_text(encoding="utf-8", errors="replace")
    assert "rules proceed_tasks=6 tasks; behavior EXIT_0" in log


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KARTON_MEMWATCH_MAX_TASKS", "abc", "KARTON_MEMWATCH_MAX_TASKS = 'abc' is invalid"),
        ("KARTON_MEMWATCH_MAX_TASKS", "-5", "max_tasks must be a positive integer"),
        ("KARTON_MEMWATCH_EXTRA_MB", "nan", "extra_mb must be a positive finite number"),
        ("KARTON_MEMWATCH_MAX_SECONDS", "", "max_seconds must not be empty"),
        ("KARTON_MEMWATCH_BEHAVIOR", "restart", "behavior must be one of exit_0, exit_1, dry_run"),
        ("KARTON_MEMWATCH_MAX_TASK", "5", "did you mean max_tasks?"),
    ],
)
def test_bad_config_stops_service_at_start(
    karton_stack: KartonStack,
    consumer_identity: str,
    worker_logs: Path,
    variable: str,
    value: str,
    expected: str,
) -> None:
    argv = leaky_consumer.command(
        mode="decorator",
        identity=consumer_identity,
        leak_kib=0,
        extra_mb=100,
        rss_log=worker_logs / "rss.jsonl",
    )
    completed = subprocess.run(
        argv,
        env={**leaky_consumer.child_env(karton_stack.env), variable: value},
        cwd=karton_stack.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    assert expected in completed.stderr
    assert "ValueError" in completed.stderr
