"""karton integration: the service's logger, the exit between tasks, config, ``implant_watcher``.

This module never imports karton itself: a guard on a plain function must not
pay for importing karton-core and boto3. A karton service can only exist once
karton is imported, so the checks look its classes up in :data:`sys.modules`.

The exit waits for karton to record every task it took:

* a sync consumer (``karton.core.Consumer``) gets a :class:`LoopGate` in place of
  its shutdown flag, which its loop reads only between tasks;
* an async consumer (``karton.core.asyncio.Consumer``) gets an :class:`AsyncGate`
  around the backend call that takes the next task: once a rule tripped it takes
  no new task, waits until every task in flight has been recorded, then exits.

Both gates also run the idle checks: they see the loop go round about every
5 seconds while the queue is empty, because karton waits 5 seconds at most for
a task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import config, restart_slots

if TYPE_CHECKING:
    from .compat import RestartRule
    from .guard import Guard

ConsumerT = TypeVar("ConsumerT")

#: How often an async consumer whose rule tripped looks whether its tasks are done, in seconds.
_DRAIN_POLL_SECONDS = 0.05


def _karton_class(module: str, name: str) -> type | None:
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None)
    return found if isinstance(found, type) else None


def _is_instance(instance: object, *names: tuple[str, str]) -> bool:
    for module, name in names:
        cls = _karton_class(module, name)
        if cls is not None and isinstance(instance, cls):
            return True
    return False


_SERVICES = (
    ("karton.core.base", "KartonBase"),
    ("karton.core.asyncio.base", "KartonAsyncBase"),
)
_SYNC_SERVICE = ("karton.core.base", "KartonServiceBase")
_ASYNC_CONSUMER = ("karton.core.asyncio.karton", "Consumer")


def service_logger(instance: object) -> logging.Logger | None:
    """Return a karton service's own logger (named after its identity), else ``None``.

    Lines logged there reach karton's log pipeline as well as the console.
    """
    if instance is None or not _is_instance(instance, *_SERVICES):
        return None
    log = getattr(instance, "log", None)
    return log if isinstance(log, logging.Logger) else None


def _is_sync_service(instance: object) -> bool:
    return _is_instance(instance, _SYNC_SERVICE) and hasattr(instance, "_shutdown")


def is_async_consumer(instance: object) -> bool:
    """Return whether ``instance`` is a ``karton.core.asyncio.Consumer``."""
    return _is_instance(instance, _ASYNC_CONSUMER) and hasattr(instance, "backend")


class _Gate:
    """The guards whose decisions a karton service's loop carries out."""

    def __init__(self, service: object) -> None:
        self._guards: list[Guard] = []
        self._service = service

    def add(self, guard: Guard) -> None:
        """Have the loop carry out ``guard``'s decisions too."""
        if guard not in self._guards:
            self._guards.append(guard)

    def _pending(self) -> Guard | None:
        for guard in self._guards:
            if guard.tracker.slots.handover is not None:
                restart_slots.release_handover(guard, guard.logger_for(self._service))
            guard.check_idle(self._service)
        for guard in self._guards:
            if guard.tracker.decision is not None:
                return guard
        return None


class LoopGate(_Gate):
    """A stand-in for a sync karton service's ``_shutdown`` flag, ending the process between tasks.

    ``Consumer.loop`` in karton-core 5.x runs ``while not self.shutdown:``, and the
    ``shutdown`` property returns ``self._shutdown``. The loop evaluates it only
    after ``internal_process`` has stored the previous task's final state in its
    ``finally`` block: Finished, or Crashed with the task's own traceback. So a
    :class:`SystemExit` raised from :meth:`__bool__` ends the process with no task
    Started, none marked failed by memwatch, and no exception replaced. karton's
    signal handler replaces the gate with ``True``, and its own graceful shutdown
    goes on as before.
    """

    def __bool__(self) -> bool:
        guard = self._pending()
        if guard is not None:
            guard.end_from_gate(self._service)
        return False

    def __repr__(self) -> str:
        return "<memwatch LoopGate: False>"


class AsyncGate(_Gate):
    """Wrappers of an async karton consumer's task intake that drain it before the exit.

    The consumer's ``_loop`` takes each task with ``backend.consume_routed_task``
    and runs it with ``internal_process``, which records the task's final state
    and releases the concurrency semaphore in its ``finally`` block. The gate
    counts the tasks from their creation to the end of ``internal_process``.
    Once a rule tripped, the next intake waits for that count to reach zero and
    exits instead of taking a task. karton's own SIGTERM path cancels the tasks
    in flight (they end Crashed); this one lets them finish.
    """

    def __init__(self, service: Any) -> None:
        super().__init__(service)
        self.in_flight = 0
        #: Set when the service's ``loop`` is wrapped by :func:`prepare_service_class`,
        #: which carries out the exit once karton's loop has shut down.
        self.loop_wrapped = False
        #: The guard whose decision ends the process after the loop shut down.
        self.ending: Guard | None = None
        self._consume = service.backend.consume_routed_task
        self._internal_process = service.internal_process
        service.backend.consume_routed_task = self._consume_routed_task
        service.internal_process = self._count_task

    def _count_task(self, task: Any) -> Awaitable[None]:
        # Counted here, when the loop creates the task, not when it starts running:
        # the loop may ask for the next task before the new one has run a step.
        self.in_flight += 1
        return self._run_task(task)

    async def _run_task(self, task: Any) -> None:
        try:
            await self._internal_process(task)
        finally:
            self.in_flight -= 1

    async def _consume_routed_task(self, *args: Any, **kwargs: Any) -> Any:
        for guard in self._guards:
            guard.log_start(self._service, _where(self._service))
        pending = self._pending() if self.in_flight == 0 else self._decided()
        if pending is not None:
            while self.in_flight > 0:
                await asyncio.sleep(_DRAIN_POLL_SECONDS)
            if not self.loop_wrapped:
                pending.end_from_gate(self._service)
            else:
                # Leave through karton's own shutdown path, so that its log handler
                # sends its queue to Redis while the event loop still runs.
                self.ending = pending
                raise asyncio.CancelledError
        return await self._consume(*args, **kwargs)

    def _decided(self) -> Guard | None:
        for guard in self._guards:
            if guard.tracker.decision is not None:
                return guard
        return None


def shutting_down(instance: object) -> bool:
    """Return whether a sync karton service's own shutdown (after a signal) is under way."""
    return _is_sync_service(instance) and getattr(instance, "__dict__", {}).get("_shutdown") is True


def _where(service: object) -> str:
    return f" in {getattr(service, 'identity', service)!s}"


def install_gate(instance: object, guard: Guard) -> bool:
    """Let a karton consumer's loop carry out ``guard``'s exit between tasks.

    :return: ``True`` when the service's loop will carry out the exit, ``False``
        when ``instance`` is no karton consumer or a shutdown is already under way.
    """
    if instance is None:
        return False
    state = getattr(instance, "__dict__", {})
    if _is_sync_service(instance):
        gate: Any = state.get("_shutdown")
        if gate is False:
            gate = LoopGate(instance)
            instance._shutdown = gate  # type: ignore[attr-defined]
    elif is_async_consumer(instance):
        gate = state.get("_memwatch_gate")
        if gate is None:
            gate = AsyncGate(instance)
            instance._memwatch_gate = gate  # type: ignore[attr-defined]
    else:
        return False
    if not isinstance(gate, _Gate):
        return False
    gate.add(guard)
    return True


def start_service(service: object, guard: Guard) -> None:
    """Prepare ``guard`` when a karton service starts its loop.

    Applies the service's ``[memwatch]`` config over the decorator's arguments,
    connects the restart slots of ``max_concurrent_restarts``, logs the
    effective rules, starts the clock of ``max_seconds`` and installs the gate,
    so that the idle checks run before the first task arrives.

    :raises ValueError: when the config contains an unknown option or a bad value
    """
    karton_config = getattr(service, "config", None)
    if karton_config is not None:
        options = config.from_karton(karton_config, os.environ)
        try:
            guard.configure(guard.settings.merged(options))
        except ValueError as exc:
            raise ValueError(
                f"{exc}, after the karton config set {config.describe_overrides(options)}"
            ) from None
    restart_slots.setup(service, guard, guard.logger_for(service))
    if not is_async_consumer(service):
        # An async service logs through a queue that it empties into Redis only
        # after connecting, so its gate logs this line on the first intake instead.
        guard.log_start(service, _where(service))
    if guard.enabled:
        guard.tracker.start_clock()
        install_gate(service, guard)


def prepare_service_class(owner: type, guard: Guard) -> None:
    """Wrap the ``loop`` of a karton service class whose method ``guard`` guards.

    Called from ``__set_name__`` when a guarded method is defined in a class body.
    """
    if not any(
        (cls := _karton_class(module, name)) is not None and issubclass(owner, cls)
        for module, name in (_SYNC_SERVICE, ("karton.core.asyncio.base", "KartonAsyncServiceBase"))
    ):
        return
    loop = getattr(owner, "loop", None)
    if loop is None:
        return
    if asyncio.iscoroutinefunction(loop):

        @functools.wraps(loop)
        async def async_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
            start_service(self, guard)
            gate = self.__dict__.get("_memwatch_gate")
            if isinstance(gate, AsyncGate):
                gate.loop_wrapped = True
            try:
                return await loop(self, *args, **kwargs)
            except asyncio.CancelledError:
                if not isinstance(gate, AsyncGate) or gate.ending is None:
                    raise
                gate.ending.end_from_gate(self)
                return None

        owner.loop = async_loop  # type: ignore[attr-defined]
    else:

        @functools.wraps(loop)
        def sync_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
            start_service(self, guard)
            return loop(self, *args, **kwargs)

        owner.loop = sync_loop  # type: ignore[attr-defined]


def implant_watcher(consumer: ConsumerT, rule: RestartRule) -> ConsumerT:
    """Guard a karton consumer with a karton-memory-watcher :class:`~memwatch.RestartRule`.

    The rule is checked in the consumer's pre- and post-task hooks, and the exit is
    carried out between tasks by the consumer's own loop.

    :param consumer: a ``karton.core.Consumer`` or ``Karton`` instance
    :param rule: the rule to apply
    :return: ``consumer``, as karton-memory-watcher returned it
    :raises ValueError: when the consumer's ``[memwatch]`` config is invalid
    """
    add_pre_hook: Callable[..., None] | None = getattr(consumer, "add_pre_hook", None)
    add_post_hook: Callable[..., None] | None = getattr(consumer, "add_post_hook", None)
    if not callable(add_pre_hook) or not callable(add_post_hook):
        raise TypeError(
            "implant_watcher() needs a karton Consumer or Karton instance with "
            f"add_pre_hook and add_post_hook, got {consumer!r}"
        )
    rule.attach(consumer)
    add_pre_hook(rule.pre_hook_behavior, "memwatch pre-hook")
    add_post_hook(rule.post_hook_behavior, "memwatch post-hook")
    return consumer
