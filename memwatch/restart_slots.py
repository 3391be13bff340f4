"""Restart slots of a karton fleet: take one before the exit, or defer the restart.

With ``max_concurrent_restarts=K`` a guarded karton service takes one of the K
restart leases of its identity (:mod:`memwatch.fleet`) in the karton Redis
before its process exits. A replica that finds every slot taken keeps working.
The rules, checked again after its next tasks, still trip, and it tries again
at most once every :data:`RETRY_SECONDS`. A hard limit (:data:`HARD_LIMITS`)
restarts at once: it takes a free slot, but never waits for one.

:mod:`memwatch.fleet` imports redis-py, so this module imports it only inside
the functions that a service with the option runs. karton-core has imported
redis-py by then anyway.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .behavior import Decision, RestartBehavior

if TYPE_CHECKING:
    from .fleet import Lease, RestartLeases
    from .guard import Guard

#: Seconds between two attempts to take a slot while a restart is deferred.
RETRY_SECONDS = 1.0
#: Rules whose restart never waits for a slot, because they are ceilings of
#: absolute memory, which a process must not pass while it waits.
#: ``limit_percent`` is the container's memory limit.
HARD_LIMITS = frozenset({"max_rss_mb", "limit_percent"})


@dataclass
class SlotState:
    """The restart slots of one guard in this process, and its deferred restart."""

    #: The slots of the service's identity, once :func:`setup` built them.
    leases: RestartLeases | None = None
    #: Whether :func:`setup` ran, which only a karton service's start does.
    prepared: bool = False
    #: Why :func:`setup` built no slots although the option is set.
    problem: str | None = None
    #: The slot this process took for its restart.
    lease: Lease | None = None
    #: A slot that the previous image took and handed over through
    #: ``HANDOVER_VARIABLE``; released once the service's loop runs.
    handover: Lease | None = None
    #: ``time.monotonic()`` and tasks done when the pending restart was first deferred.
    deferred_since: float | None = None
    deferred_tasks: int = 0
    #: ``time.monotonic()`` of the last attempt to take a slot.
    attempted_at: float | None = None


def setup(service: object, guard: Guard, logger: logging.Logger) -> None:
    """Connect the guard of a karton service to the restart slots of its identity.

    Called when the service starts its loop, after its config was applied. It
    also takes over a lease handed over by the previous image of a re-executed
    process, which :func:`release_handover` releases once the loop runs.

    :param logger: where the slots log a failure to release or renew a lease.
        Nothing is logged here, because an async service cannot log before it
        has connected to Redis: :func:`log_start` reports the outcome.
    """
    from . import fleet

    slots = guard.tracker.slots
    slots.prepared = True
    slots.problem = None
    slots.leases = None
    # Popped in any case, so that no later image or child process inherits it.
    handed = os.environ.pop(fleet.HANDOVER_VARIABLE, None)
    limit = guard.settings.max_concurrent_restarts
    if limit is None:
        return

    identity = getattr(service, "identity", None)
    karton_config = getattr(service, "config", None)
    if not isinstance(identity, str) or not identity or karton_config is None:
        slots.problem = f"{service!r} has no karton identity or config"
        return
    from karton.core.backend import KartonBackend

    try:
        options = KartonBackend.get_redis_configuration(karton_config, identity=identity)
        client = fleet.lease_client(options)
        ttl = guard.settings.restart_lease_seconds
        slots.leases = fleet.RestartLeases(client, identity, limit, ttl, logger)
    except (KeyError, TypeError, ValueError) as error:
        slots.problem = (
            f"building a Redis client from the karton config failed: "
            f"{type(error).__name__}: {error}"
        )
        return
    if handed is not None:
        lease = fleet.Lease.from_json(handed)
        if lease is not None and lease.identity == identity:
            slots.handover = lease


def log_start(guard: Guard, subject: str, logger: logging.Logger) -> None:
    """Log the restart slots in use, or why ``max_concurrent_restarts`` is ignored."""
    limit = guard.settings.max_concurrent_restarts
    if limit is None:
        return
    slots = guard.tracker.slots
    leases = slots.leases
    if leases is not None:
        from .fleet import slot_key

        keys = slot_key(leases.identity, 0)
        if limit > 1:
            keys += f" to {slot_key(leases.identity, limit - 1)}"
        logger.info(
            "memwatch: max_concurrent_restarts=%d for the replicas of %s: restart slots %s "
            "in the karton Redis, each taken for %g s unless released",
            limit,
            leases.identity,
            keys,
            leases.ttl_seconds,
        )
        return
    reason = slots.problem
    if not slots.prepared:
        reason = "restart slots live in the Redis of a karton service, and this is none"
    logger.warning(
        "memwatch: max_concurrent_restarts=%d is ignored for %s: %s; it restarts without "
        "taking a restart slot",
        limit,
        subject,
        reason,
    )


def admit(guard: Guard, decision: Decision, logger: logging.Logger) -> Decision | None:
    """Return ``decision`` once this process may restart, or ``None`` to defer it.

    Without restart slots every decision passes. With them, a decision passes
    when this process takes a slot, when a hard limit tripped, or when Redis
    failed. Otherwise the restart is deferred, and the next call tries again
    once :data:`RETRY_SECONDS` have passed since the last attempt.

    NOTE: the attempt is a blocking Redis call, also in an async consumer's event
    loop: one round trip, or the lease client's timeout (1 s) when Redis fails.
    """
    slots = guard.tracker.slots
    leases = slots.leases
    if leases is None:
        return decision
    from .fleet import HANDOVER_VARIABLE, Lease, LeasesBusy

    hard = [trip.rule for trip in decision.trips if trip.rule in HARD_LIMITS]
    now = time.monotonic()
    if not hard and slots.attempted_at is not None and now - slots.attempted_at < RETRY_SECONDS:
        return None
    slots.attempted_at = now
    result = leases.try_acquire()

    if isinstance(result, Lease):
        slots.lease = result
        logger.info(
            "memwatch: took restart slot %s for %g s%s",
            result.key,
            result.ttl_seconds,
            _deferred_for(slots, now, decision),
        )
        if guard.behavior is RestartBehavior.REEXEC:
            # reexec.reexec() passes os.environ on to the new image.
            os.environ[HANDOVER_VARIABLE] = result.to_json()
        return decision

    if isinstance(result, LeasesBusy):
        holders = ", ".join(_process_of(token) for token in result.holders) or "unknown holders"
        if hard:
            logger.warning(
                "memwatch: %s is a hard limit, so the process restarts although all %d "
                "restart slots of %s are held by %s%s",
                hard[0],
                leases.slots,
                leases.identity,
                holders,
                _deferred_for(slots, now, decision),
            )
            return decision
        if slots.deferred_since is None:
            slots.deferred_since = now
            slots.deferred_tasks = decision.snapshot.tasks
            guard.tracker.deferrals += 1
            logger.info(
                "memwatch: %s; restart deferred: all %d restart slots of %s are held by %s "
                "(the first expires in %.1f s); tried again after the next tasks",
                decision.describe(),
                leases.slots,
                leases.identity,
                holders,
                result.retry_after_seconds,
            )
        return None

    logger.warning(
        "memwatch: cannot take a restart slot of %s (%s); restarting without one, so more "
        "than %d replicas may restart at once%s",
        leases.identity,
        result.reason,
        leases.slots,
        _deferred_for(slots, now, decision),
    )
    return decision


def renew_lease(guard: Guard) -> None:
    """Restart the expiry of the slot this process took, right before it exits.

    The before-exit callbacks and an async consumer's tasks in flight may take
    a while after the slot was taken, and the slot must cover the restart after them.
    """
    slots = guard.tracker.slots
    if slots.leases is not None and slots.lease is not None:
        slots.leases.renew(slots.lease)


def release_handover(guard: Guard, logger: logging.Logger) -> None:
    """Release the slot that the previous image handed over, once the service's loop runs."""
    slots = guard.tracker.slots
    lease = slots.handover
    if lease is None or slots.leases is None:
        return
    slots.handover = None
    if slots.leases.release(lease):
        logger.info(
            "memwatch: released restart slot %s, which the previous image took before re-executing",
            lease.key,
        )
    else:
        logger.info(
            "memwatch: restart slot %s, which the previous image took, had already expired "
            "or could not be released",
            lease.key,
        )


def _deferred_for(slots: SlotState, now: float, decision: Decision) -> str:
    if slots.deferred_since is None:
        return ""
    return (
        f", after the restart was deferred for {now - slots.deferred_since:.1f} s and "
        f"{decision.snapshot.tasks - slots.deferred_tasks} tasks"
    )


def _process_of(token: str) -> str:
    # A token is hostname:pid:random hex. The random part only distinguishes
    # processes that reused a PID.
    host, _, rest = token.partition(":")
    pid = rest.partition(":")[0]
    return f"{host}:{pid}" if pid else token
