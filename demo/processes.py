"""Process helpers shared by the karton stack and the restart loop."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("demo.processes")

#: Seconds between two checks of a process that was asked to exit.
POLL_INTERVAL = 0.05


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    NOTE: another program may take the port between this call and the
    server's bind; the server then fails to start and its log shows the bind error.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing.

    :param path: log file of a child process
    :param lines: maximum number of lines returned
    """
    try:
        with path.open(encoding="utf-8", errors="replace") as log_file:
            return "".join(deque(log_file, maxlen=lines)).rstrip()
    except FileNotFoundError:
        return f"(log file {path} not found)"


def terminate(
    process: subprocess.Popen[bytes],
    name: str,
    timeout: float,
    wake: Callable[[], None] | None = None,
) -> int:
    """Stop a child process by its PID: SIGTERM, then SIGKILL after ``timeout``.

    :param process: the child, started by this process
    :param name: name used in log messages
    :param timeout: seconds to wait after SIGTERM before sending SIGKILL
    :param wake: called about every 50 ms while waiting, for example to end
        a blocking Redis read that would delay a graceful exit
    :return: the exit status; negative for a signal, as in
        :attr:`subprocess.Popen.returncode`
    """
    if process.poll() is not None:
        return process.returncode

    # Popen.terminate sends SIGTERM to this PID only, and does nothing once
    # the child has been reaped, so a reused PID is never signalled.
    process.terminate()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wake is not None:
            wake()
        try:
            return process.wait(POLL_INTERVAL)
        except subprocess.TimeoutExpired:
            continue

    logger.warning(
        "%s (pid %d) still running %.1f s after SIGTERM, sending SIGKILL",
        name,
        process.pid,
        timeout,
    )
    process.kill()
    return process.wait()
