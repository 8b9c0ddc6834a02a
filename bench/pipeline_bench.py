"""Pipeline benchmark: do the steps' dependencies leave the call slots idle?

    python bench/pipeline_bench.py                    # ~5,000 calls, L=0.5±0.1 s, C=500
    python bench/pipeline_bench.py --no-journal-disk  # the journal on a RAM disk (/dev/shm)
    python bench/pipeline_bench.py --metrics          # /metrics served and scraped every second

One full `run` (generate -> 2 reviews -> sometimes the adjudicator) against the fake
server. Efficiency = (model calls * L / C) / wall, where wall is the pipeline's own run
time (start-up and the endpoint probe excluded). Prints peak RSS too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gra_async.config import load_config
from gra_async.defaults import CRITERIA
from gra_async.metrics import MetricsServer
from gra_async.runner import open_run
from gra_async.testing.fake_server import FakeServerProcess

MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")


def review(score: int) -> str:
    return json.dumps({"scores": dict.fromkeys(CRITERIA, score), "feedback": "ok"})


def _scrape_every(url: str, period: float, stop: threading.Event, scrapes: list[float]) -> None:
    """A Prometheus scraping 15x more often than its default 15 s, timing each scrape."""
    while not stop.wait(period):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        scrapes.append(time.perf_counter() - started)


async def bench(
    run_dir: Path, url: str, target: int, concurrency: int, metrics: bool = False,
) -> tuple[float, int, list[float]]:
    endpoints = {
        "generator": [{"base_url": url, "model": "gen-a", "max_concurrency": concurrency}],
        "reviewer": [{"base_url": url, "model": m, "max_concurrency": concurrency}
                     for m in ("rev-b", "rev-c")],
        "adjudicator": [{"base_url": url, "model": "adj-d", "max_concurrency": concurrency}],
    }
    config = load_config(None, environ={}, overrides={
        "run": {"run_dir": run_dir, "target": target, "concurrency": concurrency,
                "max_in_flight": concurrency},
        "endpoints": endpoints,
    })
    scrapes: list[float] = []
    async with open_run(config) as run:
        server = MetricsServer(run, "127.0.0.1", 0) if metrics else None
        stop = threading.Event()
        scraper = None
        if server is not None:
            scraper = threading.Thread(target=_scrape_every, args=(server.url, 1.0, stop, scrapes))
            scraper.start()
        try:
            started = time.perf_counter()
            await run.pipeline.run()
            wall = time.perf_counter() - started
        finally:
            stop.set()
            if scraper is not None:
                scraper.join()
            if server is not None:
                server.close()
        calls = run.pipeline.progress.calls_sent
    return wall, calls, scrapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=1500, help="accepted samples (~3.3 calls each)")
    parser.add_argument("-c", "--concurrency", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--no-journal-disk", action="store_true",
                        help="put the run directory on /dev/shm (RAM) to price the journal's disk writes")
    parser.add_argument("--metrics", action="store_true",
                        help="serve /metrics (gra_async.metrics) and scrape it every second")
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    # rev-c scores at random (the server's default): agreement, rejection and the
    # adjudicator all occur, as in a real run.
    server = FakeServerProcess.start(models=list(MODELS), latency=args.latency, jitter=args.jitter,
                                     rules=[{"model": "rev-b", "content": review(9)},
                                            {"model": "adj-d", "content": json.dumps(
                                                {"decision": "accept", "reason": "ok"})}])
    base = "/dev/shm" if args.no_journal_disk else None
    run_dir = Path(tempfile.mkdtemp(prefix="gra-bench-", dir=base))
    try:
        wall, calls, scrapes = runner(bench(run_dir, server.base_url, args.target,
                                            args.concurrency, args.metrics))
    finally:
        server.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    ideal = calls * args.latency / args.concurrency
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pipeline: target={args.target} C={args.concurrency} L={args.latency}±{args.jitter}s "
          f"journal={'RAM' if args.no_journal_disk else 'disk'} cores={os.cpu_count()} "
          f"metrics={'scraped every 1 s' if args.metrics else 'off'}")
    print(f"calls={calls} wall={wall:.2f}s ideal={ideal:.2f}s efficiency={ideal / wall:.2f} "
          f"calls/s={calls / wall:.0f} peak RSS={rss:.0f} MB")
    if scrapes:
        print(f"scrapes={len(scrapes)} scrape time max={max(scrapes) * 1e3:.0f} ms "
              f"mean={sum(scrapes) / len(scrapes) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
