"""Running the demo's leaky consumer under a restart loop on the embedded karton stack."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from karton.core.backend import KartonBackend
from karton.core.task import TaskState

from demo import leaky_consumer, pipeline
from demo.stack import KartonStack
from demo.supervisor import Generation, RestartLoop

#: Seconds to wait for a consumer to register or for all tasks to end.
DEADLINE = 90.0


def restart_loop(
    stack: KartonStack,
    identity: str,
    logs: Path,
    env: dict[str, str] | None = None,
    **consumer: object,
) -> RestartLoop:
    """Return a restart loop, not started, of the leaky consumer with ``consumer`` options.

    :param env: variables added to the stack's environment, such as memwatch options
    """
    argv = leaky_consumer.command(identity=identity, rss_log=logs / "rss.jsonl", **consumer)  # type: ignore[arg-type]
    return RestartLoop(
        argv,
        logs,
        env={**leaky_consumer.child_env(stack.env), **(env or {})},
        cwd=stack.workdir,
        wake=functools.partial(stack.unblock_clients, identity),
    )


def run_pipeline(
    stack: KartonStack,
    backend: KartonBackend,
    identity: str,
    logs: Path,
    sent: int,
    env: dict[str, str] | None = None,
    resource_size: int = 512,
    **consumer: object,
) -> tuple[Counter[TaskState], list[Generation], list[str]]:
    """Run the leaky consumer under a restart loop, send ``sent`` tasks, wait for all.

    :return: the routed copies' states, the worker generations and the task UIDs
    """
    loop = restart_loop(stack, identity, logs, env, **consumer)
    with loop:
        pipeline.wait_for_binds(backend, identity, DEADLINE)
        task_uids = pipeline.send_tasks(stack.config(), sent, resource_size)
        states = pipeline.wait_until_done(backend, identity, sent, DEADLINE, task_uids)
    return states, loop.generations, task_uids
