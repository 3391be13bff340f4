"""Restart in place: replace the process with a fresh interpreter running the same command.

``os.execv`` keeps the PID, the container and the supervisor's view of the
process, and gives a new address space, so every leaked byte is gone. Python
opens its own descriptors (sockets, files, the ``/proc/self/statm`` reader) as
non-inheritable, so Redis and S3 connections close at the exec. Descriptors a
program made inheritable on purpose stay open in the new image.

Each generation learns its number and why the previous one ended from two
environment variables, so that its first log line can report both.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from .behavior import exit_process, flush_logs

#: The number of this process image: 1 for the first, one more after each re-exec.
GENERATION_VARIABLE = "_MEMWATCH_GENERATION"
#: The previous image's decision line: the reason it ended.
PREVIOUS_VARIABLE = "_MEMWATCH_PREVIOUS_DECISION"
#: The exit status when re-executing is impossible, so that a supervisor still restarts.
FALLBACK_EXIT_CODE = 1


def _start_directory() -> str:
    """Return the folder the program most likely started in.

    ``python -m`` puts that folder, made absolute, first on ``sys.path``. For a
    script only the folder at memwatch's import is known. The script's own path
    is made absolute in :func:`command_line`, so the re-run finds it anyway.
    """
    argv = getattr(sys, "orig_argv", None) or []
    first = sys.path[0] if sys.path else ""
    if "-m" in argv[1:] and os.path.isabs(first) and os.path.isdir(first):
        return first
    return os.getcwd()


# The command line is relative to the folder the program started in.
_START_DIRECTORY = _start_directory()


def generation() -> int:
    """Return this process image's generation, 1 unless it was re-executed."""
    try:
        return max(int(os.environ.get(GENERATION_VARIABLE, "1")), 1)
    except ValueError:
        return 1


def previous_decision() -> str | None:
    """Return why the previous generation re-executed, or ``None`` for the first one."""
    return os.environ.get(PREVIOUS_VARIABLE) if generation() > 1 else None


def command_line() -> tuple[str, list[str]] | str:
    """Return the interpreter and the arguments to re-execute, or why that is impossible."""
    argv = list(getattr(sys, "orig_argv", None) or [])
    if not argv:
        return "sys.orig_argv is empty (an embedded interpreter or Python before 3.10)"
    executable = sys.executable
    if not executable or not os.access(executable, os.X_OK):
        return f"sys.executable {executable!r} is not an executable file"
    return executable, _absolute_script(argv)


def _absolute_script(argv: list[str]) -> list[str]:
    # Since Python 3.9 the __main__ module of a script has an absolute __file__;
    # the command line may hold the script's path relative to a folder the
    # program has left since.
    script = sys.argv[0] if sys.argv else ""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not script or not main_file or os.path.isabs(script) or script not in argv[1:]:
        return argv
    if os.path.basename(script) != os.path.basename(main_file):
        return argv
    position = argv.index(script, 1)
    return [*argv[:position], os.path.abspath(main_file), *argv[position + 1 :]]


def reexec(decision: str, logger: logging.Logger) -> NoReturn:
    """Replace this process with a new image of the same command, or exit with status 1.

    :param decision: the decision line, handed to the next generation
    """
    command = command_line()
    if isinstance(command, str):
        logger.error(
            "memwatch: cannot re-execute: %s; exiting with code %d instead",
            command,
            FALLBACK_EXIT_CODE,
        )
        exit_process(FALLBACK_EXIT_CODE, logger)
    executable, argv = command
    environment = dict(os.environ)
    environment[GENERATION_VARIABLE] = str(generation() + 1)
    environment[PREVIOUS_VARIABLE] = decision
    logger.info(
        "memwatch: re-executing %s as generation %d, same PID %d",
        " ".join(argv),
        generation() + 1,
        os.getpid(),
    )
    flush_logs()
    try:
        os.chdir(_START_DIRECTORY)
        os.execve(executable, argv, environment)
    except OSError as exc:
        logger.error(
            "memwatch: re-executing %s failed: %s; exiting with code %d instead",
            executable,
            exc,
            FALLBACK_EXIT_CODE,
        )
        exit_process(FALLBACK_EXIT_CODE, logger)
