"""An async karton consumer (``karton.core.asyncio``) that leaks memory, guarded by memwatch.

Started by ``python -m demo.leaky_consumer --mode async``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import psutil
from karton.core import Task
from karton.core.asyncio import Consumer

from demo.pipeline import TASK_TYPE
from memwatch import RestartBehavior, restart_when

#: Memory kept alive for the whole process: the leak.
_leaked: list[bytearray] = []


def build_consumer_class(args: argparse.Namespace, behavior: RestartBehavior) -> type[Consumer]:
    """Return an async consumer class whose ``process`` is guarded with the given limits."""

    class AsyncLeakyConsumer(Consumer):
        """Leak memory and sleep on every task, several tasks at once."""

        filters = [{"type": TASK_TYPE}]  # noqa: RUF012 (karton reads a class attribute)
        concurrency_limit = args.concurrency

        def __init__(self, identity: str, leak_kib: int, rss_log: Path, sleep: float) -> None:
            super().__init__(identity=identity)
            self.leak_kib = leak_kib
            self.rss_log = rss_log
            self.sleep = sleep
            self._process_info = psutil.Process()

        @restart_when(
            extra_mb=args.extra_mb,
            max_tasks=args.max_tasks,
            max_seconds=args.max_seconds,
            behavior=behavior,
        )
        async def process(self, task: Task) -> None:
            _leaked.append(bytearray(b"\x01") * (self.leak_kib * 1024))
            await asyncio.sleep(self.sleep)
            record = {
                "pid": os.getpid(),
                "task_uid": task.task_uid,
                "index": task.get_payload("index"),
                "rss": self._process_info.memory_info().rss,
                "time": time.time(),
                "sample_size": 0,
                "raised": False,
            }
            with self.rss_log.open("a", encoding="utf-8") as rss_file:
                rss_file.write(json.dumps(record) + "\n")

    return AsyncLeakyConsumer


def run_async_consumer(args: argparse.Namespace, behavior: RestartBehavior) -> None:
    """Build the async consumer from the command line and run its loop."""
    consumer_class = build_consumer_class(args, behavior)
    consumer = consumer_class(args.identity, args.leak_kib, args.rss_log, args.sleep)  # type: ignore[call-arg]
    asyncio.run(consumer.loop())
