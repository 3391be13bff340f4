"""The limit_percent rule: boundaries on a stand-in reader, validation, and a real cgroup."""

from __future__ import annotations

import decimal
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from memwatch import RestartBehavior, checker, config, restart_when
from memwatch.cgroup import detect
from memwatch.config import Settings
from memwatch.decorator import guard_of
from memwatch.guard import Guard
from memwatch.rules import RULE_TYPES, ContainerLimit, Snapshot
from tests.test_cgroup import child_cgroup  # noqa: F401 - a fixture, used by name

MIB = 1024 * 1024
LIMIT = 256 * MIB
SOURCE = "cgroup v1 /sys/fs/cgroup/memory/app (memory.limit_in_bytes)"
WORKER = Path(__file__).with_name("worker.py")
LOGGER = logging.getLogger("memwatch.test.container_limit")


@dataclass
class FakeContainer:
    """A stand-in for memwatch.cgroup.ContainerMemory with fixed readings."""

    working_set_bytes: int | None
    limit_bytes: int | None = LIMIT
    source: str = SOURCE
    failure: str | None = None

    def limit(self) -> int | None:
        return self.limit_bytes

    def working_set(self) -> int | None:
        return self.working_set_bytes


def snap(rss: int = 100 * MIB, baseline: int = 100 * MIB, uptime: float = 1.0) -> Snapshot:
    return Snapshot(tasks=1, uptime=uptime, rss=rss, baseline=baseline)


def rule_for(working_set: int | None, percent: float = 80, **fake: Any) -> ContainerLimit:
    return ContainerLimit(percent, memory=FakeContainer(working_set, **fake))


# 80 % of 256 MiB is 214748364.8 bytes.
@pytest.mark.parametrize(
    ("working_set", "trips"),
    [(214748364, False), (214748365, True), (LIMIT, True), (LIMIT + MIB, True)],
)
def test_boundary_in_bytes(working_set: int, trips: bool) -> None:
    assert (rule_for(working_set).check(snap()) is not None) is trips


@pytest.mark.parametrize(
    ("working_set", "trips"), [(128 * MIB - 1, False), (128 * MIB, True), (128 * MIB + 1, True)]
)
def test_boundary_at_exact_half(working_set: int, trips: bool) -> None:
    assert (rule_for(working_set, percent=50).check(snap()) is not None) is trips


def test_hundred_percent_trips_at_limit() -> None:
    assert rule_for(LIMIT - 1, percent=100).check(snap()) is None
    assert rule_for(LIMIT, percent=100).check(snap()) is not None


def test_trip_numbers_and_log_text() -> None:
    trip = rule_for(208 * MIB).check(snap())
    assert trip is not None
    assert trip.rule == "limit_percent"
    assert trip.current == pytest.approx(81.25)
    assert trip.limit == 80
    assert trip.unit == "% of limit"
    assert trip.memory
    assert trip.describe() == (
        "limit_percent 81.2 >= 80 % of limit, "
        f"working set 208.0 MiB of the 256.0 MiB limit in {SOURCE}"
    )


def test_rule_ignores_process_rss() -> None:
    # The container's working set decides, not this process's RSS or growth.
    rule = rule_for(10 * MIB)
    assert rule.check(snap(rss=4096 * MIB, baseline=10 * MIB)) is None


def test_physical_memory_fallback(caplog: pytest.LogCaptureFixture) -> None:
    physical = 1024 * MIB
    rule = rule_for(900 * MIB, limit_bytes=physical, source="physical memory")
    with caplog.at_level(logging.INFO, logger="memwatch"):
        trip = rule.check(snap())
        rule.check(snap())
    assert trip is not None
    assert trip.describe().endswith(
        "working set 900.0 MiB of the 1024.0 MiB physical memory, "
        "since no cgroup sets a lower memory limit"
    )
    notices = [r.getMessage() for r in caplog.records if "physical memory" in r.getMessage()]
    assert notices == [
        "memwatch: limit_percent compares with the physical memory, 1024.0 MiB, because no "
        "cgroup sets a lower memory limit"
    ]


@pytest.mark.parametrize(("working_set", "limit"), [(None, LIMIT), (MIB, None)])
def test_reader_failure_warns_once(
    caplog: pytest.LogCaptureFixture, working_set: int | None, limit: int | None
) -> None:
    rule = rule_for(working_set, limit_bytes=limit, failure="reading memory.stat failed: EIO")
    with caplog.at_level(logging.WARNING, logger="memwatch"):
        assert rule.check(snap()) is None
        assert rule.check(snap()) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "memwatch: limit_percent cannot read the container's memory (reading memory.stat "
        "failed: EIO); the rule is inactive while the reads fail"
    ]


class ResettingContainer(FakeContainer):
    """A stand-in whose limit read clears the failure, as ContainerMemory's does."""

    def limit(self) -> int | None:
        self.failure = None
        return self.limit_bytes


def test_working_set_failure_reason_kept(caplog: pytest.LogCaptureFixture) -> None:
    reader = ResettingContainer(None, failure="reading memory.current failed: EIO")
    with caplog.at_level(logging.WARNING, logger="memwatch"):
        assert ContainerLimit(80, memory=reader).check(snap()) is None
    assert "(reading memory.current failed: EIO)" in caplog.text


def test_scaled_for_jitter_keeps_reader() -> None:
    reader = FakeContainer(110 * MIB)
    scaled = ContainerLimit(80, memory=reader).scaled(0.5)
    assert isinstance(scaled, ContainerLimit)
    assert scaled.limit == 40
    assert scaled.describe() == "limit_percent=40 % of limit"
    assert scaled.check(snap()) is not None
    reader.working_set_bytes = 100 * MIB
    assert scaled.check(snap()) is None


def test_check_at_start_leaves_out_growth() -> None:
    rule = rule_for(220 * MIB)
    # 220 MiB now, of which 100 MiB is this process's growth: a new process starts at 120.
    assert rule.check(snap(rss=200 * MIB, baseline=100 * MIB)) is not None
    assert rule.check_at_start(snap(rss=200 * MIB, baseline=100 * MIB)) is None
    assert rule.check_at_start(snap(rss=110 * MIB, baseline=100 * MIB)) is not None


def test_registered_after_existing_rules() -> None:
    assert list(RULE_TYPES) == [
        "max_tasks",
        "max_seconds",
        "extra_mb",
        "extra_percent",
        "max_rss_mb",
        "limit_percent",
    ]
    assert RULE_TYPES["limit_percent"] is ContainerLimit
    assert ContainerLimit.needs_memory


def container_guard(monkeypatch: pytest.MonkeyPatch, reader: FakeContainer) -> Guard:
    monkeypatch.setattr("memwatch.rules.default_container_memory", lambda: reader)
    return Guard(
        Settings(
            limits={"limit_percent": 80},
            behavior=RestartBehavior.EXIT_0,
            reclaim=False,
            min_lifetime_seconds=60,
        )
    )


def test_storm_guard_waits_when_full_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Other processes of the container use 90 % of the limit, and this one did not grow.
    guard = container_guard(monkeypatch, FakeContainer(LIMIT * 9 // 10))
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        assert checker.decide(guard, snap(uptime=1), False, False, LOGGER) is None
    assert "limit_percent=80 % of limit is below this process's footprint" in caplog.text
    decision = checker.decide(guard, snap(uptime=61), False, False, LOGGER)
    assert decision is not None
    assert decision.rule == "limit_percent"


def test_no_storm_when_growth_reached_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = container_guard(monkeypatch, FakeContainer(220 * MIB))
    # Reached after several tasks: growth, not a footprint over the ceiling.
    grown = Snapshot(tasks=5, uptime=1.0, rss=200 * MIB, baseline=50 * MIB)
    decision = checker.decide(guard, grown, False, False, LOGGER)
    assert decision is not None
    assert guard.tracker.storm is False


def test_decorator_builds_container_rule() -> None:
    guarded = restart_when(limit_percent=90, exit_timeout=0)(lambda: None)
    (rule,) = guard_of(guarded).rules
    assert isinstance(rule, ContainerLimit)
    assert rule.limit == 90


RANGE = r"limit_percent must be a number in \(0, 100\]"


@pytest.mark.parametrize(
    "value", [0, 0.0, -1, -0.5, 100.001, 101, 1e9, math.nan, math.inf, -math.inf]
)
def test_out_of_range_raises_value_error(value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{RANGE}, got ") as caught:
        restart_when(limit_percent=value)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("value", [True, False, "80", b"80", [80], object()])
def test_non_number_raises_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{RANGE}, got ") as caught:
        restart_when(limit_percent=value)
    assert repr(value) in str(caught.value)
    assert type(value).__name__ in str(caught.value)


@pytest.mark.parametrize("value", [100, 0.001, decimal.Decimal("99.5")])
def test_accepted_values(value: Any) -> None:
    assert callable(restart_when(limit_percent=value))


@pytest.mark.parametrize(
    ("text", "parsed"), [("80", 80.0), (" 100 ", 100.0), ("0.5", 0.5), ("off", config.REMOVED)]
)
def test_environment_values(text: str, parsed: object) -> None:
    options = config.from_environment({"MEMWATCH_LIMIT_PERCENT": text})
    assert options == {"limit_percent": parsed}


@pytest.mark.parametrize("text", ["0", "150", "-5", "nan", "abc", ""])
def test_bad_environment_values(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^MEMWATCH_LIMIT_PERCENT = {text!r} is invalid: "):
        config.from_environment({"MEMWATCH_LIMIT_PERCENT": text})


def test_environment_off_removes_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_LIMIT_PERCENT", "off")
    guarded = restart_when(limit_percent=80, max_tasks=5, exit_timeout=0)(lambda: None)
    assert [rule.name for rule in guard_of(guarded).rules] == ["max_tasks"]


# The real tests: a worker (tests/worker.py) that keeps 16 MiB more after each call,
# started inside a child memory cgroup, so that it is charged there from its first page.


def run_in_cgroup(target: Path, settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    def join_cgroup() -> None:
        (target / "cgroup.procs").write_text(str(os.getpid()))

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MEMWATCH_")}
    return subprocess.run(
        [sys.executable, str(WORKER), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
        # pytest runs the tests in one thread, so the hook cannot deadlock on a lock
        # another thread held at the fork.
        preexec_fn=join_cgroup,
    )


def call_numbers(stdout: str, prefix: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"^{prefix} (\d+)", stdout, re.MULTILINE)]


def decision_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "restart rule limit_percent" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_real_cgroup_exits_before_oom(child_cgroup: tuple[int, Path]) -> None:  # noqa: F811
    version, top = child_cgroup
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    (top / limit_file).write_text(str(LIMIT))

    run = run_in_cgroup(
        top,
        {
            "rules": {"limit_percent": 80},
            "behavior": "EXIT_1",
            "leak_mib": 16,
            "calls": 40,
        },
    )

    assert run.returncode != -9, f"the OOM killer ended the worker: {run.stderr}"
    assert run.returncode == 1, run.stderr
    calls = call_numbers(run.stdout, "call")
    assert calls, run.stdout
    last = calls[-1]
    assert calls == list(range(1, last + 1))
    # The exit comes before the next call's body runs, and before call 16, which would
    # take the kept allocations alone to 256 MiB.
    assert call_numbers(run.stdout, "body") == calls
    assert last < 16
    assert "finished" not in run.stdout

    line = decision_line(run.stderr)
    print(f"{last} calls; {line}")
    assert f"tripped after task {last}:" in line
    assert "exiting with code 1" in line
    pattern = (
        r"limit_percent (\d+(?:\.\d)?) >= 80 % of limit, working set (\d+\.\d) MiB of the "
        rf"256\.0 MiB limit in cgroup v{version} {re.escape(str(top))} \({limit_file}\)"
    )
    match = re.search(pattern, line)
    assert match, line
    working_set = float(match.group(2)) * MIB
    assert float(match.group(1)) >= 80
    assert working_set >= 0.8 * LIMIT
    # It tripped at the first call that crossed 80 %: one call earlier was below.
    assert working_set - 17 * MIB < 0.8 * LIMIT
    # Every kept allocation is in the working set.
    assert working_set >= last * 16 * MIB


def test_real_cgroup_without_limit_uses_physical_memory(
    child_cgroup: tuple[int, Path],  # noqa: F811
) -> None:
    _, top = child_cgroup
    own = detect()
    own.limit()
    source = own.source
    own.close()
    if source != "physical memory":
        pytest.skip(f"a cgroup above this one sets a memory limit ({source})")
    physical = psutil.virtual_memory().total
    # A threshold about 192 MiB into the physical memory, whatever its size.
    percent = 192 * MIB / physical * 100

    run = run_in_cgroup(
        top,
        {
            "rules": {"limit_percent": percent},
            "behavior": "EXIT_1",
            "leak_mib": 16,
            "calls": 40,
        },
    )

    assert run.returncode == 1, run.stderr
    line = decision_line(run.stderr)
    print(line)
    assert f"MiB of the {physical / MIB:.1f} MiB physical memory" in line
    assert "since no cgroup sets a lower memory limit" in line
    assert "compares with the physical memory" in run.stderr
    last = call_numbers(run.stdout, "call")[-1]
    assert last < 40
