"""Send demo tasks through karton and count how they ended."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection

from karton.core import Config, Producer, Resource, Task
from karton.core.backend import KartonBackend
from karton.core.task import TaskState

#: Task type that :func:`send_tasks` sends and the demo consumer binds on.
TASK_TYPE = "memwatch-demo"

#: Seconds between two reads of Redis while waiting.
POLL_INTERVAL = 0.2

#: States in which karton is done with a task.
DONE_STATES = (TaskState.FINISHED, TaskState.CRASHED)


def wait_for_binds(backend: KartonBackend, identity: str, timeout: float) -> None:
    """Wait until a consumer has registered its bind and is connected to Redis.

    karton-system routes a task only to the binds registered when it routes
    it; a task sent earlier is marked Finished and never queued.

    :raises TimeoutError: the consumer was not ready within ``timeout`` seconds
    """
    deadline = time.monotonic() + timeout
    while True:
        bound = any(bind.identity == identity for bind in backend.get_binds())
        online = identity in backend.get_online_consumers()
        if bound and online:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"consumer {identity} was not ready within {timeout} s "
                f"(bind registered: {bound}, connected to Redis: {online})"
            )
        time.sleep(POLL_INTERVAL)


def send_tasks(
    config: Config,
    count: int,
    resource_size: int,
    identity: str = "memwatch-demo-producer",
    on_sent: Callable[[int], None] | None = None,
) -> list[str]:
    """Send ``count`` tasks of type ``memwatch-demo``, each with a "sample" resource.

    Each task carries its position as the ``index`` payload, from 0, and a
    sample of ``resource_size`` bytes.

    :param on_sent: called with the number of tasks sent so far after each task
    :return: the task UIDs, which are also the root UIDs of the routed copies
    """
    producer = Producer(config=config, identity=identity)
    task_uids = []
    for index in range(count):
        content = index.to_bytes(4, "big") * (resource_size // 4 + 1)
        task = Task(
            headers={"type": TASK_TYPE},
            payload={
                "sample": Resource("sample", content[:resource_size]),
                "index": index,
            },
        )
        producer.send_task(task)
        task_uids.append(task.root_uid)
        if on_sent is not None:
            on_sent(len(task_uids))
    return task_uids


def count_states(
    backend: KartonBackend,
    identity: str,
    root_uids: Collection[str] | None = None,
) -> Counter[TaskState]:
    """Count the tasks routed to ``identity``, by state.

    Only the routed copies count: the producer's own copy of each task is
    Finished as soon as karton-system has routed it.

    :param root_uids: count only the copies of these tasks, for example the
        return value of :func:`send_tasks`; every task when ``None``
    """
    selected = None if root_uids is None else set(root_uids)
    states: Counter[TaskState] = Counter()
    for task in backend.iter_all_tasks(parse_resources=False):
        if task.receiver != identity:
            continue
        if selected is not None and task.root_uid not in selected:
            continue
        states[task.status] += 1
    return states


def count_lost(sent: int, states: Counter[TaskState]) -> int:
    """Return how many of ``sent`` tasks did not end Finished or Crashed."""
    return sent - sum(states[state] for state in DONE_STATES)


def wait_until_done(
    backend: KartonBackend,
    identity: str,
    sent: int,
    timeout: float,
    root_uids: Collection[str] | None = None,
    on_poll: Callable[[Counter[TaskState]], None] | None = None,
) -> Counter[TaskState]:
    """Wait until ``sent`` routed tasks have ended Finished or Crashed.

    :param sent: number of tasks sent to ``identity``
    :param root_uids: as in :func:`count_states`
    :param on_poll: called with the counts after every read of Redis
    :return: the final counts by state
    :raises TimeoutError: the tasks were not done within ``timeout`` seconds;
        the message contains the counts
    """
    deadline = time.monotonic() + timeout
    while True:
        states = count_states(backend, identity, root_uids)
        if on_poll is not None:
            on_poll(states)
        if count_lost(sent, states) <= 0:
            return states
        if time.monotonic() > deadline:
            counts = ", ".join(f"{state.value} {n}" for state, n in states.items())
            raise TimeoutError(
                f"{count_lost(sent, states)} of {sent} tasks routed to {identity} "
                f"were not Finished or Crashed within {timeout} s "
                f"(routed copies: {counts or 'none'})"
            )
        time.sleep(POLL_INTERVAL)
