"""Fixtures: an embedded karton stack (Redis, moto S3, karton-system) on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from karton.core.backend import KartonBackend

from demo.stack import KartonStack


@pytest.fixture(scope="module")
def karton_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KartonStack]:
    """Start a karton stack shared by the tests of one module, and stop it after.

    Tests that share it keep their tasks apart with :func:`consumer_identity`.
    The services' logs stay in pytest's temporary folder for debugging.
    """
    with KartonStack(log_dir=tmp_path_factory.mktemp("karton-stack-logs")) as stack:
        yield stack


@pytest.fixture(scope="module")
def karton_backend(karton_stack: KartonStack) -> KartonBackend:
    """Return a karton backend connected to :func:`karton_stack`."""
    return KartonBackend(karton_stack.config())


@pytest.fixture
def consumer_identity() -> str:
    """Return a karton identity that no other test uses."""
    return f"memwatch-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def worker_logs(tmp_path: Path) -> Path:
    """Return an empty folder for the logs of worker processes."""
    folder = tmp_path / "worker-logs"
    folder.mkdir()
    return folder
