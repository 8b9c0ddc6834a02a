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
    """The lag of one event loop, read by `current()` from code running on it.

    It holds no reference to its loop (the loop is passed in): kept as the value of a
    WeakKeyDictionary keyed by that loop, a reference would keep every finished loop alive.
    """

    __slots__ = ("_due", "_late", "_read", "_ticking")

    def __init__(self) -> None:
        self._ticking = False  # a tick is scheduled (its handle, holding the loop, is not kept)
        self._due = 0.0
        self._late = 0.0  # how late the last tick fired
        self._read = 0.0

    def current(self, loop: asyncio.AbstractEventLoop) -> float:
        """Seconds by which `loop` (the running one) is late now (0 when it keeps up)."""
        now = loop.time()
        self._read = now
        if not self._ticking:
            self._late = 0.0
            self._schedule(loop, now)
            return 0.0
        # The last tick's lateness, not how overdue the next one is: a reply read now came
        # in at some point of a busy stretch, not at its start.
        return self._late

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._due = now + _PERIOD
        self._ticking = True
        loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self._late = now - self._due
        if now - self._read > _IDLE:
            self._ticking = False
            return
        self._schedule(loop, now)


_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = (
    weakref.WeakKeyDictionary()
)
# The last loop read and its monitor, tried first: a WeakKeyDictionary lookup makes a weak
# reference each time, and this is read at every reply (~2% of the event loop's CPU at
# 0 ms latency). The loop is held weakly here too.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], LoopLag] | None = None


def loop_lag() -> float:
    """The running loop's lag (its monitor is made on first use); 0 outside a loop."""
    global _last
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return 0.0
    if _last is not None and _last[0]() is loop:
        return _last[1].current(loop)
    monitor = _monitors.get(loop)
    if monitor is None:
        monitor = _monitors[loop] = LoopLag()
    _last = (weakref.ref(loop), monitor)
    return monitor.current(loop)
