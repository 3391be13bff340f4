"""Sessions: ``tests``, ``lint``, ``typecheck``, ``demo`` (the main job) and ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
SOURCES = ["memwatch", "tests", "demo", "benchmarks", "noxfile.py"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite against real Redis, S3 endpoint and karton-system processes."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package, the tests and the demo with mypy --strict."""
    session.install("-e", ".[test]", "mypy>=1.10", "types-psutil", "types-PyYAML")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run the demo: a leaking karton consumer restarted by memwatch on a real karton stack."""
    session.install("-e", ".[stack]")
    session.run("python", "-m", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Measure memwatch's cost per call, footprint and karton throughput; ``-- --quick`` is short.

    karton-memory-watcher is installed here only, as the baseline to compare with.
    """
    session.install("-e", ".[stack]", "karton-memory-watcher==1.0.2")
    session.run("python", "-m", "benchmarks", *session.posargs)
