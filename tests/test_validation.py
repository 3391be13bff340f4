"""Bad input is rejected at decoration time, naming the parameter, the value and the range."""

from __future__ import annotations

import decimal
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest

from memwatch import RestartBehavior, RestartRule, implant_watcher, restart_when

RULES = ["max_tasks", "max_seconds", "extra_mb", "extra_percent", "max_rss_mb"]
ORIGINAL_RULES = [
    "proceed_tasks",
    "elapsed_time",
    "extra_consumed_memory_percent",
    "extra_consumed_megabytes",
]


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_out_of_range_limit_raises_value_error(name: str, value: float) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be a positive") as caught:
        restart_when(**kwargs)
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("value", [True, False, "100", b"1", [1], object()])
def test_non_number_limit_raises_type_error(name: str, value: Any) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(TypeError, match=rf"^{name} must be a positive") as caught:
        restart_when(**kwargs)
    assert type(value).__name__ in str(caught.value)


@pytest.mark.parametrize("value", [1.5, 0.5])
def test_fractional_task_count_raises(value: float) -> None:
    with pytest.raises(ValueError, match=r"max_tasks must be a positive integer.*1\.5|0\.5"):
        restart_when(max_tasks=value)  # type: ignore[arg-type]


def test_whole_float_task_count_is_accepted() -> None:
    assert callable(restart_when(max_tasks=10.0))  # type: ignore[arg-type]


def test_no_rule_raises_listing_rules() -> None:
    with pytest.raises(ValueError, match="at least one restart rule") as caught:
        restart_when()
    for name in RULES:
        assert name in str(caught.value)


def test_unknown_keyword_raises() -> None:
    with pytest.raises(TypeError, match="max_task"):
        restart_when(max_task=5)  # type: ignore[call-arg]


def test_positional_limit_raises() -> None:
    with pytest.raises(TypeError, match="must be called"):
        restart_when(5)  # type: ignore[arg-type]


def test_bare_decorator_raises() -> None:
    with pytest.raises(TypeError, match=r"@restart_when\(max_tasks=1000\)"):

        @restart_when
        def job() -> None:
            pass


@pytest.mark.parametrize("behavior", ["EXIT_0", 0, None, RestartBehavior, int])
def test_bad_behavior_raises(behavior: Any) -> None:
    with pytest.raises(TypeError, match=r"behavior must be one of RestartBehavior\.EXIT_0"):
        restart_when(max_tasks=1, behavior=behavior)


@pytest.mark.parametrize("callbacks", ["print", 5, [print, 5], (None,)])
def test_bad_before_exit_raises(callbacks: Any) -> None:
    with pytest.raises(TypeError, match="before_exit"):
        restart_when(max_tasks=1, before_exit=callbacks)


def test_bad_logger_raises() -> None:
    with pytest.raises(TypeError, match=r"logger must be a logging\.Logger"):
        restart_when(max_tasks=1, logger="memwatch")  # type: ignore[arg-type]


def test_logger_instance_is_accepted() -> None:
    assert callable(restart_when(max_tasks=1, logger=logging.getLogger("x")))


@pytest.mark.parametrize("enabled", ["yes", 1, 0])
def test_bad_enabled_raises(enabled: Any) -> None:
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        restart_when(max_tasks=1, enabled=enabled)


@pytest.mark.parametrize("value", ["maybe", "", "2"])
def test_bad_environment_switch_raises(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MEMWATCH_ENABLED", value)
    with pytest.raises(ValueError, match=rf"MEMWATCH_ENABLED = {value!r} is invalid") as caught:
        restart_when(max_tasks=1)
    assert "1, true, yes, on, 0, false, no, off" in str(caught.value)


def test_guarding_a_non_callable_raises() -> None:
    with pytest.raises(TypeError, match="can only guard a callable"):
        restart_when(max_tasks=1)(42)  # type: ignore[type-var]


@pytest.mark.parametrize("name", ORIGINAL_RULES)
@pytest.mark.parametrize("value", [0, -3, math.nan, True, "80"])
def test_restart_rule_names_original_parameter(name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"^{name} must be a positive"):
        RestartRule(**{name: value})


def test_restart_rule_without_limit_raises_like_original() -> None:
    # karton-memory-watcher raised a bare Exception; ValueError is still caught by that.
    with pytest.raises(Exception, match="at least one restart rule must be set: proceed_tasks"):
        RestartRule()


def test_restart_rule_rejects_bad_behavior() -> None:
    with pytest.raises(TypeError, match="restart_behavior must be one of"):
        RestartRule(proceed_tasks=1, restart_behavior=1)  # type: ignore[arg-type]


def test_restart_rule_rejects_bad_callbacks() -> None:
    with pytest.raises(TypeError, match=r"call_before_exit\[0\] must be a callable"):
        RestartRule(proceed_tasks=1, call_before_exit=("not callable",))  # type: ignore[arg-type]


def test_implant_watcher_rejects_non_consumer() -> None:
    with pytest.raises(TypeError, match="needs a karton Consumer"):
        implant_watcher(object(), RestartRule(proceed_tasks=1))


def test_huge_limit_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"max_tasks must be a positive integer that fits a float"):
        restart_when(max_tasks=10**400)


def test_decimal_limit_is_accepted() -> None:
    assert callable(restart_when(extra_mb=decimal.Decimal("500.5")))  # type: ignore[arg-type]


def test_restart_rule_lists_only_its_own_names() -> None:
    with pytest.raises(ValueError, match="at least one restart rule") as caught:
        RestartRule()
    assert "max_rss_mb" not in str(caught.value)
    assert "extra_consumed_megabytes" in str(caught.value)


def test_behavior_without_parameter_raises() -> None:
    with pytest.raises(TypeError, match="must take one argument, the Decision"):
        restart_when(max_tasks=1, behavior=lambda: None)  # type: ignore[arg-type,misc]


@pytest.mark.parametrize("callbacks", [int, {print: 1}, lambda reason: None, [lambda a, b: None]])
def test_before_exit_needing_arguments_or_not_callable_raises(callbacks: Any) -> None:
    with pytest.raises(TypeError, match="before_exit"):
        restart_when(max_tasks=1, before_exit=callbacks)


def test_generator_function_raises() -> None:
    def produce() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="cannot guard the generator function"):
        restart_when(max_tasks=1)(produce)


def test_classmethod_above_raises_with_hint() -> None:
    with pytest.raises(TypeError, match="put @restart_when below @classmethod"):
        restart_when(max_tasks=1)(classmethod(lambda cls: None))  # type: ignore[type-var]
