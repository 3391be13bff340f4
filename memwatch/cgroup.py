"""Reading the memory limit of this process's cgroup and the cgroup's working set.

Past the limit of its memory cgroup, or of any ancestor of it, the kernel's OOM
killer ends a process of the cgroup with SIGKILL, and a task in flight is lost.
:func:`detect` finds the cgroup once, from ``/proc/self/cgroup`` and
``/proc/self/mountinfo``, for cgroup v2 (``memory.max``, ``memory.current``) and the
v1 ``memory`` controller (``memory.limit_in_bytes``, ``memory.usage_in_bytes``). It
keeps the files open, so each later read costs one ``pread`` per file.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import psutil

#: Limits from 2**60 bytes up mean "no limit". v1 reports no limit as LONG_MAX rounded down
#: to a page (9223372036854771712 with 4 KiB pages), and v2 writes ``max``.
UNLIMITED_V1 = 2**60

# memory.stat has about 40 lines on v1 and 60 on v2 (under 2 KiB with Linux 6.x).
_STAT_BUFFER = 16384


@dataclass(frozen=True)
class _Files:
    """Names of the files of one cgroup version."""

    version: int
    limit: str
    usage: str
    #: Page cache that the kernel can reclaim before it kills, subtracted as the kubelet does.
    inactive_file: bytes


_V1 = _Files(1, "memory.limit_in_bytes", "memory.usage_in_bytes", b"total_inactive_file")
_V2 = _Files(2, "memory.max", "memory.current", b"inactive_file")


@dataclass(frozen=True)
class _Mount:
    root: str
    point: str
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as three octal digits (\040).
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        # Fields: id, parent, major:minor, root, mount point, options, optional fields,
        # "-", file system type, source, super options.
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if len(fields) < separator + 4:
            continue
        options = frozenset(fields[separator + 3].split(","))
        mounts.append(
            _Mount(_unescape(fields[3]), _unescape(fields[4]), fields[separator + 1], options)
        )
    return mounts


def _relative(path: str, root: str) -> str | None:
    """Return ``path`` relative to ``root``, or ``None`` when it lies outside."""
    # A cgroup outside the reader's cgroup namespace shows as "/../...", which normpath would
    # turn into a wrong path inside it.
    if ".." in path.split("/") or ".." in root.split("/"):
        return None
    path, root = path.rstrip("/") or "/", root.rstrip("/") or "/"
    if root == "/":
        return path.lstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def _resolve(files: _Files, path: str, mounts: list[_Mount], fs_root: str) -> list[str] | str:
    """Return the directories from the cgroup that accounts memory up to the mount point.

    :returns: the directories, or the reason why there are none.
    """
    matches = [(mount, rel) for mount in mounts if (rel := _relative(path, mount.root)) is not None]
    if not matches:
        return f"no cgroup v{files.version} mount contains the cgroup {path}"
    # With several mounts of the hierarchy, the one mounted deepest matches most precisely.
    mount, rel = max(matches, key=lambda match: len(match[0].root))
    top = os.path.normpath(os.path.join(fs_root, mount.point.lstrip("/")))
    levels = [os.path.normpath(os.path.join(top, rel))]
    while len(levels[-1]) > len(top):
        levels.append(os.path.dirname(levels[-1]))
    # In v2 a cgroup has memory files only when its parent enables the memory controller for
    # its children. Without them, its memory is charged to the nearest ancestor that has them.
    for index, directory in enumerate(levels):
        if os.path.exists(os.path.join(directory, files.usage)):
            return levels[index:]
    return f"no {files.usage} in {levels[0]} or its parents up to the mount point {top}"


def _find_levels(proc_root: str, fs_root: str) -> tuple[_Files, list[str]] | str:
    """Find this process's memory cgroup, preferring v1 where both versions are mounted."""
    cgroup_path = os.path.join(proc_root, "self", "cgroup")
    mountinfo_path = os.path.join(proc_root, "self", "mountinfo")
    try:
        with open(cgroup_path, encoding="utf-8") as file:
            cgroup_lines = file.read().splitlines()
        with open(mountinfo_path, encoding="utf-8") as file:
            mounts = _parse_mountinfo(file.read())
    except (OSError, UnicodeDecodeError) as exc:
        return f"reading {cgroup_path} and {mountinfo_path} failed: {exc!r}"
    paths: dict[int, str] = {}
    for line in cgroup_lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            paths[1] = path
        elif hierarchy == "0" and controllers == "":
            paths[2] = path
    # In the hybrid layout the v1 memory controller counts memory and the v2 hierarchy
    # only groups processes, so v1 goes first.
    reasons = []
    for files, fstype in ((_V1, "cgroup"), (_V2, "cgroup2")):
        if files.version not in paths:
            continue
        candidates = [
            mount
            for mount in mounts
            if mount.fstype == fstype and (fstype == "cgroup2" or "memory" in mount.super_options)
        ]
        levels = _resolve(files, paths[files.version], candidates, fs_root)
        if isinstance(levels, list):
            return files, levels
        reasons.append(levels)
    return "; ".join(reasons) or f"no memory cgroup in {cgroup_path}"


def _physical_memory() -> int | None:
    with contextlib.suppress(psutil.Error, OSError):
        return int(psutil.virtual_memory().total)
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _read_limit(fd: int) -> int | None:
    """Return the limit in a ``memory.max`` or ``memory.limit_in_bytes`` file, ``None`` if none."""
    text = os.pread(fd, 64, 0).strip()
    if text == b"max":
        return None
    value = int(text)
    return None if value >= UNLIMITED_V1 else value


def _stat_value(stat: bytes, key: bytes) -> int:
    match = re.search(rb"^" + key + rb" (\d+)$", stat, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {key.decode()} line in memory.stat")
    return int(match.group(1))


class ContainerMemory:
    """Memory limit and working set of this process's memory cgroup.

    :param proc_root: directory that contains ``self/cgroup`` and ``self/mountinfo``.
    :param fs_root: directory that the mount points listed in mountinfo are relative to.

    No method raises. When no memory cgroup can be read, :attr:`failure` contains the reason,
    :meth:`working_set` returns ``None`` and :meth:`limit` returns the physical memory.
    """

    def __init__(self, proc_root: str = "/proc", fs_root: str = "/") -> None:
        self._proc_root = proc_root
        self._fs_root = fs_root
        self._physical = _physical_memory()
        self._lock = threading.Lock()
        self._forked = False
        self._fds: list[int] = []
        self._limit_fds: list[tuple[str, int]] = []
        self._usage_fd = self._stat_fd = -1
        self._files = _V2
        #: 1 or 2, or ``None`` when no memory cgroup was found.
        self.version: int | None = None
        #: Directory of the cgroup whose memory is measured, or ``None``.
        self.path: str | None = None
        #: Where the last limit came from, such as ``cgroup v2 /sys/fs/cgroup/a (memory.max)``.
        self.source = "physical memory"
        #: Why the detection or the last read failed, or ``None`` after a successful read.
        self.failure: str | None = None
        self._open()
        _instances.add(self)

    def _open(self) -> None:
        self._close_fds()
        self.path = None
        self.source = "physical memory"
        self.failure = None
        found = _find_levels(self._proc_root, self._fs_root)
        if isinstance(found, str):
            self.failure = found
            return
        files, levels = found
        try:
            self._usage_fd = self._open_fd(os.path.join(levels[0], files.usage))
            self._stat_fd = self._open_fd(os.path.join(levels[0], "memory.stat"))
            for directory in levels:
                # The root cgroup of v2 has no memory.max.
                with contextlib.suppress(FileNotFoundError):
                    fd = self._open_fd(os.path.join(directory, files.limit))
                    self._limit_fds.append((directory, fd))
        except OSError as exc:
            self._close_fds()
            self.failure = f"opening the cgroup v{files.version} files failed: {exc!r}"
            return
        self._files = files
        self.version = files.version
        self.path = levels[0]

    def _open_fd(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._limit_fds = []
        self.version = None

    def _forget_after_fork(self) -> None:
        # Another thread of the parent may have held the lock at the fork.
        self._lock = threading.Lock()
        self._forked = True

    def _read(self, read: Callable[[], int | None]) -> int | None:
        with self._lock:
            if self._forked:
                # The child may be moved to another cgroup before it reads, so resolve again.
                self._forked = False
                self._open()
            if self.version is None:
                return None
            try:
                return read()
            except (OSError, ValueError) as exc:
                self.failure = f"reading the cgroup v{self.version} files failed: {exc!r}"
                return None

    def limit(self) -> int | None:
        """Return the smallest memory limit that binds this process, in bytes.

        That is the smallest of the cgroup's limit, its ancestors' limits up to the
        mount point and the physical memory. :attr:`source` names the one that binds.

        :returns: the limit, or ``None`` when a cgroup file cannot be read or no limit
            applies and the physical memory is unknown.
        """
        limit = self._read(self._read_limit)
        if self.version is None:
            return self._physical
        return limit

    def _read_limit(self) -> int | None:
        candidates = [
            (_read_limit(fd), f"{directory} ({self._files.limit})")
            for directory, fd in self._limit_fds
        ]
        if self._files.version == 1:
            # Also covers ancestors above the mount point, which a container cannot see.
            # NOTE: v2 has no such field, so there a limit above the mount point is missed.
            stat = os.pread(self._stat_fd, _STAT_BUFFER, 0)
            hierarchical = _stat_value(stat, b"hierarchical_memory_limit")
            where = f"{self.path} (hierarchical_memory_limit in memory.stat)"
            candidates.append((None if hierarchical >= UNLIMITED_V1 else hierarchical, where))
        limit, source = self._physical, "physical memory"
        for value, where in candidates:
            if value is not None and (limit is None or value < limit):
                limit, source = value, f"cgroup v{self._files.version} {where}"
        self.source = source
        self.failure = None if limit is not None else "no cgroup limit and no physical memory"
        return limit

    def working_set(self) -> int | None:
        """Return the cgroup's usage minus its inactive page cache, in bytes.

        The kubelet computes a container's working set this way. The kernel reclaims
        inactive page cache before it kills, so that cache does not bring the OOM killer.

        :returns: the working set, never below 0, or ``None`` when it cannot be read.
        """
        return self._read(self._read_working_set)

    def _read_working_set(self) -> int:
        usage = int(os.pread(self._usage_fd, 64, 0))
        stat = os.pread(self._stat_fd, _STAT_BUFFER, 0)
        working_set = max(0, usage - _stat_value(stat, self._files.inactive_file))
        self.failure = None
        return working_set

    def close(self) -> None:
        """Close the held files. Later calls behave as when no cgroup was found."""
        _instances.discard(self)
        with self._lock:
            self._close_fds()
            self.path = None
            self.failure = "closed"


_instances: weakref.WeakSet[ContainerMemory] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for memory in list(_instances):
        memory._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def detect(proc_root: str = "/proc", fs_root: str = "/") -> ContainerMemory:
    """Find this process's memory cgroup and open its files, as :class:`ContainerMemory` does."""
    return ContainerMemory(proc_root, fs_root)


_default: ContainerMemory | None = None


def default_container_memory() -> ContainerMemory:
    """Return the process-wide :class:`ContainerMemory`, detecting it on first use."""
    global _default
    if _default is None:
        _default = detect()
    return _default
