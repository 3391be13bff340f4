"""Guarded leaking consumers on the real karton stack, under a restart loop.

Every test runs real processes: Redis, moto's S3 endpoint, karton-system and the
consumer from ``demo.leaky_consumer``, restarted by ``demo.supervisor.RestartLoop``
like systemd ``Restart=always``.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import pipeline
from demo.report import read_rss_log
from demo.stack import KartonStack
from demo.supervisor import Generation, RestartDecision
from tests.stack_runs import run_pipeline

pytestmark = pytest.mark.stack


def assert_restarted_by_rule(generations: list[Generation], rule: str, code: int) -> None:
    # The last generation is the one the test stopped.
    assert len(generations) >= 4, "expected at least 3 restarts"
    for generation in generations[:-1]:
        assert generation.decision == RestartDecision(rule, code)
        assert generation.exit_code == code
    for generation in generations:
        assert not psutil.pid_exists(generation.pid)


def failed_task_lines(generations: list[Generation]) -> list[str]:
    lines: list[str] = []
    for generation in generations:
        text = generation.log_path.read_text(encoding="utf-8", errors="replace")
        lines += [line for line in text.splitlines() if "Failed to process task" in line]
    return lines


@pytest.mark.parametrize(
    ("mode", "code", "rule"),
    [("decorator", 1, "extra_mb"), ("implant", 0, "extra_consumed_megabytes")],
)
def test_leaking_consumer_loses_no_task(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
    mode: str,
    code: int,
    rule: str,
) -> None:
    sent = 300
    states, generations, _ = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        mode=mode,
        leak_kib=1024,
        extra_mb=30,
        exit_code=code,
    )

    assert pipeline.count_lost(sent, states) == 0
    assert states[TaskState.FINISHED] == sent
    assert states[TaskState.CRASHED] == 0
    assert_restarted_by_rule(generations, rule, code)
    # The task that tripped the rule is not reported as failed by karton.
    assert failed_task_lines(generations) == []


def test_restart_returns_memory(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 120
    states, generations, _ = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        mode="decorator",
        leak_kib=2048,
        extra_mb=40,
    )
    assert pipeline.count_lost(sent, states) == 0
    records = read_rss_log(worker_logs / "rss.jsonl")
    by_pid: dict[int, list[int]] = {}
    for record in records:
        by_pid.setdefault(record.pid, []).append(record.rss)
    finished = [by_pid[g.pid] for g in generations[:-1] if g.pid in by_pid]
    assert len(finished) >= 3
    peaks = [max(rss) for rss in finished]
    starts = [rss[0] for rss in by_pid.values()]
    # Each generation starts near the first one's start, far below the peak it left.
    for start, peak in zip(starts[1:], peaks, strict=False):
        assert start < peak - 30 * 1024 * 1024
        assert abs(start - starts[0]) < 16 * 1024 * 1024


@pytest.mark.parametrize("mode", ["decorator", "implant"])
def test_crashing_task_that_trips_keeps_traceback(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
    mode: str,
) -> None:
    sent = 30
    states, generations, _task_uids = run_pipeline(
        karton_stack,
        karton_backend,
        consumer_identity,
        worker_logs,
        sent,
        mode=mode,
        leak_kib=0,
        extra_mb=None,
        max_tasks=5,
        crash_every=5,
        exit_code=1,
    )

    assert pipeline.count_lost(sent, states) == 0
    assert states[TaskState.CRASHED] == 6
    assert states[TaskState.FINISHED] == 24
    assert_restarted_by_rule(
        generations, "max_tasks" if mode == "decorator" else "proceed_tasks", 1
    )

    crashed = [
        task
        for task in karton_backend.get_all_tasks()
        if task.headers.get("receiver") == consumer_identity and task.status == TaskState.CRASHED
    ]
    assert len(crashed) == 6
    for task in crashed:
        error = "".join(task.error or [])
        assert "ValueError" in error
        assert "raised on purpose" in error
        # memwatch's exit did not replace the task's own exception.
        assert "SystemExit" not in error
    # Each generation's fifth task both raised and tripped the rule.
    for generation in generations[:-1]:
        text = generation.log_path.read_text(encoding="utf-8", errors="replace")
        assert "tripped after task 5 (the task raised)" in text
