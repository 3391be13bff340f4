"""A leaking consumer that re-executes itself in place, with no restart loop at all."""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
from pathlib import Path

import psutil
import pytest
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline
from demo.processes import terminate
from demo.stack import KartonStack

pytestmark = pytest.mark.stack

DEADLINE = 90.0
MIB = 1024 * 1024


def test_reexec_consumer_keeps_pid_and_loses_no_task(
    karton_stack: KartonStack,
    karton_backend: KartonBackend,
    consumer_identity: str,
    worker_logs: Path,
) -> None:
    sent = 300
    rss_log = worker_logs / "rss.jsonl"
    argv = leaky_consumer.command(
        mode="decorator",
        identity=consumer_identity,
        leak_kib=1024,
        extra_mb=30,
        rss_log=rss_log,
        reexec_in_place=True,
    )
    log_path = worker_logs / "consumer.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv,
            env=leaky_consumer.child_env(karton_stack.env),
            cwd=karton_stack.workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        pipeline.wait_for_binds(karton_backend, consumer_identity, DEADLINE)
        task_uids = pipeline.send_tasks(karton_stack.config(), sent, 512)
        states = pipeline.wait_until_done(
            karton_backend, consumer_identity, sent, DEADLINE, task_uids
        )
        # Every re-executed image is still the process the test started.
        assert process.poll() is None
    finally:
        terminate(
            process,
            "consumer",
            15,
            functools.partial(karton_stack.unblock_clients, consumer_identity),
        )

    assert pipeline.count_lost(sent, states) == 0
    assert states[TaskState.FINISHED] == sent

    records = [json.loads(line) for line in rss_log.read_text(encoding="utf-8").splitlines()]
    assert {record["pid"] for record in records} == {process.pid}
    by_generation: dict[int, list[dict[str, int]]] = {}
    for record in records:
        by_generation.setdefault(record["generation"], []).append(record)
    numbers = sorted(by_generation)
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 4, "expected at least 3 re-executions"

    first = by_generation[1][0]
    for previous, current in itertools.pairwise(numbers):
        start = by_generation[current][0]
        peak = max(record["rss"] for record in by_generation[previous])
        # The new image starts where the first one started, far below the peak it left.
        assert start["rss"] < peak - 20 * MIB
        assert abs(start["rss"] - first["rss"]) < 16 * MIB
        # No Redis or S3 socket of the old image survives the exec.
        assert start["open_fds"] == first["open_fds"]

    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert log.count("re-executing in place") == len(numbers) - 1
    assert "generation 2, re-executed after: restart rule extra_mb tripped" in log
    assert "Failed to process task" not in log
    assert not psutil.pid_exists(process.pid)
