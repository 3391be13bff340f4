"""Reading this process's resident set size (RSS), cheaply enough to do after every task.

On Linux the reader keeps ``/proc/self/statm`` open and reads it with one
``pread`` per call, which costs a single system call and no allocation of file
objects. Elsewhere, or when ``/proc`` cannot be read, it uses psutil.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import weakref
from typing import Protocol

import psutil

#: One MiB in bytes. memwatch's "MB" arguments are MiB, as karton-memory-watcher computed them.
MIB = 1024 * 1024

_STATM_PATH = "/proc/self/statm"
_logger = logging.getLogger("memwatch")


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


class HeldProcFile:
    """Base of the readers that keep one ``/proc/self`` file open and fall back to psutil.

    ``read()`` of a subclass never raises: when no source works it returns ``None``
    and the reason is kept in :attr:`failure`.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None
        self._process: psutil.Process | None = None
        self._lock = threading.Lock()
        #: Why the last read failed, or ``None`` after a successful read.
        self.failure: str | None = None
        self._open()
        reopen_after_fork(self)

    def _open(self) -> None:
        # /proc/self resolves to this PID when opened, so a forked child must open it again.
        self._fd = None
        self._process = None
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            _logger.debug("memwatch: opening %s failed (%r), using psutil", self._path, exc)

    def reopen(self) -> None:
        """Open the sources again for the current process (called in a forked child)."""
        self._lock = threading.Lock()
        old_fd = self._fd
        self._open()
        if old_fd is not None:
            with contextlib.suppress(OSError):
                os.close(old_fd)

    def close(self) -> None:
        """Close the held file. Later reads use psutil."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _psutil_process(self) -> psutil.Process:
        """Return this process's psutil handle, created once; may raise psutil.Error."""
        with self._lock:
            if self._process is None:
                self._process = psutil.Process()
            return self._process


class RssReader(HeldProcFile):
    """Reader of this process's RSS in bytes, so that count and time rules keep
    working when memory cannot be read."""

    def __init__(self) -> None:
        self._page_size = _page_size()
        super().__init__(_STATM_PATH)

    def read(self) -> int | None:
        """Return the RSS in bytes, or ``None`` when it cannot be read."""
        fd = self._fd
        if fd is not None:
            try:
                # statm fields are in pages: size, resident, shared, text, lib, data, dt.
                return int(os.pread(fd, 128, 0).split(None, 2)[1]) * self._page_size
            except (OSError, ValueError, IndexError) as exc:
                self.close()
                self.failure = f"reading {_STATM_PATH} failed: {exc!r}"
                _logger.debug("memwatch: %s, falling back to psutil", self.failure)
        return self._read_psutil()

    def read_or_inf(self) -> float:
        """Return the RSS in bytes, or infinity when it cannot be read.

        For the hot path: infinity is above every threshold, so a failed read
        sends the call to the full check, which logs the failure.
        """
        fd = self._fd
        if fd is not None:
            try:
                return int(os.pread(fd, 128, 0).split(None, 2)[1]) * self._page_size
            except (OSError, ValueError, IndexError):
                pass  # read() below records the failure and falls back to psutil
        rss = self.read()
        return math.inf if rss is None else rss

    def _read_psutil(self) -> int | None:
        try:
            rss = int(self._psutil_process().memory_info().rss)
        except (psutil.Error, OSError) as exc:
            self.failure = f"psutil could not read the RSS: {exc!r}"
            return None
        self.failure = None
        return rss


class Reopenable(Protocol):
    """A reader of ``/proc/self`` files, which a forked child must open again."""

    def reopen(self) -> None:
        """Open the sources again for the current process."""


# /proc/self resolves to the PID that opened it, so every held descriptor of a
# forked child still reads its parent until the child opens it again.
_readers: weakref.WeakSet[Reopenable] = weakref.WeakSet()


def reopen_after_fork(reader: Reopenable) -> None:
    """Have ``reader.reopen()`` called in every forked child of this process."""
    _readers.add(reader)


def _reopen_after_fork() -> None:
    for reader in list(_readers):
        reader.reopen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_after_fork)

_default_reader: RssReader | None = None


def default_reader() -> RssReader:
    """Return the process-wide reader, creating it on first use."""
    global _default_reader
    if _default_reader is None:
        _default_reader = RssReader()
    return _default_reader


def to_mib(size: float) -> float:
    """Convert bytes to MiB."""
    return size / MIB
