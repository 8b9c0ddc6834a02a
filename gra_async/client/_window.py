"""How many calls one endpoint may have in flight: a window that finds the server's knee.

A model server past its capacity does not refuse: vLLM and llama.cpp queue the request,
and the only sign is latency. So the window follows latency, in epochs of about one round
trip (at least `_MIN_SAMPLES` replies, and at least the base latency long):

- The base is the lowest epoch-mean latency of the last `_BASE_EPOCHS` epochs: the
  latency without a queue. An epoch's mean, not the fastest reply: with 500 +- 100 ms of
  jitter the fastest replies are 20% under the typical one, and a base that low reads as
  a queue that is not there.
- An epoch whose mean is over the base, less twice our own event loop's lag (`_lag.py`:
  a busy client reads every reply late), by `_TOLERANCE` of it, by `_NOISE` seconds
  (below ~20 ms a busy client's own event-loop lag moves latency more than a queue does)
  and by three standard errors of that mean (a shared machine's stalls are noise, not a
  queue) had a queue in front of it, unless that rise means less than one call waiting
  (calls in flight x (1 - base / mean), as TCP Vegas counts a path's queue). By Little's
  law the server sustains throughput x base calls (and calls in flight x base / mean,
  which holds where a lull in demand made the throughput read low); the window goes
  there, plus `_MARGIN`.
- An epoch without a queue in which the window held calls back grows it: doubling while
  no knee is known, then by `_GROWTH`, every other epoch (the one between shows what the
  step did). The window then swings between ~1.05 and ~1.25 times the knee: a queue wait
  of 5-20% of the service time (bench/capacity_bench.py).
- It starts at the cap, not at one: at 8 s latency a slow start to 10,000 takes ~14 round
  trips, two minutes of a run. The first replies of a burst are calls that found a free
  slot, so the first epoch sees the base even behind a burst far past the knee; it lasts
  two of its fastest round trips, since the first replies are also the fastest ones.
- The base can be wrong: too high when even the first epoch queued (fewer slots than
  `_MIN_SAMPLES`, or a burst of new connections slowed it all), stale when the work got
  slower (longer replies). Once at `_FIRST_PROBE`, and once a knee is known at once and
  then every `_PROBE_EVERY` epochs, a probe lowers the window to
  `_PROBE_DEPTH` of itself for two epochs: one to drain, one to measure the calls sent
  under it. A lower latency is the new base; if the throughput did not fall and the
  latency did (by Little's law it must, when the window bound), the probe was still past
  the knee, and another comes at once from the lower window; the same throughput and the
  same latency mean the window did not bind before (a lull in demand), and it goes back;
  the same latency with less throughput means no queue, the work is slower: that latency
  is the new base.
  A cut that lowered throughput and not latency asks for a probe the same way. A probe
  whose smaller window held no call back (demand was under it) only measures a base.
- 429 and 503 halve it, at most once per `_CUT_INTERVAL`: a storm arrives as one burst.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["ConcurrencyWindow"]

_MIN_SAMPLES: Final = 16
_BASE_EPOCHS: Final = 30
_TOLERANCE: Final = 0.15
_NOISE: Final = 0.020
_MARGIN: Final = 0.05
_GROWTH: Final = 0.10
_PROBE_EVERY: Final = 40
# In steady state the window is at most ~1.25x the knee: three quarters of it is under.
_PROBE_DEPTH: Final = 0.75
_CUT_INTERVAL: Final = 1.0
_FIRST_PROBE: Final = 3  # epochs: the first burst has been measured, the next one is steady


class ConcurrencyWindow:
    """One endpoint's window; fed by the endpoint on the event loop (not thread-safe)."""

    __slots__ = (
        "_base",
        "_blocked",
        "_checked",
        "_cut",
        "_cut_at",
        "_epochs",
        "_fastest",
        "_knee",
        "_lag_sum",
        "_last",
        "_latency_sum",
        "_load_sum",
        "_next_probe",
        "_probe",
        "_reference",
        "_replies",
        "_restore",
        "_samples",
        "_series",
        "_settling",
        "_square_sum",
        "_started",
        "_value",
        "adaptive",
        "cap",
        "limit",
    )

    def __init__(self, cap: int, *, adaptive: bool = True) -> None:
        self.cap = cap
        self.adaptive = adaptive
        self._value = float(cap)
        # The window in whole calls, read at every admission: kept, not computed per read.
        self.limit = max(1, cap)
        self._base: deque[float] = deque(maxlen=_BASE_EPOCHS)
        self._started: float | None = None  # when this epoch began; None before any reply
        self._replies = 0  # every reply of this epoch, for its throughput
        self._samples = 0  # the replies whose latency counts (see `replied`)
        self._latency_sum = 0.0
        self._square_sum = 0.0  # for the epoch mean's standard error
        self._load_sum = 0  # calls in flight here when each counted call was sent
        self._lag_sum = 0.0  # how late our own loop ran, at each counted reply
        self._fastest = float("inf")  # of the first epoch
        self._blocked = False  # the window held a call back during this epoch
        self._settling = False  # the window changed: this epoch shows the old one, not it
        self._knee = False  # a queue was seen: the server's capacity is under the cap
        self._epochs = 0
        self._probe = 0  # epochs left of a probe (2: draining, 1: measuring)
        self._next_probe = 0  # the epoch of the next probe, once a knee is known
        self._restore = 0.0  # the window to go back to after a probe
        # Probes come in series until one lowers throughput (it got under the knee); each
        # compares its throughput with the one before (or the epoch before the series).
        self._series = False
        self._reference: float | None = None
        self._checked = False  # the early probe has been made
        self._last: tuple[float, float] | None = None  # (latency, throughput) of the last decision
        self._cut_at = float("-inf")
        self._cut: tuple[float, float] | None = None  # (latency, throughput) at the last cut

    @property
    def value(self) -> float:
        """The window, fractional (growth adds fractions of a call)."""
        return self._value

    @value.setter
    def value(self, value: float) -> None:
        self._value = value
        self.limit = max(1, int(value))

    @property
    def base(self) -> float:
        """The latency without a queue, as measured (0 before the first epoch)."""
        return min(self._base) if self._base else 0.0

    def blocked(self) -> None:
        """A call was held back by the window: growing it could have sent more."""
        self._blocked = True

    def replied(self, latency: float, now: float, in_flight: int, *, sent_with: int = 0,
                lag: float = 0.0) -> None:
        """A successful reply after `latency` seconds, with `in_flight` calls still out.

        `sent_with`: the calls in flight here when it was sent, itself included (0: unknown,
        `in_flight + 1` is used). `lag`: how late our own event loop runs (`_lag.py`).
        """
        if not self.adaptive:
            if self.value < self.cap:  # after a cut, back to the cap additively
                self.value = min(float(self.cap), self.value + 1.0 / self.value)
            return
        if self._started is None:
            self._started = now - latency
        self._replies += 1
        self._fastest = min(self._fastest, latency)
        if self._probe == 1 and now - latency < self._started:
            return  # a probe measures only calls sent under its own window, not the queue's
        self._samples += 1
        self._latency_sum += latency
        self._square_sum += latency * latency
        self._load_sum += sent_with or in_flight + 1
        self._lag_sum += lag
        if self._samples < _MIN_SAMPLES:
            return
        elapsed = now - self._started
        mean = self._latency_sum / self._samples
        # The first replies of calls sent after a point in time are the fastest of them (with
        # +-25% jitter, 20% under the mean), so the epochs that set the base last two round
        # trips: a probe's, and the first (from its fastest reply: a first burst far past the
        # knee has a mean that grows as fast as the epoch does).
        if self._probe == 1:
            span = 2.0 * mean
        elif not self._base:
            span = 2.0 * self._fastest
        else:
            span = self.base or mean
        if elapsed < span:
            return  # less than a round trip: the window's effect is not in yet
        if self._settling and in_flight > self.limit:
            return  # what was sent under a larger window is still draining
        n = self._samples
        error = math.sqrt(max(0.0, self._square_sum / n - mean * mean) / (n - 1))
        self._close(mean, error, self._replies / elapsed, self._load_sum / n,
                    self._lag_sum / n, now)

    def overloaded(self, now: float) -> None:
        """A 429 or 503: the server said it is over its capacity."""
        if now - self._cut_at >= _CUT_INTERVAL:
            self._cut_at = now
            self._found_knee()
            self._set(self.value / 2.0)

    def _found_knee(self) -> None:
        if not self._knee:
            # The base may have been measured behind a queue already: probe as soon as
            # the queue has drained, not only after `_PROBE_EVERY` epochs.
            self._knee = True
            self._next_probe = self._epochs
            self._series, self._reference = True, None  # a first burst's throughput: no reference

    def _set(self, value: float) -> None:
        value = min(float(self.cap), max(1.0, value))
        if value != self.value:
            self.value = value
            self._settling = True

    def _close(self, mean: float, error: float, throughput: float, load: float, lag: float,
               now: float) -> None:
        first, blocked, settling = not self._base, self._blocked, self._settling
        self._started, self._replies, self._samples, self._load_sum = now, 0, 0, 0
        self._latency_sum = self._square_sum = self._lag_sum = 0.0
        self._blocked = self._settling = False
        self._epochs += 1
        if self._probe:
            self._probe -= 1
            if self._probe == 0:
                self._probed(mean, throughput, load, blocked)
            return
        if settling and not first:
            return
        self._last = (mean, throughput)
        if first:
            self._base.append(mean)
            return
        base = self.base
        self._base.append(mean)
        cut, self._cut = self._cut, None
        if cut is not None and mean >= cut[0] * 0.95 and throughput < cut[1] * 0.9:
            # The last cut lowered throughput and not latency: was there a queue at all,
            # or did the work itself get slower (longer replies)? A probe tells.
            self._start_probe()
            return
        # Not a queue of ours: twice our own loop's lag comes off the rise before the
        # tolerance applies (a client near a core's worth of work reads every reply late:
        # bench/pipeline_bench.py at C=500 saw 90 ms over the base with a p99 lag of 260 ms;
        # at C=10,000, with a mean lag of 0.45 s and a base 7% low from a first epoch that
        # saw only the fastest replies of a ramp, lag as an alternative floor instead of an
        # addend cut an adjudicator from 10,000 to 2,689). Nor is a rise that means under
        # one call waiting (`load x (1 - base / mean)`, as TCP Vegas reads a path's queue:
        # a lull with one call in flight and a slow reply cut a window to 1).
        if (mean - base > max(base * _TOLERANCE, _NOISE, 3.0 * error) + 2.0 * lag
                and load * (1.0 - base / mean) >= 1.0):
            self._found_knee()
            # By Little's law the server serves throughput x base calls at once; but an
            # epoch that spans a lull in a pipeline's demand reads a low throughput (a
            # reviewer endpoint cut from 500 to 6 that way), and the calls in flight times
            # the share of their latency that was service says the same where demand held.
            served = max(throughput * base, load * base / mean)
            target = min(self.value, served * (1.0 + _MARGIN))
            if target < self.value * 0.9:
                self._cut = (mean, throughput)
            self._set(target)
        elif blocked and self.value < self.cap and not self._probe_due():
            self._set(self.value + max(1.0, self.value * _GROWTH if self._knee else self.value))
            return
        if self._probe_due():
            self._start_probe()

    def _start_probe(self) -> None:
        self._checked = True
        if not self._series:
            self._series = True
            self._reference = self._last[1] if self._last is not None else None
        self._next_probe = self._epochs + _PROBE_EVERY
        self._restore = self.value
        self._probe = 2
        self._set(min(self.value * _PROBE_DEPTH, self.limit - 1.0))

    def _probed(self, mean: float, throughput: float, load: float, blocked: bool) -> None:
        """The measuring epoch of a probe: the latency under a smaller window."""
        base, reference = self.base, self._reference
        self._base.append(mean)
        if not blocked:
            # The smaller window held nothing back: the pipeline sent less than it anyway, so
            # its throughput says nothing about the knee (read as "still past it", it cut a
            # window from 375 to the 113 calls a lull had in flight). Its latency is a base.
            self._series = False
            self._set(self._restore)
            return
        if self.limit >= int(self._restore):
            # One call at a time, so no queue of ours: this latency is the base.
            self._series = False
            self._base.clear()
            self._base.append(mean)
            self._set(self._restore)
            return
        before = self._last[0] if self._last is not None else mean
        if reference is None or throughput >= reference * 0.9:
            if reference is not None and mean > before * 0.9:
                # The same throughput from 3/4 of the calls in flight needs a latency <= 0.83
                # of the one before (Little's law), if the window bound then. It did not
                # fall: the epoch before had fewer calls out than its window (a lull in a
                # pipeline's demand), so its throughput says nothing of the knee. Read as
                # "still past the knee", 8 s replies after a lull cut a window of 10,000 with
                # no queue anywhere to 6,329 (tests/test_window.py::TestAtScale). After a
                # first burst or a 429 (no reference) the series goes on: its later probes
                # correct a stale base.
                self._series = False
                self._set(self._restore)
                return
            # A smaller window, the same throughput and a lower latency (or nothing to
            # compare with, after a first burst): still past the knee, this latency still
            # had a queue in it. Back to what Little's law allows with it (about 0.8 of the
            # window), probe again.
            self._next_probe = self._epochs + 1
            self._reference = throughput
            self._set(min(self._restore, throughput * self.base * (1.0 + _MARGIN)))
            return
        self._series = False
        if mean > before * (1.0 + _TOLERANCE):
            # Slower under a smaller window: capacity fell during the probe (a replica
            # removed; read as "the work got slower", it set a base of 3x the real one).
            self._set(min(self._restore, load * base / mean * (1.0 + _MARGIN)))
            return
        if mean > base * (1.0 + _TOLERANCE) and mean >= before * 0.95:
            # Less throughput and the same latency: the server was not queueing, the work
            # is slower than when the base was measured.
            self._base.clear()
            self._base.append(mean)
            self._set(self._restore)
            return
        self._set(min(self._restore, reference * self.base * (1.0 + _MARGIN)))

    def _probe_due(self) -> bool:
        # One probe early on even with no knee seen: a first epoch slowed as a whole (a
        # burst of new connections on a busy client) leaves a base that already holds the
        # queue, and no later epoch would look slower than it.
        if not self._checked and self._epochs >= _FIRST_PROBE:
            return True
        return self._knee and self._epochs >= self._next_probe
