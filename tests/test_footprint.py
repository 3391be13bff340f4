"""The USS and PSS reader: parsing, fallbacks, and real processes that allocate and fork."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pytest_mock import MockerFixture

from memwatch.footprint import FootprintReader, parse_smaps_rollup

MIB = 1024 * 1024
HAS_SMAPS_ROLLUP = Path("/proc/self/smaps_rollup").exists()

ROLLUP = b"""55868c1af000-7ffde6ead000 ---p 00000000 00:00 0                          [rollup]
Rss:                1652 kB
Pss:                 254 kB
Pss_Anon:            112 kB
Shared_Clean:       1540 kB
Shared_Dirty:          0 kB
Private_Clean:         8 kB
Private_Dirty:       112 kB
Anonymous:           112 kB
Private_Hugetlb:    2048 kB
Swap:                 16 kB
SwapPss:              16 kB
"""

# Prints the footprint before and after allocating argv[1] MiB of private memory.
ALLOCATING_CHILD = """
import dataclasses, json, sys
from memwatch.footprint import FootprintReader
reader = FootprintReader()
before = dataclasses.asdict(reader.read())
block = bytearray(b"\\x01") * (int(sys.argv[1]) * 1024 * 1024)
after = dataclasses.asdict(reader.read())
print(json.dumps({"before": before, "after": after}))
"""

# Allocates 128 MiB, forks, and prints the child's footprint while the parent still
# maps the same pages, then the child's footprint after it allocates 64 MiB of its own.
# The reader is created before the fork, so the child reads through a reopened file.
FORKING_CHILD = """
import dataclasses, json, os
from memwatch.footprint import FootprintReader
reader = FootprintReader()
shared = bytearray(b"\\x01") * (128 * 1024 * 1024)
pid = os.fork()
if pid == 0:
    at_fork = dataclasses.asdict(reader.read())
    private = bytearray(b"\\x02") * (64 * 1024 * 1024)
    grown = dataclasses.asdict(reader.read())
    print(json.dumps({"at_fork": at_fork, "grown": grown}), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.fixture
def readers() -> Iterator[list[FootprintReader]]:
    """Return a list that the test appends its readers to; close them after the test."""
    created: list[FootprintReader] = []
    yield created
    for reader in created:
        reader.close()


def run_child(code: str, *args: str) -> dict[str, dict[str, Any]]:
    completed = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, dict[str, Any]] = json.loads(completed.stdout)
    return result


def test_parse_smaps_rollup() -> None:
    footprint = parse_smaps_rollup(ROLLUP)
    assert footprint.rss == 1652 * 1024
    assert footprint.pss == 254 * 1024
    # Private_Clean + Private_Dirty + Private_Hugetlb, as psutil counts the USS.
    assert footprint.uss == (8 + 112 + 2048) * 1024
    assert footprint.swap == 16 * 1024
    assert footprint.source == "smaps_rollup"


def test_parse_smaps_rollup_older_kernel() -> None:
    # Only the Rss, Pss, Private_Clean and Private_Dirty lines are required.
    text = b"".join(
        line + b"\n" for line in ROLLUP.splitlines() if not line.startswith((b"Private_H", b"Swap"))
    )
    footprint = parse_smaps_rollup(text)
    assert footprint.uss == (8 + 112) * 1024
    assert footprint.swap is None


def test_parse_smaps_rollup_missing_line() -> None:
    text = b"".join(line + b"\n" for line in ROLLUP.splitlines() if not line.startswith(b"Pss:"))
    with pytest.raises(ValueError, match="smaps_rollup has no Pss line"):
        parse_smaps_rollup(text)


@pytest.mark.skipif(not HAS_SMAPS_ROLLUP, reason="needs /proc/self/smaps_rollup (Linux 4.14+)")
def test_reader_uses_smaps_rollup(readers: list[FootprintReader]) -> None:
    reader = FootprintReader()
    readers.append(reader)
    footprint = reader.read()
    assert footprint is not None
    assert footprint.source == "smaps_rollup"
    assert footprint.pss is not None
    assert 0 < footprint.uss <= footprint.pss <= footprint.rss
    assert reader.failure is None


def test_missing_file_falls_back_to_psutil(readers: list[FootprintReader], tmp_path: Path) -> None:
    reader = FootprintReader(str(tmp_path / "missing"))
    readers.append(reader)
    footprint = reader.read()
    assert footprint is not None
    assert footprint.source == "psutil"
    assert 0 < footprint.uss <= footprint.rss
    assert reader.failure is None


def test_malformed_file_falls_back_to_psutil(
    readers: list[FootprintReader], tmp_path: Path
) -> None:
    path = tmp_path / "smaps_rollup"
    path.write_bytes(b"header\nRss: many kB\n")
    reader = FootprintReader(str(path))
    readers.append(reader)
    footprint = reader.read()
    assert footprint is not None
    assert footprint.source == "psutil"
    # The broken file is closed and not read again.
    path.write_bytes(ROLLUP)
    second = reader.read()
    assert second is not None
    assert second.source == "psutil"


def test_no_source_returns_none(
    readers: list[FootprintReader], tmp_path: Path, mocker: MockerFixture
) -> None:
    mocker.patch.object(psutil.Process, "memory_full_info", side_effect=psutil.AccessDenied(1))
    reader = FootprintReader(str(tmp_path / "missing"))
    readers.append(reader)
    assert reader.read() is None
    assert reader.uss() is None
    assert reader.pss() is None
    assert reader.failure is not None
    assert reader.failure.startswith("psutil could not read the memory footprint")


def test_psutil_without_pss(
    readers: list[FootprintReader], tmp_path: Path, mocker: MockerFixture
) -> None:
    # psutil's memory_full_info() on macOS has uss but no pss and no swap.
    info = mocker.Mock(spec=["rss", "uss"], rss=10 * MIB, uss=6 * MIB)
    mocker.patch.object(psutil.Process, "memory_full_info", return_value=info)
    reader = FootprintReader(str(tmp_path / "missing"))
    readers.append(reader)
    assert reader.uss() == 6 * MIB
    assert reader.pss() is None
    assert reader.failure == "psutil cannot read the PSS on this platform"


def test_psutil_without_uss(
    readers: list[FootprintReader], tmp_path: Path, mocker: MockerFixture
) -> None:
    # Outside Linux, macOS and Windows, memory_full_info() has only memory_info()'s fields.
    info = mocker.Mock(spec=["rss", "vms"], rss=10 * MIB, vms=20 * MIB)
    mocker.patch.object(psutil.Process, "memory_full_info", return_value=info)
    reader = FootprintReader(str(tmp_path / "missing"))
    readers.append(reader)
    assert reader.read() is None
    assert reader.failure == "psutil cannot read the USS on this platform"


@pytest.mark.skipif(not HAS_SMAPS_ROLLUP, reason="needs /proc/self/smaps_rollup (Linux 4.14+)")
def test_private_allocation_grows_uss() -> None:
    result = run_child(ALLOCATING_CHILD, "200")
    before, after = result["before"], result["after"]
    assert after["source"] == "smaps_rollup"
    for field in ("uss", "rss"):
        growth = after[field] - before[field]
        assert 200 * MIB <= growth <= 204 * MIB, (field, growth)
    # The PSS of the shared pages (libraries) moves as other processes map or unmap them,
    # by at most the shared part of the RSS.
    shared = after["rss"] - after["uss"]
    pss_growth = after["pss"] - before["pss"]
    assert abs(pss_growth - 200 * MIB) <= 4 * MIB + shared, (pss_growth, shared)


@pytest.mark.skipif(not HAS_SMAPS_ROLLUP, reason="needs /proc/self/smaps_rollup (Linux 4.14+)")
def test_forked_child_shares_pages() -> None:
    result = run_child(FORKING_CHILD)
    at_fork, grown = result["at_fork"], result["grown"]
    # Parent and child both map the 128 MiB, so each carries half of it in its PSS.
    assert at_fork["rss"] - at_fork["pss"] >= 64 * MIB
    assert at_fork["rss"] - at_fork["uss"] >= 128 * MIB
    # The child's own 64 MiB shows in its USS: the reader reopened /proc/self after the fork.
    assert 64 * MIB <= grown["uss"] - at_fork["uss"] <= 68 * MIB
