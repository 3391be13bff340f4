"""The machine, interpreter and package versions that a benchmark run came from."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("memwatch", "wrapt", "psutil", "karton-core", "karton-memory-watcher")

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Machine:
    """Facts about the machine and the moment that a run's numbers come from."""

    cpu_model: str
    cores: int
    python: str
    kernel: str
    date: str
    #: Git commit of the checkout, with ``+changes`` when memwatch/ differs from it.
    commit: str
    #: One-minute load average when the run started: other work on the machine skews the times.
    load_average: float
    packages: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Return one line for the report's header."""
        versions = ", ".join(f"{name} {version}" for name, version in self.packages.items())
        return (
            f"{self.cpu_model}, {self.cores} cores; {self.python}; Linux {self.kernel}; "
            f"{self.date}; load average {self.load_average:.2f} at the start; "
            f"commit {self.commit}; {versions}"
        )


def cpu_model() -> str:
    """Return the first ``model name`` of ``/proc/cpuinfo``, or ``unknown``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Return the checkout's short commit, ``+changes`` when memwatch/ was edited since."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_SOURCE_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "memwatch"],
            cwd=_SOURCE_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}+changes" if changes else head


def package_versions() -> dict[str, str]:
    """Return the installed version of each of :data:`PACKAGES`, ``missing`` when absent."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def describe_machine() -> Machine:
    """Collect the facts about this machine and interpreter."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.timezone.utc)
    return Machine(
        cpu_model=cpu_model(),
        cores=cores or 0,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        kernel=platform.release(),
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        load_average=os.getloadavg()[0],
        packages=package_versions(),
    )
