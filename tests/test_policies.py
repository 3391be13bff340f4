"""Warm-up, jitter, reclaim, the restart storm guard and growth reports, in real workers."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.test_workers import MIB, run_worker


def test_warmup_ignores_first_call_cache() -> None:
    # A 40 MiB cache built on the first call trips extra_mb=20 at once without warm-up.
    settings = {"rules": {"extra_mb": 20}, "first_call_mib": 40, "calls": 8, "behavior": "EXIT_1"}
    cold = run_worker(settings)
    assert cold.code == 1, cold.stderr
    assert cold.numbers("call") == [1]

    warm = run_worker({**settings, "options": {"warmup": 1}})
    assert warm.code == 0, warm.stderr
    assert "finished" in warm.lines
    assert "baseline" in warm.stderr
    assert "taken after warm-up task 1" in warm.stderr


def test_warmup_then_growth_trips() -> None:
    run = run_worker(
        {
            "rules": {"extra_mb": 20},
            "first_call_mib": 40,
            "leak_mib": 8,
            "calls": 20,
            "options": {"warmup": 2},
        }
    )
    assert run.code == 0, run.stderr
    # Baseline after call 2; 8 MiB a call reaches 20 MiB after three more.
    assert run.numbers("call") == [1, 2, 3, 4, 5]


def test_jitter_spreads_limits_across_processes() -> None:
    drawn: list[int] = []
    for _ in range(10):
        run = run_worker({"rules": {"max_tasks": 100}, "options": {"jitter": 0.5}, "calls": 1})
        assert run.code == 0, run.stderr
        match = re.search(
            r"jitter 0.5 drew this process's limits: max_tasks=(\d+) tasks", run.stderr
        )
        assert match, run.stderr
        drawn.append(int(match.group(1)))
    assert all(50 <= limit <= 100 for limit in drawn)
    assert max(drawn) - min(drawn) >= 10, drawn


def test_jittered_limit_is_the_one_enforced() -> None:
    run = run_worker({"rules": {"max_tasks": 20}, "options": {"jitter": 0.5}, "calls": 40})
    assert run.code == 0, run.stderr
    match = re.search(r"drew this process's limits: max_tasks=(\d+) tasks", run.stderr)
    assert match, run.stderr
    limit = int(match.group(1))
    assert 10 <= limit <= 20
    assert run.numbers("call") == list(range(1, limit + 1))


def test_reclaim_avoids_restart_for_garbage() -> None:
    settings = {
        "rules": {"extra_mb": 30},
        "garbage_mib": 8,
        "gc_disabled": True,
        "calls": 7,
        "behavior": "EXIT_1",
    }
    reclaimed = run_worker(settings)
    assert reclaimed.code == 0, reclaimed.stderr
    assert "finished" in reclaimed.lines
    assert "back under every limit, no restart" in reclaimed.stderr

    kept = run_worker({**settings, "options": {"reclaim": False}})
    assert kept.code == 1, kept.stderr
    assert kept.numbers("call") == [1, 2, 3, 4]


def test_reclaim_that_does_not_help_still_restarts() -> None:
    run = run_worker({"rules": {"extra_mb": 30}, "leak_mib": 8, "calls": 10, "behavior": "EXIT_1"})
    assert run.code == 1, run.stderr
    assert "still over a limit" in run.stderr
    assert run.numbers("call") == [1, 2, 3, 4]


def test_ceiling_below_footprint_waits_for_lifetime() -> None:
    run = run_worker(
        {
            "rules": {"max_rss_mb": 5},
            "options": {"min_lifetime_seconds": 1.5},
            "sleep": 0.1,
            "calls": 200,
        }
    )
    assert run.code == 0, run.stderr
    assert run.stderr.count("is below this process's footprint at start") == 1
    assert "restarts wait until the process has lived min_lifetime_seconds=1.5 s" in run.stderr
    # 0.1 s a call: the process lived 1.5 s, about 15 calls, not one.
    assert len(run.numbers("call")) >= 14
    assert "restart rule max_rss_mb tripped" in run.stderr


def test_report_estimates_tasks_until_trip() -> None:
    run = run_worker(
        {
            "rules": {"extra_mb": 200},
            "leak_mib": 2,
            "calls": 20,
            "options": {"report_every": 10, "reclaim": False},
        }
    )
    assert run.code == 0, run.stderr
    reports = re.findall(
        r"report after task (\d+): .*extra_mb trips in about (\d+) tasks", run.stderr
    )
    assert [int(task) for task, _ in reports] == [10, 20]
    # 2 MiB a task: after 20 tasks about 160 MiB are left, about 80 tasks.
    remaining = int(reports[-1][1])
    assert 70 <= remaining <= 90


def test_stats_expose_growth() -> None:
    run = run_worker(
        {
            "rules": {"extra_mb": 10_000},
            "leak_mib": 4,
            "calls": 5,
            "options": {"reclaim": False},
            "print_stats": True,
        }
    )
    assert run.code == 0, run.stderr
    line = next(line for line in run.lines if line.startswith("stats "))
    figures = dict(zip(line.split()[1::2], line.split()[2::2], strict=True))
    assert figures["tasks"] == "5"
    assert figures["decision"] == "None"
    growth = int(figures["growth"])
    per_task = float(figures["per_task"])
    assert 18 * MIB <= growth <= 24 * MIB
    assert 3.5 * MIB <= per_task <= 4.8 * MIB


def test_uss_metric_ignores_shared_growth() -> None:
    # The worker maps a shared file into memory: RSS grows, USS does not.
    settings = {
        "rules": {"extra_mb": 40},
        "shared_mib": 80,
        "calls": 5,
        "options": {"reclaim": False},
        "behavior": "EXIT_1",
    }
    by_rss = run_worker(settings)
    assert by_rss.code == 1, by_rss.stderr
    assert by_rss.numbers("call") == [1]

    by_uss = run_worker({**settings, "options": {"reclaim": False, "metric": "uss"}})
    assert by_uss.code == 0, by_uss.stderr
    assert "finished" in by_uss.lines


def test_uss_metric_trips_on_private_growth() -> None:
    run = run_worker(
        {
            "rules": {"extra_mb": 30},
            "leak_mib": 8,
            "calls": 10,
            "options": {"reclaim": False, "metric": "uss"},
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    assert run.numbers("call") == [1, 2, 3, 4]
    assert re.search(r"current \d+\.\d MiB USS", run.stderr), run.stderr


def test_trip_within_reclaim_budget_restarts() -> None:
    # Every task leaves 40 MiB of garbage. The first trip reclaims it; the second
    # comes before the budget allows another attempt, so the worker restarts.
    run = run_worker(
        {
            "rules": {"extra_mb": 30},
            "garbage_mib": 40,
            "gc_disabled": True,
            "calls": 6,
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    assert run.stderr.count("reclaiming memory gave back") == 1
    assert "back under every limit, no restart" in run.stderr
    assert run.numbers("call") == [1, 2]


def test_uss_metric_trips_on_leak_beside_shared_memory() -> None:
    # 80 MiB shared with another process keep the RSS over the limit from the
    # first call; the private leak must still trip when it reaches the limit.
    run = run_worker(
        {
            "rules": {"extra_mb": 30},
            "shared_mib": 80,
            "leak_mib": 8,
            "calls": 10,
            # The first call forks the process that shares the pages, which makes
            # the parent's older pages shared too: the baseline comes after it.
            "options": {"reclaim": False, "metric": "uss", "warmup": 1},
            "behavior": "EXIT_1",
        }
    )
    assert run.code == 1, run.stderr
    # 8 MiB a call after the baseline: 32 MiB after call 5.
    assert run.numbers("call") == [1, 2, 3, 4, 5]


COPY_ON_WRITE = """
import os, sys
from memwatch import RestartBehavior, restart_when

MIB = 1024 * 1024
inherited = bytearray(b"\\x01") * (200 * MIB)
child = os.fork()
if child:
    _, status = os.waitpid(child, 0)
    sys.exit(os.waitstatus_to_exitcode(status))

@restart_when(extra_mb=100, metric=sys.argv[1], reclaim=False, behavior=RestartBehavior.EXIT_1)
def task(number):
    if number < 20:
        # Writing inherited pages makes them private without growing the RSS.
        inherited[number * 10 * MIB:(number + 1) * 10 * MIB] = b"\\x02" * (10 * MIB)

for number in range(100_000):
    task(number)
print("finished", flush=True)
"""


def test_uss_metric_sees_copy_on_write_growth() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", COPY_ON_WRITE, "uss"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr
    assert "finished" not in completed.stdout
