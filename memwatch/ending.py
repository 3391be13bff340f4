"""Carrying out a decision: exactly one caller ends the process, the others wait.

The caller that claims the exit runs the before-exit callbacks, renews the
restart slot and then exits, re-executes or calls the custom behaviour. Calls
held meanwhile in other threads end their thread with the same code, and a
main thread that calls again after its ``SystemExit`` was caught ends the
process at once.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from . import reexec, restart_slots
from .behavior import (
    RestartBehavior,
    callback_name,
    exit_process,
    hard_exit,
    run_before_exit,
    shield_exit_from_signals,
)

if TYPE_CHECKING:
    from .guard import Guard


def hold(guard: Guard, instance: object) -> None:
    """Carry out a pending exit before a call starts, once no call is in flight."""
    tracker = guard.tracker
    if not tracker.released.is_set():
        tracker.wait_idle()
        end_or_wait(guard, instance, blocking=True)
    after_release(guard)


def end_or_wait(guard: Guard, instance: object, blocking: bool) -> None:
    """Carry out the decision in exactly one caller; the others wait for it if ``blocking``."""
    tracker = guard.tracker
    if not tracker.claim_exit():
        if blocking:
            tracker.released.wait()
            after_release(guard)
        return
    decision = tracker.decision
    if decision is None:  # pragma: no cover - the decision is stored before any claim
        return
    logger = guard.logger_for(instance)
    shield_exit_from_signals(logger)
    run_before_exit(guard.before_exit, logger, guard.settings.before_exit_timeout)
    # The restart slot must cover the restart from here on.
    restart_slots.renew_lease(guard)
    behavior = guard.behavior
    if behavior is RestartBehavior.REEXEC:
        tracker.release(reexec.FALLBACK_EXIT_CODE)
        reexec.reexec(decision.describe(), logger)
    if isinstance(behavior, RestartBehavior):
        code = behavior.exit_code
        if code is not None:
            tracker.release(code)
            exit_process(code, logger, guard.settings.exit_timeout)
    else:
        try:
            behavior(decision)
        except Exception:
            logger.exception(
                "memwatch: behavior %s raised; the process keeps running",
                callback_name(behavior),
            )
    tracker.release(None)


def after_release(guard: Guard) -> None:
    """Let a held call go on, or end its thread or the process, after the exit."""
    code = guard.tracker.release_code
    if code is None:
        return
    if threading.current_thread() is not threading.main_thread():
        # A held call in a worker thread ends its thread too, so that the
        # interpreter's shutdown does not wait for it.
        raise SystemExit(code)
    # The main thread raised SystemExit once and is calling again: something
    # caught the exit, so end the process without a second chance.
    logger = guard.fallback_logger
    logger.warning(
        "memwatch: the exit with code %d was caught and the process went on; "
        "ending it with os._exit(%d)",
        code,
        code,
    )
    hard_exit(code)
