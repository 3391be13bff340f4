"""The example supervisor and config files parse, and their memwatch options are valid."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest
import yaml

from memwatch.behavior import RestartBehavior
from memwatch.config import parse_options

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PREFIX = "KARTON_MEMWATCH_"
#: Restart policies that restart after memwatch's exit, by exit status.
RESTARTS_AFTER = {
    RestartBehavior.EXIT_0: {"always", "unless-stopped"},
    RestartBehavior.EXIT_1: {"always", "unless-stopped", "on-failure"},
}


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Parse a systemd unit, keeping repeated keys such as Environment=."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}:{number}: option outside a section"
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}:{number}: not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def memwatch_options(variables: dict[str, str]) -> dict[str, object]:
    raw = {
        key[len(PREFIX) :].lower(): value
        for key, value in variables.items()
        if key.startswith(PREFIX)
    }
    return parse_options(raw, lambda name: PREFIX + name.upper())


@pytest.mark.parametrize(
    "unit", sorted((EXAMPLES / "systemd").glob("*.service")), ids=lambda p: p.name
)
def test_systemd_unit_restarts_after_memwatch_exit(unit: Path) -> None:
    sections = read_unit(unit)
    service = sections["Service"]
    assert set(sections) == {"Unit", "Service", "Install"}
    assert dict(sections["Unit"])["StartLimitIntervalSec"] == "0"
    keys = dict(service)
    assert keys["ExecStart"].startswith("/")
    environment = dict(value.split("=", 1) for key, value in service if key == "Environment")
    options = memwatch_options(environment)
    behavior = options.get("behavior", RestartBehavior.EXIT_0)
    assert isinstance(behavior, RestartBehavior)
    assert keys["Restart"] in RESTARTS_AFTER[behavior]


def test_compose_services_restart_after_memwatch_exit() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert services
    for name, service in services.items():
        options = memwatch_options({k: str(v) for k, v in service["environment"].items()})
        behavior = options.get("behavior", RestartBehavior.EXIT_0)
        assert isinstance(behavior, RestartBehavior)
        assert service["restart"] in RESTARTS_AFTER[behavior], name


def test_karton_ini_memwatch_section_is_valid() -> None:
    parser = configparser.ConfigParser()
    parser.read(EXAMPLES / "karton.ini", encoding="utf-8")
    options = parse_options(dict(parser["memwatch"]), lambda name: f"[memwatch] {name}")
    assert options["extra_mb"] == 500
    assert options["max_seconds"] == "off"
    assert options["behavior"] is RestartBehavior.EXIT_0


def test_restart_loop_script_parses() -> None:
    completed = subprocess.run(
        ["sh", "-n", str(EXAMPLES / "restart-loop.sh")], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
