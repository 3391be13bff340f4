"""The cgroup reader on fake /proc and /sys trees, one per layout, and on a real cgroup."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from memwatch.cgroup import UNLIMITED_V1, ContainerMemory, detect

MIB = 1024 * 1024
PHYSICAL = psutil.virtual_memory().total
V2_MOUNT = "41 23 0:38 {root} /sys/fs/cgroup rw,relatime shared:9 - cgroup2 cgroup2 rw"
V1_MOUNT = "35 31 0:32 {root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
CPU_MOUNT = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu"
V2_ROOT = [V2_MOUNT.format(root="/")]
UNIFIED_MOUNT = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"


def v2_stat(inactive_file: int) -> str:
    return f"anon 1000\nfile 2000\nactive_file 500\ninactive_file {inactive_file}\nslab 10\n"


def v1_stat(total_inactive_file: int, hierarchical_limit: int = 9223372036854771712) -> str:
    return (
        f"cache 100\nrss 200\ninactive_file 7\nhierarchical_memory_limit {hierarchical_limit}\n"
        f"total_cache 100\ntotal_inactive_file {total_inactive_file}\ntotal_active_file 3\n"
    )


#: Writes /proc/self/cgroup lines, mountinfo lines and cgroup files, then runs detect().
TreeBuilder = Callable[[list[str], list[str], dict[str, "str | int"]], ContainerMemory]


@pytest.fixture
def fake_tree(tmp_path: Path) -> Iterator[TreeBuilder]:
    """Return a builder of fake /proc and /sys trees under tmp_path, closing its readers after."""
    detected: list[ContainerMemory] = []

    def build(cgroup: list[str], mounts: list[str], files: dict[str, str | int]) -> ContainerMemory:
        proc_self = tmp_path / "proc" / "self"
        proc_self.mkdir(parents=True)
        (proc_self / "cgroup").write_text("".join(f"{line}\n" for line in cgroup))
        (proc_self / "mountinfo").write_text("".join(f"{line}\n" for line in mounts))
        for name, content in files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{content}\n")
        memory = detect(proc_root=str(tmp_path / "proc"), fs_root=str(tmp_path))
        detected.append(memory)
        return memory

    yield build
    for memory in detected:
        memory.close()


def test_v2_nested_parent_limit_binds(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    service = "sys/fs/cgroup/system.slice/worker.service"
    memory = fake_tree(
        ["0::/system.slice/worker.service"],
        V2_ROOT,
        {
            "sys/fs/cgroup/system.slice/memory.max": 512 * MIB,
            f"{service}/memory.max": "max",
            f"{service}/memory.current": 100 * MIB,
            f"{service}/memory.stat": v2_stat(10 * MIB),
        },
    )
    assert memory.version == 2
    assert memory.path == str(tmp_path / service)
    assert memory.limit() == 512 * MIB
    assert memory.source == f"cgroup v2 {tmp_path}/sys/fs/cgroup/system.slice (memory.max)"
    assert memory.working_set() == 90 * MIB
    assert memory.failure is None


def test_v2_max_everywhere_is_physical(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(
        ["0::/worker"],
        V2_ROOT,
        {
            "sys/fs/cgroup/worker/memory.max": "max",
            "sys/fs/cgroup/worker/memory.current": 100 * MIB,
            "sys/fs/cgroup/worker/memory.stat": v2_stat(0),
        },
    )
    assert memory.limit() == PHYSICAL
    assert memory.source == "physical memory"
    assert memory.working_set() == 100 * MIB


def test_v2_limit_above_physical_is_physical(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(
        ["0::/worker"],
        V2_ROOT,
        {
            "sys/fs/cgroup/worker/memory.max": PHYSICAL + 1,
            "sys/fs/cgroup/worker/memory.current": 1,
            "sys/fs/cgroup/worker/memory.stat": v2_stat(0),
        },
    )
    assert memory.limit() == PHYSICAL
    assert memory.source == "physical memory"


def test_v2_namespaced_root_stops_at_mount(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    # Without a cgroup namespace, a container's own cgroup is mounted at /sys/fs/cgroup and
    # mountinfo's root field names that cgroup.
    container = "/kubepods/pod1/ctr1"
    memory = fake_tree(
        [f"0::{container}/app"],
        [V2_MOUNT.format(root=container)],
        {
            "sys/fs/memory.max": MIB,  # above the mount point: never read
            "sys/fs/cgroup/memory.max": 300 * MIB,
            "sys/fs/cgroup/app/memory.max": "max",
            "sys/fs/cgroup/app/memory.current": 50 * MIB,
            "sys/fs/cgroup/app/memory.stat": v2_stat(MIB),
        },
    )
    assert memory.path == str(tmp_path / "sys/fs/cgroup/app")
    assert memory.limit() == 300 * MIB
    assert memory.source == f"cgroup v2 {tmp_path}/sys/fs/cgroup (memory.max)"
    assert memory.working_set() == 49 * MIB


def test_v2_cgroup_namespace_root(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    # With a cgroup namespace both files show the namespace's root as "/".
    memory = fake_tree(
        ["0::/"],
        V2_ROOT,
        {
            "sys/fs/cgroup/memory.max": 256 * MIB,
            "sys/fs/cgroup/memory.current": 20 * MIB,
            "sys/fs/cgroup/memory.stat": v2_stat(0),
        },
    )
    assert memory.path == str(tmp_path / "sys/fs/cgroup")
    assert memory.limit() == 256 * MIB


def test_v2_memory_controller_in_parent_only(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    memory = fake_tree(
        ["0::/a/b"],
        V2_ROOT,
        {
            "sys/fs/cgroup/a/memory.max": 64 * MIB,
            "sys/fs/cgroup/a/memory.current": 8 * MIB,
            "sys/fs/cgroup/a/memory.stat": v2_stat(0),
            "sys/fs/cgroup/a/b/cgroup.procs": 1,
        },
    )
    assert memory.path == str(tmp_path / "sys/fs/cgroup/a")
    assert memory.limit() == 64 * MIB
    assert memory.working_set() == 8 * MIB


def test_v2_root_without_memory_files(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(["0::/"], V2_ROOT, {"sys/fs/cgroup/cgroup.procs": 1})
    assert memory.version is None
    assert memory.failure is not None
    assert "no memory.current" in memory.failure
    assert memory.limit() == PHYSICAL
    assert memory.source == "physical memory"
    assert memory.working_set() is None


def test_v1_mount_root_is_container(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    memory = fake_tree(
        ["5:cpu:/docker/abc", "4:memory:/docker/abc", "0::/"],
        [CPU_MOUNT, V1_MOUNT.format(root="/docker/abc")],
        {
            "sys/fs/cgroup/memory/memory.limit_in_bytes": 256 * MIB,
            "sys/fs/cgroup/memory/memory.usage_in_bytes": 80 * MIB,
            "sys/fs/cgroup/memory/memory.stat": v1_stat(5 * MIB),
        },
    )
    assert memory.version == 1
    assert memory.limit() == 256 * MIB
    assert memory.source == f"cgroup v1 {tmp_path}/sys/fs/cgroup/memory (memory.limit_in_bytes)"
    assert memory.working_set() == 75 * MIB


def test_v1_hierarchical_limit_covers_hidden_parent(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    directory = "sys/fs/cgroup/memory"
    memory = fake_tree(
        ["4:memory:/docker/abc"],
        [V1_MOUNT.format(root="/docker/abc")],
        {
            f"{directory}/memory.limit_in_bytes": 9223372036854771712,
            f"{directory}/memory.usage_in_bytes": 80 * MIB,
            f"{directory}/memory.stat": v1_stat(0, hierarchical_limit=128 * MIB),
        },
    )
    assert memory.limit() == 128 * MIB
    expected = f"cgroup v1 {tmp_path}/{directory} (hierarchical_memory_limit in memory.stat)"
    assert memory.source == expected


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (UNLIMITED_V1 - 1, UNLIMITED_V1 - 1),
        (UNLIMITED_V1, None),
        (9223372036854771712, None),  # LONG_MAX rounded down to 4 KiB pages
        (9223372036854710272, None),  # LONG_MAX rounded down to 64 KiB pages
    ],
)
def test_v1_unlimited_boundary(fake_tree: TreeBuilder, value: int, limit: int | None) -> None:
    # Compared with a huge physical memory, so that only the v1 threshold decides.
    memory = fake_tree(
        ["4:memory:/w"],
        [V1_MOUNT.format(root="/")],
        {
            "sys/fs/cgroup/memory/w/memory.limit_in_bytes": value,
            "sys/fs/cgroup/memory/w/memory.usage_in_bytes": 1,
            "sys/fs/cgroup/memory/w/memory.stat": v1_stat(0, hierarchical_limit=value),
        },
    )
    memory._physical = None
    assert memory.limit() == limit


def test_hybrid_layout_uses_v1(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    memory = fake_tree(
        ["4:memory:/svc/w", "0::/"],
        [V1_MOUNT.format(root="/"), UNIFIED_MOUNT],
        {
            "sys/fs/cgroup/memory/svc/memory.limit_in_bytes": 200 * MIB,
            "sys/fs/cgroup/memory/svc/w/memory.limit_in_bytes": 300 * MIB,
            "sys/fs/cgroup/memory/svc/w/memory.usage_in_bytes": 10 * MIB,
            "sys/fs/cgroup/memory/svc/w/memory.stat": v1_stat(MIB, 200 * MIB),
        },
    )
    assert memory.version == 1
    assert memory.limit() == 200 * MIB
    assert memory.source == f"cgroup v1 {tmp_path}/sys/fs/cgroup/memory/svc (memory.limit_in_bytes)"
    assert memory.working_set() == 9 * MIB


def test_escaped_mount_point(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(
        ["0::/w"],
        [V2_MOUNT.format(root="/").replace("/sys/fs/cgroup", r"/sys/fs/my\040cgroups")],
        {
            "sys/fs/my cgroups/w/memory.max": 32 * MIB,
            "sys/fs/my cgroups/w/memory.current": MIB,
            "sys/fs/my cgroups/w/memory.stat": v2_stat(0),
        },
    )
    assert memory.limit() == 32 * MIB


def test_cgroup_outside_namespace(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(["0::/../other"], V2_ROOT, {})
    assert memory.failure == "no cgroup v2 mount contains the cgroup /../other"
    assert memory.working_set() is None


def test_missing_proc_files(tmp_path: Path) -> None:
    memory = detect(proc_root=str(tmp_path / "none"), fs_root=str(tmp_path))
    assert memory.failure is not None
    assert memory.failure.startswith(f"reading {tmp_path}/none/self/cgroup")
    assert memory.limit() == PHYSICAL
    assert memory.working_set() is None


def test_working_set_not_below_zero(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(
        ["0::/w"],
        V2_ROOT,
        {"sys/fs/cgroup/w/memory.current": MIB, "sys/fs/cgroup/w/memory.stat": v2_stat(2 * MIB)},
    )
    assert memory.working_set() == 0


def test_limit_change_is_read_again(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    memory = fake_tree(
        ["0::/w"],
        V2_ROOT,
        {
            "sys/fs/cgroup/w/memory.max": 100 * MIB,
            "sys/fs/cgroup/w/memory.current": MIB,
            "sys/fs/cgroup/w/memory.stat": v2_stat(0),
        },
    )
    assert memory.limit() == 100 * MIB
    # write_text rewrites the same inode, as a write to cgroupfs changes the same file.
    (tmp_path / "sys/fs/cgroup/w/memory.max").write_text(f"{50 * MIB}\n")
    assert memory.limit() == 50 * MIB


def test_unreadable_values_fail_softly(fake_tree: TreeBuilder, tmp_path: Path) -> None:
    memory = fake_tree(
        ["0::/w"],
        V2_ROOT,
        {"sys/fs/cgroup/w/memory.current": "garbage", "sys/fs/cgroup/w/memory.stat": "anon 1"},
    )
    assert memory.working_set() is None
    assert memory.failure is not None
    assert "reading the cgroup v2 files failed" in memory.failure
    (tmp_path / "sys/fs/cgroup/w/memory.current").write_text("5\n")
    assert memory.working_set() is None
    assert "no inactive_file line in memory.stat" in memory.failure


def test_closed_reader(fake_tree: TreeBuilder) -> None:
    memory = fake_tree(
        ["0::/w"],
        V2_ROOT,
        {"sys/fs/cgroup/w/memory.current": 5, "sys/fs/cgroup/w/memory.stat": v2_stat(0)},
    )
    memory.close()
    assert memory.working_set() is None
    assert memory.failure == "closed"


# Waits for the test to move it into the cgroup, then allocates the bytes of each line
# it receives and prints what memwatch.cgroup reads after each allocation.
ALLOCATING_CHILD = """
import json, sys
sys.stdin.readline()
from memwatch.cgroup import detect
memory = detect()
blocks = []
for line in sys.stdin:
    blocks.append(bytearray(b"\\x01") * int(line))
    reading = {"limit": memory.limit(), "working_set": memory.working_set()}
    print(json.dumps({**reading, "source": memory.source, "path": memory.path}), flush=True)
"""

# Writes 64 MiB to the file named by argv[1] in 1 MiB chunks, so that the file's page
# cache, not the process's own memory, grows, and prints the working set before and after.
PAGE_CACHE_CHILD = """
import json, os, sys
sys.stdin.readline()
from memwatch.cgroup import detect
memory = detect()
before = memory.working_set()
chunk = b"x" * 1024 * 1024
with open(sys.argv[1], "wb") as file:
    for _ in range(64):
        file.write(chunk)
    file.flush()
    os.fsync(file.fileno())
print(json.dumps({"before": before, "after": memory.working_set()}), flush=True)
sys.stdin.readline()
"""

# Detects in the test's cgroup, forks, and the child moves itself into the cgroup
# named by argv[1] before its first read.
FORKING_CHILD = """
import json, os, sys
from memwatch.cgroup import detect
memory = detect()
print(json.dumps({"limit": memory.limit(), "path": memory.path}), flush=True)
pid = os.fork()
if pid == 0:
    with open(sys.argv[1], "w") as procs:
        procs.write(str(os.getpid()))
    print(json.dumps({"limit": memory.limit(), "path": memory.path}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def read_working_set(directory: Path, version: int) -> int:
    """Read usage minus inactive page cache straight from the cgroup's files."""
    usage = int(
        (directory / ("memory.current" if version == 2 else "memory.usage_in_bytes")).read_text()
    )
    key = "inactive_file" if version == 2 else "total_inactive_file"
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return usage - int(stat[key])


def remove_cgroup(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir():
            remove_cgroup(child)
    # The kernel can report EBUSY for a moment after the last process exits.
    for _ in range(50):
        try:
            directory.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    directory.rmdir()


@pytest.fixture
def child_cgroup() -> Iterator[tuple[int, Path]]:
    """Create a child of this process's memory cgroup, and remove it after the test."""
    memory = detect()
    version, path = memory.version, memory.path
    memory.close()
    if version is None or path is None:
        pytest.skip(f"no memory cgroup to create a child in: {memory.failure}")
    own = Path(path)
    procs = (own / "cgroup.procs").read_text().split()
    if str(os.getpid()) not in procs:
        pytest.skip(f"this process is not in {own}, the cgroup that accounts its memory")
    if version == 2 and "memory" not in (own / "cgroup.subtree_control").read_text().split():
        pytest.skip(
            f"cgroup v2: memory is not enabled in {own}/cgroup.subtree_control, and a "
            "non-root cgroup that contains processes (this one contains pytest) cannot enable it"
        )
    created = own / f"memwatch-test-{uuid.uuid4().hex[:8]}"
    try:
        created.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {own}: {exc}")
    try:
        yield version, created
    finally:
        remove_cgroup(created)


@pytest.mark.parametrize("nested", [False, True])
def test_real_cgroup_limit_and_working_set(child_cgroup: tuple[int, Path], nested: bool) -> None:
    version, top = child_cgroup
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    (top / limit_file).write_text(str(256 * MIB))

    target = top
    if nested:
        # The process runs in a child of the limited cgroup: the parent's limit binds it.
        if version == 2:
            (top / "cgroup.subtree_control").write_text("+memory")
        target = top / "worker"
        target.mkdir()

    process = subprocess.Popen(
        [sys.executable, "-c", ALLOCATING_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    readings = []
    try:
        (target / "cgroup.procs").write_text(str(process.pid))
        process.stdin.write("go\n")
        for size in [0] + [32 * MIB] * 5:
            process.stdin.write(f"{size}\n")
            process.stdin.flush()
            reading = json.loads(process.stdout.readline())
            readings.append((reading, read_working_set(target, version)))
    finally:
        process.stdin.close()
        process.wait(timeout=30)

    for reading, direct in readings:
        assert reading["limit"] == 256 * MIB
        assert reading["source"] == f"cgroup v{version} {top} ({limit_file})"
        assert reading["path"] == str(target)
        # The child is idle between its read and the test's read.
        assert abs(reading["working_set"] - direct) <= MIB
    for (before, _), (after, _) in itertools.pairwise(readings):
        growth = after["working_set"] - before["working_set"]
        assert 31 * MIB <= growth <= 36 * MIB


def test_real_cgroup_read_again_after_fork(child_cgroup: tuple[int, Path]) -> None:
    version, top = child_cgroup
    (top / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(256 * MIB))
    completed = subprocess.run(
        [sys.executable, "-c", FORKING_CHILD, str(top / "cgroup.procs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    parent, child = (json.loads(line) for line in completed.stdout.splitlines())
    assert parent["path"] != str(top)
    assert child["path"] == str(top)
    assert child["limit"] == 256 * MIB


def test_real_cgroup_page_cache_not_counted(child_cgroup: tuple[int, Path], tmp_path: Path) -> None:
    version, top = child_cgroup
    mounts = [
        part
        for part in psutil.disk_partitions(all=True)
        if tmp_path.is_relative_to(part.mountpoint)
    ]
    if max(mounts, key=lambda part: len(part.mountpoint)).fstype == "tmpfs":
        pytest.skip(f"{tmp_path} is on tmpfs, whose pages are shared memory, not page cache")
    usage_file = top / ("memory.current" if version == 2 else "memory.usage_in_bytes")
    process = subprocess.Popen(
        [sys.executable, "-c", PAGE_CACHE_CHILD, str(tmp_path / "data")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        (top / "cgroup.procs").write_text(str(process.pid))
        usage_before = int(usage_file.read_text())
        process.stdin.write("go\n")
        process.stdin.flush()
        reading = json.loads(process.stdout.readline())
        usage_after = int(usage_file.read_text())
    finally:
        process.stdin.close()
        process.wait(timeout=30)
    # The written file's pages are charged to the cgroup but sit on the inactive list.
    assert usage_after - usage_before >= 60 * MIB
    assert reading["after"] - reading["before"] < 16 * MIB
