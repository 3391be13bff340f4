"""Every option from every source rejects bad values, naming the source, value and range."""

from __future__ import annotations

import math
from typing import Any

import pytest
from karton.core import Config

from memwatch import restart_when
from memwatch.config import OPTIONS, from_environment, from_karton, parse_options

BAD_TEXT = ["-1", "0", "nan", "inf", "-inf", "true", "", "  ", "abc", "1e999"]
#: Values of the list above that an option accepts on purpose.
ACCEPTED = {
    "enabled": {"0", "true"},
    "reclaim": {"0", "true"},
    "warmup": {"0"},
    "jitter": {"0"},
    "min_lifetime_seconds": {"0"},
    "exit_timeout": {"0"},
}


def cases() -> list[tuple[str, str]]:
    return [
        (name, value)
        for name in OPTIONS
        for value in BAD_TEXT
        if value not in ACCEPTED.get(name, set())
    ]


@pytest.mark.parametrize(("name", "value"), cases())
def test_environment_value_rejected(name: str, value: str) -> None:
    variable = f"MEMWATCH_{name.upper()}"
    with pytest.raises(ValueError, match=rf"^{variable} = ") as caught:
        from_environment({variable: value})
    message = str(caught.value)
    assert repr(value) in message
    assert f"{name} must" in message


@pytest.mark.parametrize(("name", "value"), cases())
def test_karton_value_rejected(name: str, value: str) -> None:
    config = Config(check_sections=False)
    config.load_from_dict({"memwatch": {name: value}})
    with pytest.raises(
        ValueError, match=rf"^\[memwatch\] {name} in the karton config = "
    ) as caught:
        from_karton(config, environ={})
    assert f"{name} must" in str(caught.value)


def test_karton_environment_names_variable() -> None:
    config = Config(check_sections=False)
    config.load_from_dict({"memwatch": {"max_tasks": "lots"}})
    with pytest.raises(ValueError, match=r"^KARTON_MEMWATCH_MAX_TASKS = 'lots' is invalid"):
        from_karton(config, environ={"KARTON_MEMWATCH_MAX_TASKS": "lots"})


@pytest.mark.parametrize("name", ["max_task", "extramb", "behaviour", "timeout", ""])
def test_unknown_option_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="unknown memwatch option") as caught:
        parse_options({name: "1"}, lambda option: f"[memwatch] {option}")
    assert "known options: max_tasks" in str(caught.value)


def test_close_name_gets_suggestion() -> None:
    with pytest.raises(ValueError, match="did you mean extra_mb"):
        from_environment({"MEMWATCH_EXTRA_MBS": "5"})


@pytest.mark.parametrize("value", ["off", "none", "OFF", " None "])
def test_off_removes_a_rule(value: str) -> None:
    assert from_environment({"MEMWATCH_MAX_TASKS": value}) == {"max_tasks": "off"}


NUMERIC_ARGUMENTS = [
    "warmup",
    "jitter",
    "min_lifetime_seconds",
    "report_every",
    "idle_check_seconds",
    "before_exit_timeout",
    "exit_timeout",
]


@pytest.mark.parametrize("name", NUMERIC_ARGUMENTS)
@pytest.mark.parametrize("value", [-1, math.nan, math.inf, True, "5", [1]])
def test_numeric_argument_rejected(name: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"max_tasks": 10, name: value}
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must") as caught:
        restart_when(**kwargs)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(("name", "value"), [("jitter", 1), ("jitter", 1.5), ("report_every", 0)])
def test_argument_out_of_range_rejected(name: str, value: float) -> None:
    kwargs: dict[str, Any] = {"max_tasks": 10, name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be .* in [\[(]"):
        restart_when(**kwargs)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_reclaim_argument_must_be_bool(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="reclaim must"):
        restart_when(max_tasks=10, reclaim=value)
