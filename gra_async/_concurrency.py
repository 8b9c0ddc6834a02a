"""Two helpers of the one concurrency style (asyncio task groups), shared by the layers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["block_on", "first_error", "run_coroutine", "thread_until_done"]

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
