"""The latency-based concurrency window: it finds a server's knee without any 429.

Two kinds of test: against the fake server's capacity model (K slots, a FIFO queue, no 429,
as vLLM) over real HTTP, and a discrete-event model of the same server on a virtual clock,
for the cases that would take minutes of real time (a knee under the minimum epoch size,
replies that get slower for reasons that are not a queue).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import random
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from gra_async.client import AiohttpTransport, ChatRequest, Endpoint, EndpointPool
from gra_async.client._lag import loop_lag
from gra_async.client._window import ConcurrencyWindow
from gra_async.config import EndpointConfig
from gra_async.testing.fake_server import FakeServerProcess

REQUEST = ChatRequest(messages=[{"role": "user", "content": "one prime, please"}], max_tokens=8)


@pytest.fixture
def server() -> Iterator[FakeServerProcess]:
    with FakeServerProcess.start(models=["m"], latency=0.1, jitter=0.02) as srv:
        yield srv


async def _load(server: FakeServerProcess, workers: int, phases: list[tuple[int, float]],
                adaptive: bool = True) -> list[tuple[float, float, float]]:
    """Keep `workers` calls ready; per (capacity, seconds) phase return the window's median,
    the server's mean queue wait and its mean service time, all over the phase's second
    half (a probe lowers the window for two epochs: one reading could land in one)."""
    transport = AiohttpTransport()
    endpoint = Endpoint(EndpointConfig(base_url=server.base_url, model="m",
                                       max_concurrency=workers, adaptive=adaptive), transport)
    pool = EndpointPool([endpoint])
    stop = False

    async def worker() -> None:
        while not stop:
            await pool.chat(REQUEST)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    results = []
    try:
        for capacity, seconds in phases:
            await asyncio.to_thread(server.control, capacity=capacity)
            await asyncio.sleep(seconds / 2)
            await asyncio.to_thread(server.reset_stats)
            windows = []
            for _ in range(int(seconds / 2 / 0.1)):
                await asyncio.sleep(0.1)
                windows.append(endpoint.window.value)
            stats = (await asyncio.to_thread(server.stats))["capacity"]
            served = max(1, stats["served"])
            results.append((statistics.median(windows), stats["wait_total"] / served,
                            stats["service_total"] / served))
    finally:
        stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.aclose()
    return results


class TestAgainstTheFakeServer:
    def test_the_window_settles_near_the_knee_and_the_queue_stays_short(
        self, server: FakeServerProcess
    ) -> None:
        [(window, wait, service)] = asyncio.run(_load(server, 200, [(16, 12.0)]))
        assert 12 <= window <= 28
        assert wait <= 0.5 * service

    def test_without_it_the_server_queue_holds_everything_sent(
        self, server: FakeServerProcess
    ) -> None:
        # What the adaptive window is for: a fixed window of 200 against 16 slots keeps
        # ~184 calls waiting at the server, ~11 service times each.
        [(window, wait, service)] = asyncio.run(_load(server, 200, [(16, 4.0)], adaptive=False))
        assert window == 200
        assert wait > 5 * service

    def test_it_backs_off_when_capacity_drops_and_grows_back(
        self, server: FakeServerProcess
    ) -> None:
        phases = asyncio.run(_load(server, 200, [(32, 10.0), (8, 10.0), (32, 14.0)]))
        (before, _, _), (dropped, wait, service), (back, _, _) = phases
        assert 24 <= before <= 56
        assert dropped <= 16 and wait <= 0.5 * service
        assert back >= 24

    def test_the_vllm_metrics_the_fake_server_exports(self, server: FakeServerProcess) -> None:
        import urllib.request

        server.control(capacity=4)
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'vllm:num_requests_running{model_name="m"} 0' in text
        assert "vllm:num_requests_waiting" in text


# --- a virtual-clock model of a server with K slots and a FIFO queue --------------------


def simulate(
    capacity: Callable[[float], int],
    service: Callable[[float], float],
    *,
    cap: int = 1000,
    seconds: float = 300.0,
    jitter: float = 0.2,
    seed: int = 1,
    cpu: float = 0.0,
) -> list[tuple[float, float, float]]:
    """Closed loop: `cap` callers always ready, gated by one window; the server serves
    FIFO with `capacity(t)` slots and `service(t)` (+- jitter) seconds per call. With
    `cpu`, the client spends that long on each reply, one at a time (one event loop): a
    reply waits for the ones before it, and the window is told how late the loop runs.
    Returns (time, window, queue wait of the call that just finished) per reply."""
    rng = random.Random(seed)
    window = ConcurrencyWindow(cap)
    # (done at, seq, sent at, waited, calls in flight when sent)
    events: list[tuple[float, int, float, float, int]] = []
    queue: deque[tuple[float, int]] = deque()
    running = in_flight = seq = 0
    now = busy_until = 0.0
    trace = []

    def start(sent: float, load: int) -> None:
        nonlocal running, seq
        running += 1
        seq += 1
        took = service(now) * (1 + rng.uniform(-jitter, jitter))
        heapq.heappush(events, (now + took, seq, sent, now - sent, load))

    def admit() -> None:
        nonlocal in_flight
        while in_flight < window.limit:
            in_flight += 1
            if running < capacity(now):
                start(now, in_flight)
            else:
                queue.append((now, in_flight))
        window.blocked()

    admit()
    while events and now < seconds:
        done, _, sent, waited, load = heapq.heappop(events)
        now = max(done, busy_until)  # the server's slot is freed late too: close enough
        busy_until = now + cpu
        running -= 1
        in_flight -= 1
        while queue and running < capacity(now):
            start(*queue.popleft())
        window.replied(now - sent, now, in_flight, sent_with=load, lag=now - done)
        trace.append((now, window.value, waited))
        admit()
    return trace


def _steady(trace: list[tuple[float, float, float]], since: float, until: float = 1e9
            ) -> tuple[float, float, float]:
    """(mean window, mean queue wait, replies per second) between two times."""
    part = [t for t in trace if since <= t[0] < until]
    span = part[-1][0] - part[0][0]
    return (sum(t[1] for t in part) / len(part), sum(t[2] for t in part) / len(part),
            len(part) / span)


class TestVirtualClock:
    def test_a_knee_under_the_epoch_size_is_found(self) -> None:
        # 4 slots: the first epoch's 16 replies already queued, so its base reads ~2x high;
        # the probes have to find the real one.
        trace = simulate(lambda t: 4, lambda t: 1.0, cap=500, seconds=600)
        window, wait, rate = _steady(trace, 300)
        assert window <= 6
        assert wait <= 0.3  # of a 1 s service time
        assert rate >= 0.9 * 4

    def test_slower_replies_are_not_read_as_a_queue_forever(self) -> None:
        # The work doubles in length at t=100 (longer answers) with no queue anywhere:
        # the window must not spiral down, and the throughput must stay at what 64 slots give.
        trace = simulate(lambda t: 64, lambda t: 0.5 if t < 100 else 1.0, cap=1000, seconds=400)
        window, wait, rate = _steady(trace, 250)
        assert window >= 60
        assert rate >= 0.9 * 64 / 1.0
        assert wait <= 0.25 * 1.0

    def test_ten_thousand_in_flight_with_no_knee_stays_open(self) -> None:
        # A fleet bigger than the run: 8 s +- 25% latency, 10,000 callers, 20,000 slots.
        # One early probe (three quarters, two epochs) checks the base; then it stays.
        trace = simulate(lambda t: 20_000, lambda t: 8.0, cap=10_000, seconds=200, jitter=0.25)
        assert min(t[1] for t in trace) >= 7_500
        assert all(t[1] == 10_000 for t in trace if t[0] > 100)

    def test_a_client_slower_than_the_server_is_not_a_queue(self) -> None:
        # The client reads 800 replies a second; 500 calls at 0.5 s would bring 1,000: its
        # own backlog adds ~0.12 s to every latency, and no server queue exists. Cutting the
        # window cannot help, and in a pipeline (demand in bursts) it costs throughput.
        trace = simulate(lambda t: 20_000, lambda t: 0.5, cap=500, seconds=120, cpu=1 / 800)
        window, _, rate = _steady(trace, 30)
        assert window >= 0.9 * 500
        assert min(t[1] for t in trace if t[0] > 30) >= 0.75 * 500
        assert rate >= 0.95 * 800

    def test_a_lull_in_demand_is_not_read_as_capacity(self) -> None:
        window = ConcurrencyWindow(500)
        now = 0.0
        for _ in range(40):  # a steady first stretch: 100 calls in flight, 0.5 s each
            now += 0.005
            window.replied(0.5, now, 99, sent_with=100)
        lowest = 500
        for _ in range(120):  # a lull: one call at a time, and replies a little slower
            now += 0.6
            window.replied(0.6, now, 0, sent_with=1)
            lowest = min(lowest, window.limit)
        assert lowest >= 375  # the early probe's three quarters, no lower
        assert window.limit == 500

    def test_a_replica_removed_then_added_back(self) -> None:
        def capacity(t: float) -> int:
            return 32 if 200 <= t < 400 else 64

        trace = simulate(capacity, lambda t: 0.5, cap=1000, seconds=600)
        for since, until, knee in ((120, 200, 64), (300, 400, 32), (520, 600, 64)):
            window, wait, rate = _steady(trace, since, until)
            assert knee * 0.9 <= window <= knee * 1.4, (since, window)
            assert wait <= 0.25 * 0.5, (since, wait)
            assert rate >= 0.9 * knee / 0.5, (since, rate)


def _feed(window: ConcurrencyWindow, start: float, seconds: float, rate: float, latency: float,
          in_flight: int, *, lag: float = 0.0, blocked: bool = False) -> float:
    """Replies at `rate` per second for `seconds`, each after `latency`; returns the end."""
    now, step = start, 1.0 / rate
    while now < start + seconds:
        now += step
        if blocked:
            window.blocked()
        window.replied(latency, now, in_flight - 1, sent_with=in_flight, lag=lag)
    return now


class TestAtScale:
    """Epochs as `bench/pipeline_bench.py --scale` showed them: 8 s latency, 10,000 calls
    in flight, a client loop that runs late, a pipeline whose demand comes in waves."""

    def _opened(self, window: ConcurrencyWindow) -> float:
        # A first epoch from a ramp: the fastest replies only, so its base reads 7% low.
        return _feed(window, 0.0, 7.45, 300, 7.44, 2000)

    @pytest.mark.parametrize("lag", [0.45, 0.0])
    def test_our_own_loop_running_late_is_not_a_queue(self, lag: float) -> None:
        window = ConcurrencyWindow(10_000)
        now = self._opened(window)
        _feed(window, now, 9.0, 450, 8.86 + (0.0 if lag else 0.45), 4000, lag=lag)
        if lag:
            assert window.limit == 10_000  # 8.86 s read late by 0.45 s: no queue
        else:
            assert window.limit < 10_000  # the same rise, not explained by lag: a queue

    @pytest.mark.parametrize("probe_latency", [8.0, 6.0])
    def test_a_probe_after_a_lull_goes_back_to_the_window(self, probe_latency: float) -> None:
        window = ConcurrencyWindow(10_000)
        now = self._opened(window)
        now = _feed(window, now, 9.0, 900, 8.0, 8000)
        now = _feed(window, now, 9.0, 100, 8.0, 800)  # a lull: 800 calls out; then the probe
        assert window.limit == 7_500
        now = _feed(window, now, 9.0, 900, 8.0, 7500, blocked=True)  # draining
        # Measuring (calls sent under the probe only, over two round trips): 7,500 calls
        # out, 3.5x the lull's throughput. With the same latency as before that is no
        # queue, and the window goes back; with a lower one it was a queue.
        _feed(window, now, 25.0, 7500 / probe_latency, probe_latency, 7500, blocked=True)
        if probe_latency == 8.0:
            assert window.limit == 10_000
        else:
            assert window.limit < 7_500 * 1.1


def test_the_loop_lag_is_read_on_each_loop_and_keeps_no_finished_loop_alive() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    def block(seconds: float) -> None:
        time.sleep(seconds)

    async def busy() -> float:
        loop_lag()  # starts this loop's monitor
        await asyncio.sleep(0.01)
        block(0.2)  # the loop held up: its next tick fires ~0.2 s late
        await asyncio.sleep(0.005)  # the late tick runs; the one after is not due yet
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return loop_lag()

    async def idle() -> float:
        loop_lag()
        await asyncio.sleep(0.1)
        return loop_lag()

    assert asyncio.run(busy()) > 0.1
    assert asyncio.run(idle()) < 0.1  # another loop: not the first one's lag
    gc.collect()
    assert loops[0]() is None
