"""Helpers of the one concurrency style (asyncio task groups), shared by the layers."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["Slots", "block_on", "first_error", "run_coroutine", "thread_until_done"]

T = TypeVar("T")


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that made a task group fail, out of its (nested) group.

    When one task fails the group cancels the others, so the first leaf is the cause; the
    caller re-raises it alone (`raise first_error(group) from None`) to keep one error per
    event, as the rest of the code and the CLI expect.
    """
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_error(error)
        return error
    return group


class Slots:
    """A counting semaphore that hands a released slot straight to the longest waiter.

    `asyncio.Semaphore` (3.11) wakes a waiter by scanning its queue past the waiters woken
    already but not yet run, so a burst of k releases in one loop turn costs k^2 steps,
    and `locked()` scans every waiter: 3.6% of py-spy's samples at 10,000 calls in flight
    (bench/pipeline_bench.py --scale; end to end the gain is within that bench's noise).
    Here both are O(1); a cancelled waiter is dropped when it comes up, and one cancelled
    after it was handed a slot passes it on.
    """

    def __init__(self, value: int) -> None:
        if value < 0:
            raise ValueError("Slots value must be >= 0")
        self._free = value
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    async def acquire(self) -> None:
        if self._free > 0:
            self._free -= 1  # nobody waits while a slot is free: release hands them over
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot in the same turn it was cancelled
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


async def thread_until_done(work: Callable[[threading.Event], T]) -> T:
    """Run `work(stop)` in a worker thread and wait for it; what it returns.

    A thread cannot be cancelled: on cancellation `stop` is set and the thread is still
    waited for, so what it reads (the journal) is never closed under it.
    """
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, stop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue
        raise


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a new event loop, uvloop's when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def block_on(coro: Coroutine[Any, Any, T], name: str) -> T:
    """`run_coroutine` for a public blocking call `gra_async.NAME()`: inside a running event
    loop (Jupyter, async code) raises `UsageError` naming the `NAME_async` to await."""
    from gra_async.errors import UsageError

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_coroutine(coro)
    coro.close()
    raise UsageError(f"gra_async.{name}() cannot block inside a running event loop; "
                     f"use `await gra_async.{name}_async(...)`")
