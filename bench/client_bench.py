"""Client-layer benchmark: how close each HTTP stack gets to the Little's-law ideal.

    python bench/client_bench.py                       # N=5000, L=0.5±0.1 s, C=500
    python bench/client_bench.py -n 20000 --latency 0  # raw throughput

Every candidate runs in its own process (so its peak RSS is its own) against one fake
server process; ideal wall time = N * L / C; efficiency = ideal / measured wall.
Candidates:
  raw       plain aiohttp loop, no limits or retries: the fake server's ceiling
  gra       gra_async's EndpointPool (limits, retries, stats) on its default H1Transport
  gra-aiohttp  the same on AiohttpTransport, the transport it had before
  openai    bare AsyncOpenAI(max_retries=0) + asyncio.Semaphore: the baseline
  httpx     plain httpx.AsyncClient + semaphore      (stack comparison)
  httpx2    plain httpx2.AsyncClient + semaphore     (what openai 3.x is built on)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gra_async.testing.fake_server import FakeServerProcess

MODEL = "bench-model"
MESSAGES = [
    {"role": "system", "content": "You write short answers."},
    {"role": "user", "content": "Name three prime numbers and say why they are prime."},
]
BODY: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "temperature": 0}


async def _drive(n: int, concurrency: int, one: Callable[[], Awaitable[object]]) -> None:
    """N calls, at most C at once, workers pulling from a shared counter (no N tasks up front)."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))


async def run_raw(url: str, n: int, c: int) -> None:
    import aiohttp

    payload = orjson.dumps(BODY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with session.post(f"{url}/chat/completions", data=payload,
                                    headers={"Content-Type": "application/json"}) as r:
                orjson.loads(await r.read())

        await _drive(n, c, one)


async def run_gra(url: str, n: int, c: int, aiohttp: bool = False) -> None:
    from gra_async.client import AiohttpTransport, ChatRequest, Endpoint, EndpointPool, H1Transport
    from gra_async.config import EndpointConfig

    transport = AiohttpTransport() if aiohttp else H1Transport()
    config = EndpointConfig(base_url=url, model=MODEL, max_concurrency=c)
    pool = EndpointPool([Endpoint(config, transport)])
    request = ChatRequest(messages=MESSAGES, max_tokens=32)
    try:
        await _drive(n, c, lambda: pool.chat(request))
    finally:
        await transport.aclose()


async def run_openai(url: str, n: int, c: int) -> None:
    from openai import AsyncOpenAI

    http_client = None
    if c > 1000:  # its default pool holds 1,000 connections: a baseline capped below C is no baseline
        import httpx
        from openai import DefaultAsyncHttpxClient

        http_client = DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=c, max_keepalive_connections=c))
    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300,
                         http_client=http_client)
    semaphore = asyncio.Semaphore(c)

    async def one() -> None:
        async with semaphore:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)  # type: ignore[arg-type]

    try:
        await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


async def _run_httpx_like(module: Any, url: str, n: int, c: int) -> None:
    payload = orjson.dumps(BODY)
    limits = module.Limits(max_connections=c, max_keepalive_connections=c)
    async with module.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            r = await client.post(f"{url}/chat/completions", content=payload,
                                  headers={"Content-Type": "application/json"})
            orjson.loads(r.content)

        await _drive(n, c, one)


async def run_httpx(url: str, n: int, c: int) -> None:
    import httpx

    await _run_httpx_like(httpx, url, n, c)


async def run_httpx2(url: str, n: int, c: int) -> None:
    import httpx2  # type: ignore[import-not-found]

    await _run_httpx_like(httpx2, url, n, c)


CANDIDATES: dict[str, Callable[[str, int, int], Awaitable[None]]] = {
    "raw": run_raw,
    "gra": run_gra,
    "gra-aiohttp": lambda url, n, c: run_gra(url, n, c, aiohttp=True),
    "openai": run_openai,
    "httpx": run_httpx,
    "httpx2": run_httpx2,
}


def worker_main(args: argparse.Namespace) -> None:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    started_cpu = time.process_time()
    started = time.perf_counter()
    asyncio.run(CANDIDATES[args.worker](args.url, args.n, args.concurrency))
    wall = time.perf_counter() - started
    cpu = time.process_time() - started_cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="requests per candidate")
    parser.add_argument("-c", "--concurrency", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.5, help="server latency, seconds")
    parser.add_argument("--jitter", type=float, default=0.1, help="± uniform jitter, seconds")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--candidates", default="raw,gra,gra-aiohttp,openai,httpx,httpx2")
    parser.add_argument("--worker", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    server = FakeServerProcess.start(models=[MODEL], latency=args.latency, jitter=args.jitter)
    ideal = args.n * args.latency / args.concurrency
    rows: dict[str, dict[str, float]] = {}
    print(f"N={args.n} L={args.latency}±{args.jitter}s C={args.concurrency} loop={args.loop} "
          f"ideal wall={ideal:.2f}s cores={os.cpu_count()}")
    print(f"{'candidate':<10}{'wall s':>9}{'req/s':>9}{'effic.':>8}{'cpu ms/req':>12}"
          f"{'peak MB':>9}{'x openai':>10}")
    try:
        for name in args.candidates.split(","):
            cmd = [sys.executable, __file__, "--worker", name, "--url", server.base_url,
                   "-n", str(args.n), "-c", str(args.concurrency), "--loop", args.loop]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{name:<10} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            _print_row(name, rows[name], args, ideal, rows.get("openai"))
        if "openai" in rows and "gra" in rows:
            print()
            print("ratios vs baseline (openai):")
            for name, row in rows.items():
                _print_row(name, row, args, ideal, rows["openai"])
    finally:
        server.close()


def _print_row(name: str, row: dict[str, float], args: argparse.Namespace, ideal: float,
               baseline: dict[str, float] | None) -> None:
    rps = args.n / row["wall"]
    efficiency = ideal / row["wall"] if ideal else float("nan")
    speedup = f"{baseline['wall'] / row['wall']:.2f}x" if baseline else "-"
    print(f"{name:<10}{row['wall']:>9.2f}{rps:>9.0f}{efficiency:>8.2f}"
          f"{1000 * row['cpu'] / args.n:>12.2f}{row['rss_mb']:>9.0f}{speedup:>10}")


if __name__ == "__main__":
    main()
