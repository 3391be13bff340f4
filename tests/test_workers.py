"""Real worker processes that allocate memory per call and really exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("worker.py")
MIB = 1024 * 1024


@dataclass
class Run:
    code: int
    lines: list[str]
    stderr: str

    def numbers(self, prefix: str) -> list[int]:
        """Return N of every ``prefix N ...`` line, in order."""
        pattern = re.compile(rf"^{prefix} (\d+)")
        return [int(m.group(1)) for line in self.lines if (m := pattern.match(line))]

    def rss_by_call(self) -> dict[int, int]:
        pattern = re.compile(r"^call (\d+) rss (\d+)$")
        return {
            int(m.group(1)): int(m.group(2)) for line in self.lines if (m := pattern.match(line))
        }

    @property
    def baseline(self) -> int:
        return next(int(line.split()[1]) for line in self.lines if line.startswith("baseline "))


def run_worker(settings: dict[str, Any], env: dict[str, str] | None = None) -> Run:
    # Options set in the caller's environment must not leak into the worker.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MEMWATCH_")}
    full_env = {**inherited, **(env or {})}
    completed = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        check=False,
    )
    return Run(completed.returncode, completed.stdout.splitlines(), completed.stderr)


@pytest.mark.parametrize(("behavior", "code"), [("EXIT_0", 0), ("EXIT_1", 1)])
def test_max_tasks_exits_after_limit(behavior: str, code: int) -> None:
    run = run_worker({"rules": {"max_tasks": 5}, "behavior": behavior, "calls": 20})
    assert run.code == code, run.stderr
    assert run.numbers("call") == [1, 2, 3, 4, 5]
    assert run.numbers("body") == [1, 2, 3, 4, 5]
    assert "finished" not in run.lines
    assert "restart rule max_tasks tripped after task 5" in run.stderr
    assert f"exiting with code {code}" in run.stderr


def test_max_seconds_exits_after_limit() -> None:
    run = run_worker({"rules": {"max_seconds": 1.0}, "sleep": 0.2, "calls": 30})
    assert run.code == 0, run.stderr
    calls = run.numbers("call")
    # Five calls of 0.2 s cannot reach one second before the fifth ends.
    assert len(calls) >= 5
    assert len(calls) < 30
    match = re.search(r"max_seconds (\d+(?:\.\d+)?) >= 1 s", run.stderr)
    assert match, run.stderr
    assert float(match.group(1)) >= 1.0


def test_extra_mb_exits_at_growth() -> None:
    run = run_worker({"rules": {"extra_mb": 30}, "leak_mib": 8, "calls": 20, "behavior": "EXIT_1"})
    assert run.code == 1, run.stderr
    rss = run.rss_by_call()
    last = max(rss)
    guard_baseline = _logged_baseline(run)
    assert rss[last] - guard_baseline >= 30 * MIB
    assert rss[last - 1] - guard_baseline < 30 * MIB
    # 8 MiB a call: 4 calls are 32 MiB, 3 are 24 MiB.
    assert last == 4


def test_extra_percent_exits_at_growth() -> None:
    run = run_worker({"rules": {"extra_percent": 100}, "leak_mib": 4, "calls": 40})
    assert run.code == 0, run.stderr
    rss = run.rss_by_call()
    last = max(rss)
    guard_baseline = _logged_baseline(run)
    assert rss[last] >= 2 * guard_baseline
    assert rss[last - 1] < 2 * guard_baseline


def test_max_rss_mb_exits_at_ceiling() -> None:
    run = run_worker({"rules": {"max_rss_mb": 100}, "leak_mib": 8, "calls": 40})
    assert run.code == 0, run.stderr
    rss = run.rss_by_call()
    last = max(rss)
    assert rss[last] >= 100 * MIB
    assert rss[last - 1] < 100 * MIB


def test_first_tripped_rule_decides_and_all_are_reported() -> None:
    run = run_worker({"rules": {"max_tasks": 3, "extra_mb": 1}, "leak_mib": 4, "calls": 10})
    assert run.code == 0, run.stderr
    assert run.numbers("call") == [1]
    assert "restart rule extra_mb tripped after task 1" in run.stderr
    run = run_worker({"rules": {"max_tasks": 2, "extra_mb": 6}, "leak_mib": 4, "calls": 10})
    assert run.numbers("call") == [1, 2]
    assert "restart rule max_tasks tripped after task 2" in run.stderr
    assert "also extra_mb" in run.stderr


def test_dry_run_never_exits() -> None:
    run = run_worker({"rules": {"max_tasks": 3}, "behavior": "DRY_RUN", "calls": 12})
    assert run.code == 0, run.stderr
    assert run.numbers("call") == list(range(1, 13))
    assert "finished" in run.lines
    assert run.stderr.count("dry run, the process keeps running") == 1


def test_custom_behavior_gets_decision_once() -> None:
    run = run_worker({"rules": {"max_tasks": 4}, "behavior": "callable", "calls": 10})
    assert run.code == 0, run.stderr
    assert [line for line in run.lines if line.startswith("decision")] == ["decision max_tasks 4"]
    assert run.numbers("call") == list(range(1, 11))
    assert "finished" in run.lines


def test_before_exit_runs_in_order_and_raising_one_does_not_block() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 2},
            "behavior": "EXIT_1",
            "before_exit": ["ok1", "raising", "ok2"],
            "calls": 10,
        }
    )
    assert run.code == 1, run.stderr
    callbacks = [line for line in run.lines if line.startswith("before_exit")]
    assert callbacks == ["before_exit ok1", "before_exit raising", "before_exit ok2"]
    assert "before-exit callback callback_raising raised" in run.stderr
    assert "callback failed on purpose" in run.stderr
    assert run.numbers("call") == [1, 2]


def test_raised_call_keeps_its_exception_then_exits() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 3},
            "mode": "raise",
            "raise_at": 3,
            "calls": 10,
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    assert run.numbers("caught") == [3]
    # The exit comes before the fourth call's body runs.
    assert run.numbers("body") == [1, 2, 3]
    assert "restart rule max_tasks tripped after task 3 (the task raised)" in run.stderr


def test_method_guard_exits() -> None:
    run = run_worker({"rules": {"max_tasks": 3}, "mode": "method", "calls": 10})
    assert run.code == 0, run.stderr
    assert run.numbers("call") == [1, 2, 3]


def test_async_function_exits_after_limit() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 4}, "mode": "async", "calls": 10, "behavior": "EXIT_1"}
    )
    assert run.code == 1, run.stderr
    assert run.numbers("call") == [1, 2, 3, 4]
    assert run.numbers("body") == [1, 2, 3, 4]


def test_async_concurrent_calls_finish_before_exit() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 10},
            "mode": "async_concurrent",
            "concurrency": 4,
            "sleep": 0.05,
            "calls": 40,
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    started = run.numbers("body")
    ended = run.numbers("end")
    assert sorted(started) == sorted(ended)
    assert 10 <= len(ended) < 40


def test_thread_pool_trip_ends_process() -> None:
    run = run_worker(
        {
            "rules": {"max_tasks": 10},
            "mode": "threads",
            "concurrency": 4,
            "sleep": 0.02,
            "calls": 200,
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    started = run.numbers("body")
    assert sorted(started) == sorted(run.numbers("end"))
    assert 10 <= len(started) < 200
    assert "finished" not in run.lines


def test_worker_thread_trip_ends_process() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 3}, "mode": "thread", "calls": 10, "behavior": "EXIT_1"}
    )
    assert run.code == 1, run.stderr
    assert run.numbers("call") == [1, 2, 3]
    assert "ending the process from thread worker-thread with os._exit(1)" in run.stderr
    assert "finished" not in run.lines


def test_forked_child_gets_fresh_baseline_and_counts() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 5, "extra_mb": 500}, "mode": "fork", "leak_mib": 8, "calls": 4}
    )
    assert run.code == 0, run.stderr
    parent = next(line for line in run.lines if line.startswith("parent baseline"))
    child_start = next(line for line in run.lines if line.startswith("child tasks"))
    child_end = next(line for line in run.lines if line.startswith("child baseline"))
    parent_baseline = int(parent.split()[2])
    assert child_start == "child tasks 0 baseline None"
    child_baseline = int(child_end.split()[2])
    child_rss = next(int(line.split()[2]) for line in run.lines if line.startswith("child rss"))
    # The child measured itself before its first call, not the parent before the parent's.
    assert abs(child_baseline - child_rss) < 2 * MIB
    assert child_baseline - parent_baseline > 8 * MIB
    assert child_end.endswith("tasks 4")
    assert "child finished" in run.lines
    assert "child exit 0" in run.lines


@pytest.mark.parametrize("value", ["0", "false", "off", "NO"])
def test_environment_switch_disables_guard(value: str) -> None:
    run = run_worker({"rules": {"max_tasks": 1}, "calls": 5}, env={"MEMWATCH_ENABLED": value})
    assert run.code == 0, run.stderr
    assert "finished" in run.lines
    assert run.numbers("call") == [1, 2, 3, 4, 5]


def test_enabled_false_disables_guard() -> None:
    run = run_worker({"rules": {"max_tasks": 1}, "calls": 5, "enabled": False})
    assert run.code == 0, run.stderr
    assert "finished" in run.lines


def _logged_baseline(run: Run) -> int:
    """Return the guard's baseline from its decision line, in bytes (to 0.1 MiB)."""
    match = re.search(r"baseline (\d+\.\d) MiB", run.stderr)
    assert match, run.stderr
    return int(float(match.group(1)) * MIB)


def test_environment_overrides_decorator() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 100}, "calls": 10},
        env={"MEMWATCH_MAX_TASKS": "3", "MEMWATCH_BEHAVIOR": "exit_1"},
    )
    assert run.code == 1, run.stderr
    assert run.numbers("call") == [1, 2, 3]
    assert "from configuration: max_tasks=3, behavior=EXIT_1" in run.stderr


def test_environment_removing_last_rule_fails_at_decoration() -> None:
    run = run_worker({"rules": {"max_tasks": 100}, "calls": 10}, env={"MEMWATCH_MAX_TASKS": "off"})
    assert run.code == 1
    assert "ValueError: at least one restart rule must be set" in run.stderr
    assert run.numbers("call") == []


def test_reexec_restarts_in_place() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 3}, "behavior": "REEXEC", "calls": 10, "last_generation": 3}
    )
    assert run.code == 0, run.stderr
    generations = [line for line in run.lines if line.startswith("generation")]
    pids = {line.split()[3] for line in generations}
    assert [line.split()[1] for line in generations] == ["1", "2", "3"]
    assert len(pids) == 1
    # Generations 1 and 2 each ran three calls, then re-executed before the fourth.
    assert run.numbers("call") == [1, 2, 3, 1, 2, 3]
    assert run.lines[-1] == "finished"
    assert run.stderr.count("re-executing in place") == 2
    assert (
        "generation 2, re-executed after: restart rule max_tasks tripped after task 3" in run.stderr
    )


def test_reexec_without_command_line_exits_1() -> None:
    run = run_worker(
        {"rules": {"max_tasks": 2}, "behavior": "REEXEC", "calls": 10, "no_orig_argv": True}
    )
    assert run.code == 1, run.stderr
    assert run.numbers("call") == [1, 2]
    assert "cannot re-execute: sys.orig_argv is empty" in run.stderr
    assert "exiting with code 1 instead" in run.stderr


def test_reexec_after_chdir_before_import(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import os\n"
        "os.chdir('/')\n"
        "from memwatch import RestartBehavior, restart_when\n"
        "from memwatch.reexec import generation\n"
        "print('generation', generation(), os.getpid(), flush=True)\n"
        "if generation() < 3:\n"
        "    job = restart_when(max_tasks=1, behavior=RestartBehavior.REEXEC)(lambda: None)\n"
        "    job()\n"
        "    job()\n",
        encoding="utf-8",
    )
    completed = subprocess.run(
        [sys.executable, "job.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert len({line.split()[2] for line in lines}) == 1
