"""karton-memory-watcher's API: producers calling the hooks by hand, and its attributes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from memwatch import RestartBehavior, RestartRule

PRODUCER = """
import logging, sys
from memwatch import RestartBehavior, RestartRule
logging.basicConfig(level=logging.INFO)
rule = RestartRule(proceed_tasks=3, restart_behavior=RestartBehavior.EXIT_1,
                   call_before_exit=(lambda: print("closing", flush=True),))
rule.pre_hook_behavior()
for job in range(1, 10):
    print("job", job, flush=True)
    rule.post_hook_behavior()
print("finished", flush=True)
"""


def run_producer(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MEMWATCH_")}
    return subprocess.run(
        [sys.executable, "-c", PRODUCER],
        capture_output=True,
        text=True,
        timeout=60,
        env={**inherited, **(env or {})},
        check=False,
    )


def test_producer_post_hook_exits_right_away() -> None:
    completed = run_producer()
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.splitlines() == ["job 1", "job 2", "job 3", "closing"]
    assert "restart rule proceed_tasks tripped after task 3" in completed.stderr
    assert "exiting with code 1 now" in completed.stderr


def test_environment_switch_disables_restart_rule() -> None:
    completed = run_producer({"MEMWATCH_ENABLED": "0"})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "finished"


def test_environment_overrides_restart_rule() -> None:
    completed = run_producer({"MEMWATCH_MAX_TASKS": "2"})
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.splitlines() == ["job 1", "job 2", "closing"]


def test_original_attributes_stay_readable() -> None:
    rule = RestartRule(extra_consumed_megabytes=10_000, restart_behavior=RestartBehavior.EXIT_1)
    assert rule.tasks_counter is None
    assert rule.prehooked is False
    before = time.time()
    rule.pre_hook_behavior()
    rule.post_hook_behavior()
    rule.post_hook_behavior(None, None)
    assert rule.tasks_counter == 2
    assert rule.start_time is not None
    assert before <= rule.start_time <= time.time()
    assert isinstance(rule.start_memory_usage, int)
    assert rule.start_memory_usage > 0
    assert isinstance(RestartRule.get_process_memory_usage(), int)
    assert rule.rule_extra_consumed_megabytes == 10_000
    assert rule.rule_proceed_tasks is None
    assert rule.restart_behavior is RestartBehavior.EXIT_1
