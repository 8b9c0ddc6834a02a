"""Capacity benchmark: does the concurrency window find a server's knee without a 429?

    python bench/capacity_bench.py                     # K=64, L=0.5±0.1 s, C=1000
    python bench/capacity_bench.py --phases 64,32,64   # a replica removed, then back
    python bench/capacity_bench.py --degrade 1         # throughput falls past the knee

The fake server has K slots and a FIFO queue beyond them, and never answers 429 (as vLLM).
C workers call through one `EndpointPool` endpoint whose cap is C, so only the window
stands between the server and C calls at once. Each phase runs `--seconds`, with capacity
K_i; its first `--settle` seconds are left out of the figures (the first phase's first
`--warmup` seconds too: C calls sent at once to K slots take C/K service times to drain). Per phase it prints:
throughput against the ideal K/L, the mean queue wait at the server against the mean
service time (the server measures both), and the window's median and range. Candidates,
each in the same run against the same server:

  adaptive  the latency window (gra_async/client/_window.py)
  fixed     the same client with `adaptive = false`: the window stays at C
  openai    bare AsyncOpenAI(max_retries=0) + asyncio.Semaphore(C): the usual baseline

Targets (issue #13): throughput >= 0.9 of K/L and queue wait <= 25% of the service time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gra_async.testing.fake_server import FakeServerProcess

MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]


@dataclass
class Phase:
    capacity: int
    done: int = 0
    served: int = 0
    wait: float = 0.0
    service: float = 0.0
    seconds: float = 0.0
    windows: list[float] = field(default_factory=list)


async def _measure(
    server: FakeServerProcess, args: argparse.Namespace,
    one: Callable[[], Awaitable[object]], window: Callable[[], float] | None,
) -> list[Phase]:
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await one()
            done += 1

    results: list[Phase] = []
    workers = [asyncio.ensure_future(worker()) for _ in range(args.c)]
    try:
        for i, capacity in enumerate(args.phases):
            phase = Phase(capacity)
            await asyncio.to_thread(server.control, capacity=capacity)
            await asyncio.sleep(args.settle + (args.warmup if i == 0 else 0.0))
            await asyncio.to_thread(server.reset_stats)
            started, first = time.perf_counter(), done
            while time.perf_counter() - started < args.seconds - args.settle:
                await asyncio.sleep(0.25)
                if window is not None:
                    phase.windows.append(window())
            phase.seconds = time.perf_counter() - started
            phase.done = done - first
            stats = (await asyncio.to_thread(server.stats))["capacity"]
            phase.served, phase.wait, phase.service = (
                stats["served"], stats["wait_total"], stats["service_total"])
            results.append(phase)
    finally:
        stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return results


async def run_gra(server: FakeServerProcess, args: argparse.Namespace, adaptive: bool) -> list[Phase]:
    from gra_async.client import AiohttpTransport, ChatRequest, Endpoint, EndpointPool
    from gra_async.config import EndpointConfig

    transport = AiohttpTransport()
    config = EndpointConfig(base_url=server.base_url, model=MODEL, max_concurrency=args.c,
                            adaptive=adaptive, read_timeout=600)
    endpoint = Endpoint(config, transport)
    pool = EndpointPool([endpoint])
    request = ChatRequest(messages=MESSAGES, max_tokens=32)
    try:
        return await _measure(server, args, lambda: pool.chat(request),
                              lambda: endpoint.window.value)
    finally:
        await transport.aclose()


async def run_openai(server: FakeServerProcess, args: argparse.Namespace) -> list[Phase]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=600)
    semaphore = asyncio.Semaphore(args.c)

    async def one() -> None:
        async with semaphore:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)  # type: ignore[arg-type]

    try:
        return await _measure(server, args, one, None)
    finally:
        await client.close()


def _print(name: str, phases: list[Phase], latency: float) -> None:
    for i, p in enumerate(phases):
        ideal = p.capacity / latency  # the server's ceiling, calls per second
        got = p.done / p.seconds
        wait = p.wait / p.served if p.served else 0.0
        service = p.service / p.served if p.served else latency
        line = (f"{name:9s} phase {i + 1} K={p.capacity:<4d} throughput {got:7.1f}/s = "
                f"{got / ideal:4.2f} of K/L   queue wait {wait * 1000:7.0f} ms = "
                f"{wait / service:5.2f} of service")
        if p.windows:
            w = sorted(p.windows)
            line += f"   window median {statistics.median(w):6.0f} [{w[0]:.0f}..{w[-1]:.0f}]"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", type=int, default=1000, help="calls the workers keep ready")
    parser.add_argument("--phases", default="64,32,64", help="capacity per phase")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds of each phase left out of its figures")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="more seconds left out of the first phase")
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--degrade", type=float, default=0.0)
    parser.add_argument("--only", default="adaptive,fixed,openai")
    args = parser.parse_args()
    args.phases = [int(k) for k in args.phases.split(",")]
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(f"C={args.c}  L={args.latency}±{args.jitter} s  degrade={args.degrade}  "
          f"phases={args.phases} x {args.seconds:g} s (first {args.settle:g} s of each left out, "
          f"{args.warmup:g} s more of the first)")
    for name in args.only.split(","):
        with FakeServerProcess.start(models=[MODEL], latency=args.latency, jitter=args.jitter,
                                     degrade=args.degrade) as server:
            if name == "openai":
                phases = runner(run_openai(server, args))
            else:
                phases = runner(run_gra(server, args, adaptive=name == "adaptive"))
        _print(name, phases, args.latency)


if __name__ == "__main__":
    main()
