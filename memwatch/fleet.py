"""Restart leases: let at most K replicas of one karton identity restart at a time.

Every replica of a service shares the karton Redis, so the leases live there.
Slot ``n`` of identity ``I`` is the string key ``memwatch:restart:I:n`` for ``n`` in
``0 .. K-1``. Its value is the holder's token, ``hostname:pid:random hex``, and it
carries a Redis expiry of ``ttl_seconds`` (sent as ``PX`` milliseconds, rounded
up). The slot number is the last ``:``-separated part of a key, so two identities
never share a slot key, and no karton key starts with ``memwatch:``.

One Lua script takes a slot: it runs atomically on the server, so K+1 replicas
can never hold the K slots at once. The expiry is counted by the Redis server's
clock, so the replicas' clocks do not matter. A replica that dies holding a
slot blocks the others for at most ``ttl_seconds``.

A lease is not released when the process exits. It covers the exit, the
supervisor's restart and the start of the new process, and it ends by its
expiry, so ``ttl_seconds`` must cover that whole gap. A process restarted by a
supervisor has a new PID and the original environment, so it cannot learn the
token and release the lease earlier. A process image started by
``os.execve`` keeps the environment it was given. The old image can pass the
lease in :data:`HANDOVER_VARIABLE` (:meth:`Lease.to_json`), and the new one
can :meth:`RestartLeases.release` it once its loop has started, which frees the
slot seconds before the expiry would.

The client must fail fast. redis-py 8.2 retries a failed command 10 times with
backoff by default, and karton-core 5.9.1 gives its own client a 30 s socket
timeout, so a Redis that stopped responding would hold up the exit for minutes.
:func:`lease_client` builds a client with short timeouts and no retries.
The scripts touch K keys at once, so they need a single Redis server, as karton
uses, and not a Redis Cluster.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Prefix of every slot key, followed by the identity, ``:`` and the slot number.
KEY_PREFIX = "memwatch:restart:"
#: Environment variable that hands a lease over to the image started by ``os.execve``.
HANDOVER_VARIABLE = "_MEMWATCH_RESTART_LEASE"
#: Seconds a lease lasts unless it is released.
DEFAULT_TTL_SECONDS = 30.0
#: Seconds :func:`lease_client` waits to connect and for each reply.
DEFAULT_TIMEOUT_SECONDS = 1.0
#: Highest slot count: every attempt sends all the slot keys to the server.
MAX_SLOTS = 1024

_default_logger = logging.getLogger("memwatch")

# KEYS: the slot keys. ARGV: the token, the expiry in milliseconds.
# Returns {slot} when the caller holds a slot, else {-1, token, pttl, ...} per key.
# A holder that asks again keeps its slot with a fresh expiry, so that one
# replica never takes two slots, even when an attempt timed out on the client
# and the server ran it later.
_ACQUIRE_SCRIPT = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    return {i - 1}
  end
end
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {i - 1}
  end
end
local reply = {-1}
for _, key in ipairs(KEYS) do
  reply[#reply + 1] = redis.call('GET', key) or ''
  reply[#reply + 1] = redis.call('PTTL', key)
end
return reply
"""

# Delete or extend the key only while it still contains this token, so that a
# lease that expired and was taken by another replica is left alone.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def slot_key(identity: str, slot: int) -> str:
    """Return the Redis key of one restart slot of a karton identity."""
    return f"{KEY_PREFIX}{identity}:{slot}"


@dataclass(frozen=True)
class Lease:
    """A restart slot taken by this process, which expires ``ttl_seconds`` after it
    was taken or renewed."""

    identity: str
    slot: int
    token: str
    ttl_seconds: float

    @property
    def key(self) -> str:
        """The Redis key of the slot."""
        return slot_key(self.identity, self.slot)

    def to_json(self) -> str:
        """Serialize the lease for :data:`HANDOVER_VARIABLE`."""
        return json.dumps(
            {
                "identity": self.identity,
                "slot": self.slot,
                "token": self.token,
                "ttl_seconds": self.ttl_seconds,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Lease | None:
        """Parse :meth:`to_json` output, or return ``None`` for anything malformed."""
        try:
            fields = json.loads(text)
            lease = cls(
                str(fields["identity"]),
                int(fields["slot"]),
                str(fields["token"]),
                float(fields["ttl_seconds"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return lease


@dataclass(frozen=True)
class LeasesBusy:
    """Every slot is held by another replica, so the restart has to wait."""

    #: Tokens of the holders, ``hostname:pid:random hex``.
    holders: tuple[str, ...]
    #: Seconds until the first slot expires. A holder may release it sooner.
    retry_after_seconds: float


@dataclass(frozen=True)
class LeaseUnavailable:
    """Redis failed, so whether a slot is free is unknown."""

    #: The redis-py exception, as ``ClassName: message``.
    reason: str


def lease_client(
    redis_options: Mapping[str, Any], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
) -> redis.Redis:
    """Build a Redis client that fails within about ``timeout_seconds`` and never retries.

    :param redis_options: keyword arguments for :class:`redis.Redis`, or a ``url``
        and further keyword arguments for :meth:`redis.Redis.from_url`; karton's
        ``KartonBackend.get_redis_configuration(config)`` returns such a mapping
    :param timeout_seconds: timeout to connect and for each reply
    """
    options = dict(redis_options)
    # A client named after the identity would count as one more replica of the
    # service in karton's list of online consumers.
    options.pop("client_name", None)
    options.update(
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
    )
    url = options.pop("url", None)
    if url is None:
        return redis.Redis(**options)
    # NOTE: options in the URL's query string win over these keyword arguments,
    # so a socket_timeout given there replaces timeout_seconds.
    return redis.Redis.from_url(str(url), **options)


class RestartLeases:
    """The K restart slots of one karton identity, seen from one replica.

    :param client: a client of the karton Redis; build it with :func:`lease_client`
        so that a Redis outage costs about a second, not minutes of retries
    :param identity: the karton identity whose replicas share the slots
    :param slots: how many replicas may restart at once
    :param ttl_seconds: how long a lease lasts unless released; it must cover the
        exit, the supervisor's restart and the new process's start
    :param logger: where :meth:`release` and :meth:`renew` log a Redis failure;
        by default the ``memwatch`` logger
    :raises TypeError: a parameter has the wrong type
    :raises ValueError: ``identity`` is empty, ``slots`` is outside 1 to
        :data:`MAX_SLOTS` or ``ttl_seconds`` is not a positive finite number
    """

    def __init__(
        self,
        client: redis.Redis,
        identity: str,
        slots: int,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(identity, str):
            raise TypeError(f"identity must be a string, got {identity!r}")
        if not identity:
            raise ValueError("identity must be a non-empty karton identity, got ''")
        if isinstance(slots, bool) or not isinstance(slots, int):
            raise TypeError(f"slots must be an integer from 1 to {MAX_SLOTS}, got {slots!r}")
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an integer from 1 to {MAX_SLOTS}, got {slots!r}")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)):
            raise TypeError(f"ttl_seconds must be a positive finite number, got {ttl_seconds!r}")
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"ttl_seconds must be a positive finite number, got {ttl_seconds!r}")

        self.identity = identity
        self.slots = slots
        self.ttl_seconds = float(ttl_seconds)
        #: This object's token: the value of every slot key it takes.
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self._client = client
        self._logger = logger if logger is not None else _default_logger
        self._keys = [slot_key(identity, slot) for slot in range(slots)]
        self._acquire = client.register_script(_ACQUIRE_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._renew = client.register_script(_RENEW_SCRIPT)

    @property
    def _ttl_milliseconds(self) -> int:
        return max(1, math.ceil(self.ttl_seconds * 1000))

    def try_acquire(self) -> Lease | LeasesBusy | LeaseUnavailable:
        """Take a free slot, or keep the one this object holds with a fresh expiry.

        It never raises for a Redis failure and blocks no longer than the
        client's timeouts allow.

        :return: the lease, or :class:`LeasesBusy` when other replicas hold every
            slot, or :class:`LeaseUnavailable` when Redis failed or the reply
            had an unexpected shape
        """
        try:
            reply = self._acquire(keys=self._keys, args=[self.token, self._ttl_milliseconds])
        except redis.RedisError as error:
            return LeaseUnavailable(f"{type(error).__name__}: {error}")

        if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
            return LeaseUnavailable(f"unexpected reply from the acquire script: {reply!r}")
        if reply[0] >= 0:
            return Lease(self.identity, reply[0], self.token, self.ttl_seconds)

        holders = tuple(_text(token) for token in reply[1::2] if _text(token))
        expiries = [int(pttl) for pttl in reply[2::2] if int(pttl) >= 0]
        # PTTL is -2 for a missing key and -1 for a key without expiry, which
        # only a writer other than this module can leave.
        retry_after = min(expiries, default=0) / 1000
        return LeasesBusy(holders, retry_after)

    def release(self, lease: Lease) -> bool:
        """Delete the lease's key if it still contains the lease's token.

        :return: ``True`` when the key was deleted. ``False`` when the lease had
            expired, and maybe been taken by another replica, or when Redis
            failed, which is logged as a warning.
        :raises ValueError: the lease belongs to another identity
        """
        return self._compare_and(self._release, "release", lease, [lease.token])

    def renew(self, lease: Lease) -> bool:
        """Restart the lease's expiry at ``ttl_seconds`` if this process still holds it.

        Use it when the exit waits long after the lease was taken, for example
        while an async consumer finishes its tasks in flight.

        :return: ``True`` when the expiry was reset, ``False`` as for :meth:`release`
        :raises ValueError: the lease belongs to another identity
        """
        args: list[str | int] = [lease.token, self._ttl_milliseconds]
        return self._compare_and(self._renew, "renew", lease, args)

    def holders(self) -> list[str]:
        """Return the tokens that hold a slot now, in slot order.

        :raises redis.RedisError: Redis failed. Unlike the other methods, this one
            is for logs and tests, so it does not hide the error.
        """
        values = self._client.mget(self._keys)
        return [_text(value) for value in values if value is not None]

    def _compare_and(self, script: Any, action: str, lease: Lease, args: list[str | int]) -> bool:
        if lease.identity != self.identity:
            raise ValueError(
                f"cannot {action} a lease of identity {lease.identity!r} through the "
                f"restart slots of {self.identity!r}: use a RestartLeases of that identity"
            )
        try:
            return bool(script(keys=[lease.key], args=args))
        except redis.RedisError as error:
            self._logger.warning(
                "memwatch: failed to %s restart lease %s held by %s: %s: %s; "
                "the lease ends by its expiry, at most %.1f s after it was taken or renewed",
                action,
                lease.key,
                lease.token,
                type(error).__name__,
                error,
                lease.ttl_seconds,
            )
            return False


def _text(value: object) -> str:
    # The client may or may not decode replies, as karton's does.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
