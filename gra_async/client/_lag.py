"""How late the event loop runs what is due: what every reply waits before our code sees it.

A client near one core's worth of work reads each reply late: the bytes are at the socket,
the loop is busy with other replies. That wait is part of the latency an endpoint measures,
and unaccounted for it reads as a server queue (bench/pipeline_bench.py at C=500: a p99
lag of 260 ms, and windows cut below the calls the pipeline had to send). The window takes
a rise within twice this lag as noise, not as a queue: subtracting it from each
latency instead left bases under the server's real latency (a tick's lateness is a rough
sample of what a reply waited), and those read every later epoch as a queue.

One monitor per event loop: a timer every `_PERIOD` seconds notes how late it fired. It
stops itself after `_IDLE` seconds without a reader, so an idle process does not keep
waking up, and starts again on the next read.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Final

__all__ = ["LoopLag", "loop_lag"]

_PERIOD: Final = 0.025
_IDLE: Final = 5.0


class LoopLag:
    """The lag of one event loop, read by `current()` from code running on it."""

    __slots__ = ("__weakref__", "_due", "_handle", "_late", "_loop", "_read")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._late = 0.0  # how late the last tick fired
        self._read = 0.0

    def current(self) -> float:
        """Seconds by which the loop is running late now (0 when it keeps up)."""
        now = self._loop.time()
        self._read = now
        if self._handle is None:
            self._late = 0.0
            self._schedule(now)
            return 0.0
        # The last tick's lateness, not how overdue the next one is: a reply read now came
        # in at some point of a busy stretch, not at its start.
        return self._late

    def _schedule(self, now: float) -> None:
        self._due = now + _PERIOD
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self._late = now - self._due
        if now - self._read > _IDLE:
            self._handle = None
            return
        self._schedule(now)


_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = (
    weakref.WeakKeyDictionary()
)


def loop_lag() -> float:
    """The running loop's lag (its monitor is made on first use); 0 outside a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return 0.0
    monitor = _monitors.get(loop)
    if monitor is None:
        monitor = _monitors[loop] = LoopLag(loop)
    return monitor.current()
