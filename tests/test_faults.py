"""Faults in and around the exit path, each in a real worker process."""

from __future__ import annotations

import time

import pytest
from pytest_mock import MockerFixture

from memwatch import restart_when
from memwatch.memory import RssReader
from tests.test_workers import run_worker


def test_hanging_before_exit_is_bounded() -> None:
    started = time.monotonic()
    run = run_worker(
        {
            "rules": {"max_tasks": 2},
            "behavior": "EXIT_1",
            "before_exit": ["ok1", "hanging", "ok2"],
            "options": {"before_exit_timeout": 1},
            "calls": 10,
        }
    )
    elapsed = time.monotonic() - started
    assert run.code == 1, run.stderr
    assert [line for line in run.lines if line.startswith("before_exit")] == [
        "before_exit ok1",
        "before_exit hanging",
    ]
    assert "before-exit callback callback_hanging still running after 1.0 s" in run.stderr
    # The callback sleeps an hour; the process did not wait for it.
    assert elapsed < 60


def test_callback_calling_sys_exit_keeps_exit_code() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 2},
            "behavior": "EXIT_1",
            "before_exit": ["exiting", "ok2"],
            "calls": 10,
        }
    )
    assert run.code == 1, run.stderr
    assert "before_exit ok2" in run.lines
    assert "before-exit callback callback_exiting raised" in run.stderr


def test_swallowed_exit_ends_process_at_next_call() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 2}, "behavior": "EXIT_1", "swallow": True, "calls": 10}
    )
    assert run.code == 1, run.stderr
    assert "swallowed 3 SystemExit" in run.lines
    assert run.numbers("body") == [1, 2]
    assert "the exit with code 1 was caught and the process went on" in run.stderr


def test_swallowed_exit_ends_process_after_exit_timeout() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 2},
            "behavior": "EXIT_1",
            "swallow": True,
            "calls": 3,
            "linger": 30,
            "options": {"exit_timeout": 1},
        }
    )
    assert run.code == 1, run.stderr
    assert "swallowed 3 SystemExit" in run.lines
    assert "finished" in run.lines
    assert "still runs 1 s after exiting with code 1" in run.stderr


def test_sixteen_threads_exit_once() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 16},
            "mode": "burst",
            "concurrency": 16,
            "before_exit": ["ok1"],
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    assert run.lines.count("before_exit ok1") == 1
    assert run.stderr.count("tripped after task") == 1
    assert len(run.numbers("end")) >= 16
    # Second calls that started before the rule tripped finished; none was cut off.
    assert sorted(run.numbers("body")) == sorted(run.numbers("end"))


def test_sigterm_during_exit_path_keeps_one_clean_exit() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 2},
            "behavior": "EXIT_1",
            "before_exit": ["sigterm", "ok2"],
            "calls": 10,
        }
    )
    assert run.code == 1, run.stderr
    assert run.lines.count("before_exit sigterm") == 1
    assert "before_exit sigterm survived" in run.lines
    assert run.lines.count("before_exit ok2") == 1
    assert "SIGTERM received while the process is exiting; the exit goes on" in run.stderr


def test_blind_memory_guard_warns_at_decoration(mocker: MockerFixture) -> None:
    # No real process can make /proc and psutil fail on demand, so both are mocked.
    reader = RssReader()
    mocker.patch("memwatch.memory.default_reader", return_value=reader)
    mocker.patch("memwatch.tracker.default_reader", return_value=reader)
    mocker.patch("os.pread", side_effect=PermissionError("denied"))
    mocker.patch("psutil.Process", side_effect=PermissionError("denied"))
    with pytest.warns(RuntimeWarning, match="has only memory rules: it will never restart"):
        restart_when(extra_mb=100)(lambda: None)
