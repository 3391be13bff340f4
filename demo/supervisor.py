"""A restart loop for one worker command, like systemd's ``Restart=always``."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from demo.processes import terminate

logger = logging.getLogger("demo.supervisor")

#: The log line that memwatch writes when a rule trips, and its exit code.
DECISION_PATTERN = re.compile(r"restart rule (\w+) tripped")
EXIT_CODE_PATTERN = re.compile(r"exiting with code (\d+)")


@dataclass(frozen=True)
class RestartDecision:
    """A memwatch decision read from a worker's log."""

    rule: str
    exit_code: int


@dataclass
class Generation:
    """One run of the command: one worker process from start to exit."""

    number: int
    pid: int
    log_path: Path
    started_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    decision: RestartDecision | None = None


def read_decision(log_path: Path) -> RestartDecision | None:
    """Parse the last memwatch restart decision from a worker's log.

    :return: the rule's name and the announced exit code, or ``None`` when
        no line of the log matches both patterns
    """
    decision = None
    with log_path.open(encoding="utf-8", errors="replace") as log_file:
        for line in log_file:
            rule_match = DECISION_PATTERN.search(line)
            code_match = EXIT_CODE_PATTERN.search(line)
            if rule_match and code_match:
                decision = RestartDecision(rule_match[1], int(code_match[1]))
    return decision


class RestartLoop:
    """Run a command again and again in a background thread until :meth:`stop`.

    Each run is a :class:`Generation`. Its standard output and error go to
    ``<log_dir>/<name>-<number>.log``.

    :param argv: the command and its arguments
    :param log_dir: folder for the generations' logs; created if missing
    :param env: environment of the command; this process's when ``None``
    :param cwd: working folder of the command
    :param delay: seconds between a generation's exit and the next start
    :param stop_timeout: seconds a generation may take to exit after SIGTERM
        in :meth:`stop` before it gets SIGKILL
    :param wake: called repeatedly while :meth:`stop` waits for the process,
        for example :meth:`demo.stack.KartonStack.unblock_clients`
    :param name: prefix of the log files and of log messages
    """

    def __init__(
        self,
        argv: list[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        delay: float = 0.0,
        stop_timeout: float = 10.0,
        wake: Callable[[], None] | None = None,
        name: str = "worker",
    ) -> None:
        if not argv:
            raise ValueError("argv must contain at least the command")
        if delay < 0:
            raise ValueError(f"delay must be 0 or more seconds, got {delay}")
        self.argv = list(argv)
        self.log_dir = log_dir
        self.env = env
        self.cwd = cwd
        self.delay = delay
        self.stop_timeout = stop_timeout
        self.wake = wake
        self.name = name
        self._generations: list[Generation] = []
        self._process: subprocess.Popen[bytes] | None = None
        # The lock orders spawning against stop(): once _stopping is set
        # under it, no new generation starts.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> RestartLoop:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def generations(self) -> list[Generation]:
        """A copy of every generation so far, the running one last."""
        with self._lock:
            return list(self._generations)

    @property
    def restarts(self) -> int:
        """Number of generations that exited and were followed by another."""
        with self._lock:
            return max(len(self._generations) - 1, 0)

    def start(self) -> None:
        """Start the background thread, which starts every generation, and return."""
        if self._thread is not None:
            raise RuntimeError(f"restart loop {self.name} is already started")
        if self._stopping.is_set():
            raise RuntimeError(f"restart loop {self.name} is stopped; create a new one")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(
            target=self._run, name=f"restart-loop-{self.name}", daemon=True
        )
        self._thread.start()

    def wait_for_generation(self, number: int, timeout: float) -> Generation:
        """Wait until generation ``number`` (counted from 1) has started.

        :raises TimeoutError: it did not start within ``timeout`` seconds
        :raises RuntimeError: the loop failed to start a process
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._generations) < number:
                if self._error is not None:
                    raise RuntimeError(
                        f"restart loop {self.name} failed to start {self.argv[0]}: {self._error}"
                    ) from self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"generation {number} of {self.name} did not start within "
                        f"{timeout} s; {len(self._generations)} started so far"
                    )
                self._changed.wait(remaining)
            return self._generations[number - 1]

    def wait_for_exit(self, number: int, timeout: float) -> Generation:
        """Wait until generation ``number`` has exited and return its record.

        :raises TimeoutError: it did not exit within ``timeout`` seconds
        """
        deadline = time.monotonic() + timeout
        self.wait_for_generation(number, timeout)
        with self._changed:
            generation = self._generations[number - 1]
            while generation.exit_code is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"generation {number} of {self.name} (pid {generation.pid}) "
                        f"did not exit within {timeout} s"
                    )
                self._changed.wait(remaining)
            return generation

    def stop(self) -> None:
        """Stop restarting and end the running generation by its PID.

        The process gets SIGTERM, then SIGKILL after :attr:`stop_timeout`.
        Calling it again does nothing. A stopped loop cannot be started again.
        """
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None:
            terminate(process, self.name, self.stop_timeout, self.wake)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        number = 0
        while True:
            number += 1
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    generation, process = self._spawn(number)
                except OSError as error:
                    logger.error("failed to start %s: %s", self.argv, error)
                    self._error = error
                    self._changed.notify_all()
                    return
                self._changed.notify_all()

            exit_code = process.wait()
            self._record_exit(generation, exit_code)
            if self._stopping.wait(self.delay):
                return

    def _spawn(self, number: int) -> tuple[Generation, subprocess.Popen[bytes]]:
        log_path = self.log_dir / f"{self.name}-{number}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # A terminal's Ctrl-C goes to the parent, which stops the
                # worker through stop(), not to the worker directly.
                start_new_session=True,
            )
        generation = Generation(number, process.pid, log_path, time.time())
        self._process = process
        self._generations.append(generation)
        logger.info("%s generation %d started (pid %d)", self.name, number, process.pid)
        return generation, process

    def _record_exit(self, generation: Generation, exit_code: int) -> None:
        decision = read_decision(generation.log_path)
        with self._lock:
            generation.ended_at = time.time()
            generation.exit_code = exit_code
            generation.decision = decision
            self._changed.notify_all()
        if decision is None:
            logger.info(
                "%s generation %d (pid %d) exited with status %d",
                self.name,
                generation.number,
                generation.pid,
                exit_code,
            )
        else:
            logger.info(
                "%s generation %d (pid %d) exited with status %d after memwatch rule %s tripped",
                self.name,
                generation.number,
                generation.pid,
                exit_code,
                decision.rule,
            )
