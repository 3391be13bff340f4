"""The guard in this process: results and exceptions pass through, logs carry the numbers."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from pytest_mock import MockerFixture

from memwatch import Decision, RestartBehavior, restart_when, stats
from memwatch.decorator import guard_of
from memwatch.memory import RssReader


def test_result_passes_through() -> None:
    @restart_when(max_tasks=1000)
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1) == 3
    assert add(1, b=5) == 6


def test_exception_passes_through_unchanged() -> None:
    error = KeyError("task-uid")

    @restart_when(max_tasks=1000)
    def fail() -> None:
        raise error

    with pytest.raises(KeyError) as caught:
        fail()
    assert caught.value is error


def test_signature_and_name_are_kept() -> None:
    def process(self: object, task: str, *, retries: int = 3) -> None:
        """Process one task."""

    guarded = restart_when(max_tasks=10)(process)
    assert inspect.signature(guarded) == inspect.signature(process)
    assert guarded.__name__ == "process"
    assert guarded.__doc__ == "Process one task."


def test_coroutine_function_stays_coroutine_function() -> None:
    @restart_when(max_tasks=10)
    async def job(value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    assert inspect.iscoroutinefunction(job)
    assert asyncio.run(job(21)) == 42


def test_method_receives_instance() -> None:
    class Service:
        def __init__(self) -> None:
            self.seen: list[int] = []

        @restart_when(max_tasks=100)
        def process(self, value: int) -> int:
            self.seen.append(value)
            return value

    service = Service()
    assert service.process(7) == 7
    assert service.seen == [7]


def test_tasks_count_returned_and_raised_calls() -> None:
    @restart_when(max_tasks=100)
    def job(fail: bool) -> None:
        if fail:
            raise ValueError("failed on purpose")

    job(False)
    with pytest.raises(ValueError, match="on purpose"):
        job(True)
    guard = guard_of(job)
    assert guard.tracker.tasks == 2
    assert guard.tracker.in_flight == 0


def test_count_rules_do_not_read_memory() -> None:
    @restart_when(max_tasks=100, max_seconds=3600)
    def job() -> None:
        pass

    job()
    guard = guard_of(job)
    assert guard.read_memory is False
    assert guard.tracker.baseline is None


def test_baseline_taken_before_first_call() -> None:
    kept: list[bytearray] = []

    @restart_when(extra_mb=10_000)
    def leak() -> None:
        kept.append(bytearray(b"\x01") * (16 * 1024 * 1024))

    before = RssReader().read()
    leak()
    guard = guard_of(leak)
    assert before is not None
    assert guard.tracker.baseline is not None
    assert abs(guard.tracker.baseline - before) < 4 * 1024 * 1024


def test_dry_run_logs_decision_with_numbers(caplog: pytest.LogCaptureFixture) -> None:
    @restart_when(max_tasks=2, extra_mb=10_000, behavior=RestartBehavior.DRY_RUN)
    def job() -> None:
        pass

    with caplog.at_level(logging.INFO, logger="memwatch"):
        for _ in range(5):
            job()
    lines = [r.getMessage() for r in caplog.records if "tripped" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert "restart rule max_tasks tripped after task 2" in line
    assert "baseline" in line
    assert "current" in line
    assert "tasks 2" in line
    assert "uptime" in line
    assert "dry run" in line


def test_custom_logger_receives_decision(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("my.worker")
    decisions: list[Decision] = []

    @restart_when(max_tasks=1, behavior=decisions.append, logger=logger)
    def job() -> None:
        pass

    with caplog.at_level(logging.INFO, logger="my.worker"):
        job()
        job()
    assert [r.name for r in caplog.records if "tripped" in r.getMessage()] == ["my.worker"]
    assert len(decisions) == 1
    assert decisions[0].rule == "max_tasks"
    assert decisions[0].snapshot.tasks == 1


def test_debug_line_per_task(caplog: pytest.LogCaptureFixture) -> None:
    @restart_when(extra_mb=10_000)
    def job() -> None:
        pass

    with caplog.at_level(logging.DEBUG, logger="memwatch"):
        job()
        job()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 2
    assert debug[1].startswith("memwatch: task 2 done after")
    assert "rss" in debug[1]


def test_exit_raises_system_exit_before_next_call() -> None:
    calls: list[int] = []

    @restart_when(max_tasks=2, behavior=RestartBehavior.EXIT_1, exit_timeout=0)
    def job(value: int) -> int:
        calls.append(value)
        return value

    assert job(1) == 1
    assert job(2) == 2
    with pytest.raises(SystemExit) as caught:
        job(3)
    assert caught.value.code == 1
    assert calls == [1, 2]


def test_memory_read_failure_keeps_count_rules(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    # No real process can make /proc and psutil fail on demand, so this one is mocked.
    reader = RssReader()
    mocker.patch("os.pread", side_effect=PermissionError("denied"))
    mocker.patch("psutil.Process", side_effect=PermissionError("denied"))
    decisions: list[Decision] = []

    @restart_when(max_tasks=3, extra_mb=1, behavior=decisions.append)
    def job() -> None:
        pass

    guard_of(job).tracker._reader = reader
    with caplog.at_level(logging.WARNING, logger="memwatch"):
        for _ in range(4):
            job()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot read this process's memory" in warnings[0]
    assert "denied" in warnings[0]
    assert [d.rule for d in decisions] == ["max_tasks"]


def test_reexec_failure_falls_back_to_exit_1(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    # No real process makes execve fail on demand for a valid interpreter, so it is mocked.
    execve = mocker.patch("os.execve", side_effect=OSError(8, "Exec format error"))

    @restart_when(max_tasks=1, behavior=RestartBehavior.REEXEC)
    def job() -> None:
        pass

    job()
    with caplog.at_level(logging.INFO, logger="memwatch"), pytest.raises(SystemExit) as caught:
        job()
    assert caught.value.code == 1
    execve.assert_called_once()
    environment = execve.call_args.args[2]
    assert environment["_MEMWATCH_GENERATION"] == "2"
    assert (
        "restart rule max_tasks tripped after task 1" in environment["_MEMWATCH_PREVIOUS_DECISION"]
    )
    assert "Exec format error; exiting with code 1 instead" in caplog.text


def test_recursive_guarded_function_counts_outer_call() -> None:
    @restart_when(max_tasks=3, exit_timeout=0)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(10) == 55
    assert fib(5) == 5
    assert guard_of(fib).tracker.tasks == 2


def test_recursive_coroutine_counts_outer_call() -> None:
    @restart_when(max_tasks=3, exit_timeout=0)
    async def depth(n: int) -> int:
        return 0 if n == 0 else 1 + await depth(n - 1)

    assert asyncio.run(depth(20)) == 20
    assert guard_of(depth).tracker.tasks == 1


def test_bound_method_and_builtin_can_be_guarded() -> None:
    class Parser:
        def parse(self, text: str) -> int:
            return len(text)

    guarded_parse = restart_when(max_tasks=100)(Parser().parse)
    guarded_len = restart_when(max_tasks=100)(len)
    assert guarded_parse("abc") == 3
    assert guarded_len([1, 2]) == 2
    assert guard_of(guarded_len).tracker.tasks == 1


def test_stats_of_method_through_instance() -> None:
    class Service:
        @restart_when(max_tasks=100)
        def process(self) -> None:
            pass

    service = Service()
    service.process()
    assert stats(service.process).tasks == 1
    assert stats(Service.process).tasks == 1
