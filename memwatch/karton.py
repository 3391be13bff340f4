"""karton integration: the service's logger, the exit between tasks, and ``implant_watcher``.

This module never imports karton itself: a guard on a plain function must not
pay for importing karton-core and boto3. A karton service can only exist once
karton is imported, so the checks look it up in :data:`sys.modules`.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .compat import RestartRule
    from .guard import Guard

ConsumerT = TypeVar("ConsumerT")


def _karton_class(module: str, name: str) -> type | None:
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None)
    return found if isinstance(found, type) else None


def service_logger(instance: object) -> logging.Logger | None:
    """Return a karton service's own logger (named after its identity), else ``None``.

    Lines logged there reach karton's log pipeline as well as the console.
    """
    if instance is None:
        return None
    base = _karton_class("karton.core.base", "KartonBase")
    if base is None or not isinstance(instance, base):
        return None
    log = getattr(instance, "log", None)
    return log if isinstance(log, logging.Logger) else None


def is_sync_service(instance: object) -> bool:
    """Return whether ``instance`` is a sync karton service whose loop polls ``_shutdown``."""
    base = _karton_class("karton.core.base", "KartonServiceBase")
    return base is not None and isinstance(instance, base) and hasattr(instance, "_shutdown")


class LoopGate:
    """A stand-in for a sync karton service's ``_shutdown`` flag, ending the process between tasks.

    ``Consumer.loop`` in karton-core 5.x runs ``while not self.shutdown:``, and the
    ``shutdown`` property returns ``self._shutdown``. The loop evaluates it only
    after ``internal_process`` has stored the previous task's final state in its
    ``finally`` block: Finished, or Crashed with the task's own traceback. It also
    evaluates it about every 5 seconds while the queue is empty, because
    ``consume_routed_task`` waits 5 seconds at most. So a :class:`SystemExit`
    raised from :meth:`__bool__` ends the process with no task Started, none
    marked failed by memwatch, and no exception replaced. karton's signal handler
    replaces the gate with ``True``, and its own graceful shutdown goes on as before.
    """

    __slots__ = ("_guards", "_service")

    def __init__(self, service: object) -> None:
        self._guards: list[Guard] = []
        self._service = service

    def add(self, guard: Guard) -> None:
        """Have the loop carry out ``guard``'s decisions too."""
        if guard not in self._guards:
            self._guards.append(guard)

    def __bool__(self) -> bool:
        for guard in self._guards:
            if guard.tracker.decision is not None:
                guard.end_from_gate(self._service)
        return False

    def __repr__(self) -> str:
        return "<memwatch LoopGate: False>"


def install_gate(instance: object, guard: Guard) -> bool:
    """Put a :class:`LoopGate` in place of a sync karton service's shutdown flag.

    :return: ``True`` when the service's loop will carry out ``guard``'s exit,
        ``False`` when ``instance`` is no such service or a shutdown is under way.
    """
    if not is_sync_service(instance):
        return False
    current: Any = instance.__dict__.get("_shutdown")
    if current is False:
        current = LoopGate(instance)
        instance._shutdown = current  # type: ignore[attr-defined]
    if not isinstance(current, LoopGate):
        return False
    current.add(guard)
    return True


def implant_watcher(consumer: ConsumerT, rule: RestartRule) -> ConsumerT:
    """Guard a karton consumer with a karton-memory-watcher :class:`~memwatch.RestartRule`.

    The rule is checked in the consumer's pre- and post-task hooks, and the exit is
    carried out between tasks by the consumer's own loop.

    :param consumer: a ``karton.core.Consumer`` or ``Karton`` instance
    :param rule: the rule to apply
    :return: ``consumer``, as karton-memory-watcher returned it
    """
    add_pre_hook = getattr(consumer, "add_pre_hook", None)
    add_post_hook = getattr(consumer, "add_post_hook", None)
    if not callable(add_pre_hook) or not callable(add_post_hook):
        raise TypeError(
            "implant_watcher() needs a karton Consumer or Karton instance with "
            f"add_pre_hook and add_post_hook, got {consumer!r}"
        )
    rule.attach(consumer)
    add_pre_hook(rule.pre_hook_behavior, "memwatch pre-hook")
    add_post_hook(rule.post_hook_behavior, "memwatch post-hook")
    return consumer
