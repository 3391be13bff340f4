"""A guarded worker that really allocates memory, run as a subprocess by the tests.

Usage: ``python tests/worker.py '<json settings>'``. It prints one line per event
on stdout, flushed at once, so the test can read how far it got before it exited:

* ``baseline BYTES`` before the first call, ``call N rss BYTES`` after each call
  that returned to its caller;
* ``body N`` when a call's body starts, ``end N`` when it ends;
* ``caught N ValueError`` when a call raised and the caller caught it;
* ``before_exit NAME`` for each before-exit callback, ``decision RULE TASKS`` for
  a custom behaviour, and ``finished`` when every call ran and nothing exited.

The settings: ``rules`` (restart_when keyword arguments), ``behavior``
(``EXIT_0``, ``EXIT_1``, ``DRY_RUN`` or ``callable``), ``calls``, ``leak_mib`` per
call, ``sleep`` seconds per call, ``mode`` (``sync``, ``method``, ``raise``,
``async``, ``async_concurrent``, ``threads``, ``thread``, ``fork``),
``raise_at`` (the call that raises in ``raise`` mode), ``before_exit`` (names of
callbacks: ``ok1``, ``ok2``, ``raising``), ``enabled`` and ``concurrency``.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import logging
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memwatch import Decision, RestartBehavior, restart_when, stats
from memwatch.decorator import guard_of
from memwatch.memory import default_reader
from memwatch.reexec import generation

SETTINGS: dict[str, Any] = json.loads(sys.argv[1])
KEPT: list[bytearray] = []
_print_lock = threading.Lock()


def emit(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def rss() -> int:
    value = default_reader().read()
    assert value is not None
    return value


def make_callback(name: str) -> Any:
    def callback() -> None:
        emit(f"before_exit {name}")
        if name == "raising":
            raise RuntimeError("callback failed on purpose")
        if name == "exiting":
            sys.exit(5)
        if name == "hanging":
            time.sleep(3600)
        if name == "sigterm":
            # The supervisor's stop request arrives while memwatch's exit runs.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            emit("before_exit sigterm survived")

    callback.__qualname__ = f"callback_{name}"
    return callback


def custom_behavior(decision: Decision) -> None:
    emit(f"decision {decision.rule} {decision.snapshot.tasks}")


def build_decorator() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    name = SETTINGS.get("behavior", "EXIT_0")
    behavior: Any = custom_behavior if name == "callable" else RestartBehavior[name]
    return restart_when(
        **SETTINGS["rules"],
        behavior=behavior,
        before_exit=[make_callback(n) for n in SETTINGS.get("before_exit", [])],
        enabled=SETTINGS.get("enabled"),
        **SETTINGS.get("options", {}),
    )


GUARD = build_decorator()
LEAK_BYTES = int(SETTINGS.get("leak_mib", 0) * 1024 * 1024)
SLEEP = float(SETTINGS.get("sleep", 0))


GARBAGE_BYTES = int(SETTINGS.get("garbage_mib", 0) * 1024 * 1024)
FIRST_CALL_BYTES = int(SETTINGS.get("first_call_mib", 0) * 1024 * 1024)
SHARED_BYTES = int(SETTINGS.get("shared_mib", 0) * 1024 * 1024)
KEPT_MAPS: list[mmap.mmap] = []


class Cycle:
    """Memory that only the cyclic garbage collector frees."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(b"\x01") * size
        self.me = self


def work(number: int) -> int:
    emit(f"body {number}")
    if LEAK_BYTES:
        # Multiplying writes every byte, so the pages are really resident.
        KEPT.append(bytearray(b"\x01") * LEAK_BYTES)
    if GARBAGE_BYTES:
        Cycle(GARBAGE_BYTES)
    if number == 1 and SHARED_BYTES:
        # Pages of a shared file mapping: resident, so in the RSS, but not private.
        mapping = mmap.mmap(-1, SHARED_BYTES, flags=mmap.MAP_SHARED)
        mapping.write(b"\x01" * SHARED_BYTES)
        KEPT_MAPS.append(mapping)
        # A second process mapping the same pages makes them shared, not private.
        ready, touched = os.pipe()
        holder = os.fork()
        if holder == 0:
            # fork copies no page tables of a shared mapping: touch every page here.
            for offset in range(0, SHARED_BYTES, 4096):
                mapping[offset]
            os.write(touched, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready, 1)
        atexit.register(os.kill, holder, signal.SIGKILL)
    if number == 1 and FIRST_CALL_BYTES:
        # A parser's lazily built cache: large once, then stable.
        KEPT.append(bytearray(b"\x01") * FIRST_CALL_BYTES)
    if SLEEP:
        time.sleep(SLEEP)
    if SETTINGS.get("mode") == "raise" and number == SETTINGS.get("raise_at"):
        emit(f"end {number}")
        raise ValueError(f"call {number} failed on purpose")
    emit(f"end {number}")
    return number


guarded_work = GUARD(work)


class Service:
    @GUARD
    def process(self, number: int) -> int:
        return work(number)


async def work_async(number: int) -> int:
    emit(f"body {number}")
    if LEAK_BYTES:
        KEPT.append(bytearray(b"\x01") * LEAK_BYTES)
    await asyncio.sleep(SLEEP)
    emit(f"end {number}")
    return number


guarded_async = GUARD(work_async)


def after_call(number: int) -> None:
    emit(f"call {number} rss {rss()}")


def run_sync(calls: int) -> None:
    service = Service()
    for number in range(1, calls + 1):
        try:
            if SETTINGS.get("mode") == "method":
                result = service.process(number)
            else:
                result = guarded_work(number)
        except ValueError:
            emit(f"caught {number} ValueError")
            continue
        except BaseException as exc:
            if not SETTINGS.get("swallow"):
                raise
            # What a bare except: around the call does to memwatch's exit.
            emit(f"swallowed {number} {type(exc).__name__}")
            continue
        assert result == number
        after_call(number)


async def run_async(calls: int) -> None:
    for number in range(1, calls + 1):
        result = await guarded_async(number)
        assert result == number
        after_call(number)


async def run_async_concurrent(calls: int, concurrency: int) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with semaphore:
            result = await guarded_async(number)
        assert result == number
        after_call(number)

    await asyncio.gather(*(one(number) for number in range(1, calls + 1)))


def run_threads(calls: int, concurrency: int) -> None:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for number, result in zip(
            range(1, calls + 1), pool.map(guarded_work, range(1, calls + 1)), strict=True
        ):
            assert result == number


def run_burst(threads: int) -> None:
    """Call the guard from many threads at once, each call ending at the same moment."""
    barrier = threading.Barrier(threads)

    def one(number: int) -> None:
        barrier.wait()
        guarded_work(number)
        emit(f"call {number} returned")
        # Every thread calls again: the exit must happen once, whichever call carries it.
        guarded_work(number + threads)

    workers = [threading.Thread(target=one, args=(n,)) for n in range(1, threads + 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def run_one_thread(calls: int) -> None:
    thread = threading.Thread(target=run_sync, args=(calls,), name="worker-thread")
    thread.start()
    thread.join()


def run_fork(calls: int) -> None:
    run_sync(calls)
    guard = guard_of(guarded_work)
    emit(f"parent baseline {guard.tracker.baseline} tasks {guard.tracker.tasks}")
    pid = os.fork()
    if pid == 0:
        emit(f"child tasks {guard.tracker.tasks} baseline {guard.tracker.baseline}")
        emit(f"child rss {rss()}")
        for number in range(1, calls + 1):
            guarded_work(number)
        emit(f"child baseline {guard.tracker.baseline} tasks {guard.tracker.tasks}")
        emit("child finished")
        sys.stdout.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    emit(f"child exit {os.waitstatus_to_exitcode(status)}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    emit(f"generation {generation()} pid {os.getpid()}")
    if generation() >= SETTINGS.get("last_generation", sys.maxsize):
        emit("finished")
        return
    if SETTINGS.get("no_orig_argv"):
        # What an embedded interpreter looks like to memwatch: no command line to re-run.
        sys.orig_argv = []
    if SETTINGS.get("gc_disabled"):
        # Only an explicit gc.collect(), such as memwatch's reclaim, frees the cycles.
        gc.disable()
    emit(f"baseline {rss()}")
    calls = int(SETTINGS.get("calls", 10))
    concurrency = int(SETTINGS.get("concurrency", 4))
    mode = SETTINGS.get("mode", "sync")
    if mode == "async":
        asyncio.run(run_async(calls))
    elif mode == "async_concurrent":
        asyncio.run(run_async_concurrent(calls, concurrency))
    elif mode == "threads":
        run_threads(calls, concurrency)
    elif mode == "thread":
        run_one_thread(calls)
    elif mode == "burst":
        run_burst(concurrency)
    elif mode == "fork":
        run_fork(calls)
    else:
        run_sync(calls)
    if SETTINGS.get("print_stats"):
        figures = stats(guarded_work)
        emit(
            f"stats tasks {figures.tasks} growth {figures.growth} "
            f"per_task {figures.growth_per_task} decision {figures.decision}"
        )
    emit("finished")
    # A process that goes on after its calls, as a service whose loop caught the exit.
    time.sleep(float(SETTINGS.get("linger", 0)))


if __name__ == "__main__":
    main()
