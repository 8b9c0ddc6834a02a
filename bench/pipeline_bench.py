"""Pipeline benchmark: do the steps' dependencies leave the call slots idle?

    python bench/pipeline_bench.py                    # ~5,000 calls, L=0.5±0.1 s, C=500
    python bench/pipeline_bench.py --no-journal-disk  # the journal on a RAM disk (/dev/shm)
    python bench/pipeline_bench.py --metrics          # /metrics served and scraped every second
    python bench/pipeline_bench.py --scale            # C=10,000, L=8±2 s, 30,000 accepted
    python bench/pipeline_bench.py --scale --replicas 16   # the same over 16 endpoints per model
    python bench/pipeline_bench.py --latency 0 --jitter 0 --target 3000 --baseline  # CPU per call
    python bench/pipeline_bench.py --flags            # the same run as a new user types it

One full `run` (generate -> 2 reviews -> sometimes the adjudicator) against the fake
server. Efficiency = (model calls * L / C) / wall, where wall is the pipeline's own run
time until the journal has committed it all (start-up and the endpoint probe excluded).
Prints peak RSS, CPU per call over that wall (this process: the orchestrator, the
journal's writer, the display off; and, beside it, with start-up and shut-down counted),
the event loop's lag (how late a 50 ms timer fires: what every reply waits on top of its
latency) and the garbage collector's passes (timed with gc.callbacks, under the run's own
settings: `_resources.collector_for_run`). `--baseline` then sends as many calls at the
same concurrency through a bare AsyncOpenAI + semaphore loop (bench/client_bench.py's
`openai` candidate, in its own process) against the same server, and prints the ratio
of requests per second. `--flags` runs `python -m gra_async run` instead, from a directory outside the
checkout, with `--concurrency` and four `--endpoint` flags and nothing else; its pipeline
time is read from the journal (first call sent to last reply), and the command's whole
wall time is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gra_async._concurrency import run_coroutine
from gra_async.config import load_config
from gra_async.defaults import CRITERIA
from gra_async.metrics import MetricsServer
from gra_async.runner import Run, open_run
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


async def _lag(samples: list[float], period: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period
        await asyncio.sleep(period)
        samples.append(loop.time() - due)


async def _windows(run: Run, trace: list[str], period: float = 2.0) -> None:
    """Every `period` s: each endpoint's window and calls in flight (`--trace`)."""
    started = time.perf_counter()
    while True:
        await asyncio.sleep(period)
        cells = " ".join(f"{s.model}:{s.window:.0f}/{s.in_flight}" for s in run.stats())
        trace.append(f"{time.perf_counter() - started:6.1f}s {cells}")


async def bench(
    run_dir: Path, urls: list[str], target: int, concurrency: int, metrics: bool = False,
    lags: list[float] | None = None, replicas: int = 1, fixed: bool = False,
    trace: list[str] | None = None,
) -> tuple[float, float, int, list[float]]:
    # `replicas` endpoints per model, as a fleet behind one orchestrator would be: one fake
    # server process per replica (endpoints with the same URL and model are one endpoint).
    cap = max(1, concurrency // replicas)

    def fleet(model: str) -> list[dict[str, object]]:
        return [{"base_url": url, "model": model, "max_concurrency": cap,
                 "adaptive": not fixed} for url in urls]

    endpoints = {
        "generator": fleet("gen-a"),
        "reviewer": fleet("rev-b") + fleet("rev-c"),
        "adjudicator": fleet("adj-d"),
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
        lag = asyncio.create_task(_lag(lags)) if lags is not None else None
        watch = asyncio.create_task(_windows(run, trace)) if trace is not None else None
        try:
            started, cpu_started = time.perf_counter(), time.process_time()
            await run.pipeline.run()
            ended = time.perf_counter()
            backlog = run.journal.queued - run.journal.committed
            # A run is done when its journal holds it: the writer's backlog counts.
            await run.journal.flush()
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            drained = wall - (ended - started)
        finally:
            for task in (lag, watch):
                if task is not None:
                    task.cancel()
            stop.set()
            if scraper is not None:
                scraper.join()
            if server is not None:
                server.close()
        calls = run.pipeline.progress.calls_sent
    print(f"journal: {backlog} writes not yet committed when the last task ended, "
          f"committed {drained:.2f} s later (counted in wall)")
    return wall, cpu, calls, scrapes


class _CollectorClock:
    """The garbage collector's passes while it is entered, timed with gc.callbacks."""

    def __init__(self) -> None:
        self.passes = 0
        self.total = self.longest = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.passes += 1
        self.total += pause
        self.longest = max(self.longest, pause)

    def __enter__(self) -> None:
        gc.callbacks.append(self._callback)

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


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
    parser.add_argument("--scale", action="store_true",
                        help="the fleet scenario: C=10,000, L=8±2 s, target 30,000")
    parser.add_argument("--replicas", type=int, default=1,
                        help="endpoints per model (a fleet), each capped at C / replicas")
    parser.add_argument("--fixed", action="store_true",
                        help="adaptive = false on every endpoint: windows stay at their caps")
    parser.add_argument("--trace", action="store_true",
                        help="print each endpoint's window / calls in flight every 2 s")
    parser.add_argument("--baseline", action="store_true",
                        help="then as many calls through bare AsyncOpenAI + a semaphore")
    parser.add_argument("--flags", action="store_true",
                        help="the CLI with --concurrency and --endpoint flags only (no config)")
    args = parser.parse_args()
    if args.scale:
        args.concurrency, args.latency, args.jitter, args.target = 10_000, 8.0, 2.0, 30_000
    _raise_fd_limit()
    # rev-c scores at random (the server's default): agreement, rejection and the
    # adjudicator all occur, as in a real run.
    servers = [FakeServerProcess.start(
        models=[*MODELS, "bench-model"], latency=args.latency, jitter=args.jitter, seed=i,
        rules=[{"model": "rev-b", "content": review(9)},
               {"model": "adj-d", "content": json.dumps({"decision": "accept", "reason": "ok"})}])
        for i in range(args.replicas)]
    server = servers[0]
    base = "/dev/shm" if args.no_journal_disk else None
    run_dir = Path(tempfile.mkdtemp(prefix="gra-bench-", dir=base))
    lags: list[float] = []
    trace: list[str] | None = [] if args.trace else None
    if args.flags:
        try:
            _flags_run(server.base_url, run_dir, args)
        finally:
            for each in servers:
                each.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    collector = _CollectorClock()
    process_cpu = time.process_time()
    try:
        job = bench(run_dir, [s.base_url for s in servers], args.target, args.concurrency,
                    args.metrics, lags, args.replicas, args.fixed, trace)
        with collector:
            wall, cpu, calls, scrapes = run_coroutine(job)
        process_cpu = time.process_time() - process_cpu
        baseline = _baseline(server.base_url, calls, args.concurrency) if args.baseline else None
    finally:
        for each in servers:
            each.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    for line in trace or ():
        print(line)
    ideal = calls * args.latency / args.concurrency
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pipeline: target={args.target} C={args.concurrency} L={args.latency}±{args.jitter}s "
          f"journal={'RAM' if args.no_journal_disk else 'disk'} cores={os.cpu_count()} "
          f"metrics={'scraped every 1 s' if args.metrics else 'off'} "
          f"windows={'fixed' if args.fixed else 'adaptive'}")
    print(f"calls={calls} wall={wall:.2f}s ideal={ideal:.2f}s efficiency={ideal / wall:.2f} "
          f"calls/s={calls / wall:.0f} peak RSS={rss:.0f} MB")
    lags.sort()
    print(f"CPU per call={cpu / calls * 1e3:.3f} ms over the wall above (this process: the "
          f"orchestrator and the journal's writer; {process_cpu / calls * 1e3:.3f} ms with start-up "
          "and shut-down)")
    print(f"event loop lag p50={statistics.median(lags) * 1e3:.1f} ms "
          f"p99={lags[int(len(lags) * 0.99)] * 1e3:.1f} ms max={lags[-1] * 1e3:.1f} ms")
    print(f"garbage collector: {collector.passes} passes, {collector.total:.2f} s "
          f"(start-up and shut-down counted), longest pause {collector.longest * 1e3:.0f} ms")
    if baseline is not None:
        print(f"baseline (AsyncOpenAI + semaphore, same server, C, calls): wall={baseline['wall']:.2f}s "
              f"calls/s={calls / baseline['wall']:.0f} CPU per call={baseline['cpu'] / calls * 1e3:.3f} ms "
              f"peak RSS={baseline['rss_mb']:.0f} MB -> pipeline/baseline calls/s = "
              f"{baseline['wall'] / wall:.2f}")
    if scrapes:
        print(f"scrapes={len(scrapes)} scrape time max={max(scrapes) * 1e3:.0f} ms "
              f"mean={sum(scrapes) / len(scrapes) * 1e3:.0f} ms")


def _flags_run(url: str, run_dir: Path, args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "gra_async", "run", "--run-dir", str(run_dir / "run"),
               "--target", str(args.target), "--concurrency", str(args.concurrency)]
    for role, model in (("generator", "gen-a"), ("reviewer", "rev-b"), ("reviewer", "rev-c"),
                        ("adjudicator", "adj-d")):
        command += ["--endpoint", f"{role}={model}@{url}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"run exited {done.returncode}: {done.stderr.strip()[-500:]}")
    with sqlite3.connect(run_dir / "run" / "journal.sqlite") as conn:
        calls, first, last = conn.execute(
            "SELECT count(*), min(created - latency), max(created) FROM calls").fetchone()
    span = last - first
    ideal = calls * args.latency / args.concurrency
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"flags only: target={args.target} C={args.concurrency} L={args.latency}±{args.jitter}s "
          f"cores={os.cpu_count()} (python -m gra_async run, 4 --endpoint flags, no config)")
    print(f"calls={calls} pipeline={span:.2f}s ideal={ideal:.2f}s efficiency={ideal / span:.2f} "
          f"| whole command {wall:.2f}s (start-up, probes, exit): {ideal / wall:.2f} "
          f"| CPU per call={cpu / calls * 1e3:.3f} ms peak RSS={after.ru_maxrss / 1024:.0f} MB")


def _raise_fd_limit() -> None:
    # The fake server is a child: it inherits the raised limit too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _baseline(url: str, calls: int, concurrency: int) -> dict[str, float]:
    script = Path(__file__).with_name("client_bench.py")
    out = subprocess.run([sys.executable, str(script), "--worker", "openai", "--url", url,
                          "-n", str(calls), "-c", str(concurrency)],
                         capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    main()
