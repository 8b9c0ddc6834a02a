"""Load bounds (issue 7): rate-limit fidelity, peak memory at scale, no leaks across runs.

    python bench/load_bench.py                 # all three parts (~3-4 min on 2 cores)
    python bench/load_bench.py rate --seconds 90 --rpm 1200
    python bench/load_bench.py memory --tasks 10000 -c 1000 --latency 0.2
    python bench/load_bench.py leaks --runs 3

rate    The fake server enforces `rpm` over a sliding 60 s window and answers 429 beyond it;
        one `EndpointPool` endpoint is configured with the same `rpm` and driven by far more
        workers than the limit needs for `--seconds`. Prints the achieved rate (over the
        whole run and over its last full 60 s window) as a fraction of the limit, and the
        fraction of attempts the server answered 429. Targets: >= 95 %, <= 1 %.
memory  `python -m gra_async run` as a subprocess: `--tasks` tasks (all accepted: the reviewers
        score 9, so 3 calls a task) at `--concurrency` calls in flight, against a fake server
        with `--latency`. Peak RSS of that process from os.wait4 (ru_maxrss) and from polling
        /proc/PID/status. Target: < 300 MB for 10,000 tasks at C=1000.
leaks   In this process: open file descriptors (/proc/self/fd), asyncio tasks and threads
        before a run and after each of `--runs` runs (`gra_async.runner.open_run`, the CLI's
        own assembly), against a server injecting 5xx, resets, hangs and malformed bodies,
        so the error paths are exercised too. Equal counts after each run: no leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gra_async.defaults import CRITERIA
from gra_async.testing.fake_server import FakeServerProcess

MODELS = ("gen-a", "rev-b", "rev-c", "adj-d")
REVIEW = json.dumps({"scores": dict.fromkeys(CRITERIA, 9), "feedback": "ok"})
SCORE_RULES = [{"contains": "Score the sample", "content": REVIEW}]
Row = tuple[str, str, str, str]  # part, figure, value, target
T = TypeVar("T")


# --- (a) rate -------------------------------------------------------------------------------


@dataclass
class RateResult:
    seconds: float
    limit_rpm: int
    ok: int
    ok_last_window: int
    attempts: int
    rejected_429: int

    @property
    def achieved_rpm(self) -> float:
        return 60.0 * self.ok / self.seconds

    @property
    def last_window_rpm(self) -> float:
        return float(self.ok_last_window)

    @property
    def fraction_429(self) -> float:
        return self.rejected_429 / self.attempts if self.attempts else 0.0


async def _drive_rate(
    url: str, rpm: int, seconds: float, workers: int, limiter: str
) -> tuple[int, list[float]]:
    from aiolimiter import AsyncLimiter

    from gra_async.client import AiohttpTransport, ChatRequest, Endpoint, EndpointPool
    from gra_async.config import EndpointConfig

    transport = AiohttpTransport()
    config = EndpointConfig(base_url=url, model=MODELS[0], rpm=rpm, max_concurrency=workers)
    endpoint = Endpoint(config, transport)
    if limiter == "paced":
        # What-if, not the shipped client: one request every 60/rpm s, no burst allowance.
        endpoint._rpm = AsyncLimiter(1, 60.0 / rpm)
    elif limiter == "per-second":
        # What-if: a bucket of one second's budget instead of one minute's.
        endpoint._rpm = AsyncLimiter(rpm / 60.0, 1.0)
    pool = EndpointPool([endpoint])
    request = ChatRequest(messages=[{"role": "user", "content": "Name a prime number."}],
                          max_tokens=16)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + seconds
    done: list[float] = []

    async def worker() -> None:
        while loop.time() < stop_at:
            await pool.chat(request)
            if loop.time() <= stop_at:
                done.append(loop.time() - started)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await transport.aclose()
    return len(done), done


def bench_rate(
    rpm: int, seconds: float, latency: float, workers: int, limiter: str = "shipped"
) -> RateResult:
    server = FakeServerProcess.start(models=list(MODELS), latency=latency, rpm=rpm)
    try:
        _, stamps = asyncio.run(_drive_rate(server.base_url, rpm, seconds, workers, limiter))
        stats = server.stats()
    finally:
        server.close()
    window_start = max(seconds - 60.0, 0.0)
    return RateResult(
        seconds=seconds,
        limit_rpm=rpm,
        ok=len(stamps),
        ok_last_window=sum(1 for t in stamps if t >= window_start),
        attempts=int(stats["chat_requests"]),
        rejected_429=int(stats["status"].get("429", 0)),
    )


# --- (b) memory -----------------------------------------------------------------------------


@dataclass
class MemoryResult:
    tasks: int
    concurrency: int
    wall: float
    exit_code: int
    accepted: int
    calls: int
    peak_rss_mb: float  # ru_maxrss from wait4
    polled_peak_mb: float  # VmHWM / VmRSS polled from /proc
    server_peak_in_flight: int


def _write_config(path: Path, url: str, concurrency: int, tasks: int) -> None:
    lines = ["[run]", f"max_tasks = {tasks}"]
    for role, model in (("generator", "gen-a"), ("reviewer", "rev-b"), ("reviewer", "rev-c"),
                        ("adjudicator", "adj-d")):
        lines += [f"[[endpoints.{role}]]", f'base_url = "{url}"', f'model = "{model}"',
                  f"max_concurrency = {concurrency}"]
    path.write_text("\n".join(lines) + "\n")


def _poll_rss(pid: int, peak: list[float], stop: threading.Event) -> None:
    status = Path(f"/proc/{pid}/status")
    while not stop.wait(0.2):
        try:
            text = status.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                peak[0] = max(peak[0], int(line.split()[1]) / 1024)


def bench_memory(tasks: int, concurrency: int, latency: float) -> MemoryResult:
    server = FakeServerProcess.start(models=list(MODELS), latency=latency, jitter=latency / 4,
                                     rules=SCORE_RULES)
    with tempfile.TemporaryDirectory(prefix="gra-load-") as tmp:
        config = Path(tmp) / "gra.toml"
        _write_config(config, server.base_url, concurrency, tasks)
        run_dir = Path(tmp) / "run"
        argv = [sys.executable, "-m", "gra_async", "run", "--config", str(config),
                "--run-dir", str(run_dir), "--target", str(tasks),
                "--concurrency", str(concurrency)]
        try:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            peak = [0.0]
            stop = threading.Event()
            poller = threading.Thread(target=_poll_rss, args=(proc.pid, peak, stop), daemon=True)
            poller.start()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - started
            stop.set()
            poller.join()
            err = proc.stderr.read().decode() if proc.stderr else ""
            if proc.returncode != 0:
                print(f"memory run exited {proc.returncode}: {err.strip()[-500:]}")
            report = json.loads(subprocess.run(
                [sys.executable, "-m", "gra_async", "status", "--run-dir", str(run_dir), "--json"],
                capture_output=True, text=True, check=True).stdout)
            in_flight_peak = int(server.stats()["in_flight_peak"])
        finally:
            server.close()
    return MemoryResult(
        tasks=tasks, concurrency=concurrency, wall=wall, exit_code=proc.returncode,
        accepted=int(report["accepted"]), calls=int(report["calls"]),
        peak_rss_mb=usage.ru_maxrss / 1024, polled_peak_mb=peak[0],
        server_peak_in_flight=in_flight_peak,
    )


# --- (c) leaks ------------------------------------------------------------------------------


@dataclass
class Census:
    label: str
    fds: int
    tasks: int
    threads: int
    accepted: int


def _census(label: str, accepted: int = 0) -> Census:
    return Census(label, len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks()),
                  threading.active_count(), accepted)


async def _leak_runs(url: str, runs: int, target: int, root: Path) -> list[Census]:
    import gc

    from gra_async.config import RunConfig, load_config
    from gra_async.runner import open_run

    def config(run_dir: Path, goal: int) -> RunConfig:
        endpoints = {
            "generator": [{"base_url": url, "model": "gen-a", "read_timeout": 1.0}],
            "reviewer": [{"base_url": url, "model": m, "read_timeout": 1.0}
                         for m in ("rev-b", "rev-c")],
            "adjudicator": [{"base_url": url, "model": "adj-d", "read_timeout": 1.0}],
        }
        return load_config(None, environ={}, overrides={
            "run": {"run_dir": run_dir, "target": goal, "concurrency": 64},
            "endpoints": endpoints,
        })

    peak = Census("peak during runs", 0, 0, 0, 0)

    async def sample() -> None:
        while True:
            now = _census("")
            peak.fds, peak.tasks = max(peak.fds, now.fds), max(peak.tasks, now.tasks - 1)
            peak.threads = max(peak.threads, now.threads)
            await asyncio.sleep(0.02)

    async def one(run_dir: Path, goal: int) -> int:
        sampler = asyncio.create_task(sample())
        try:
            async with open_run(config(run_dir, goal)) as run:
                await run.pipeline.run()
                return run.pipeline.progress.accepted
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    # A warm-up run loads every lazy import and module-level cache before counting starts.
    await one(root / "warm-up", 5)
    gc.collect()
    rows = [_census("before")]
    for i in range(runs):
        # Alternate new run directories and resumes of the first one (higher target).
        run_dir = root / ("resumed" if i % 2 == 0 else f"fresh-{i}")
        accepted = await one(run_dir, target * (i // 2 + 1))
        await asyncio.sleep(0.2)  # let closed transports finish their callbacks
        gc.collect()
        rows.append(_census(f"after run {i + 1}", accepted))
    return [*rows, peak]


def bench_leaks(runs: int, target: int) -> list[Census]:
    server = FakeServerProcess.start(models=list(MODELS), latency=0.01, rules=SCORE_RULES,
                                     error_rate=0.05, reset_rate=0.01, hang_rate=0.005,
                                     malformed_rate=0.01, seed=1)
    try:
        with tempfile.TemporaryDirectory(prefix="gra-leaks-") as tmp:
            return _asyncio_run(lambda: _leak_runs(server.base_url, runs, target, Path(tmp)))
    finally:
        server.close()


def _asyncio_run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """uvloop when installed, as the CLI runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(factory())
    result: T = uvloop.run(factory())
    return result


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="rate|memory|leaks",
                        help="which parts to run (default: all three)")
    parser.add_argument("--rpm", type=int, default=1200, help="server limit = configured rpm")
    parser.add_argument("--seconds", type=float, default=90.0, help="rate: how long to drive")
    parser.add_argument("--rate-workers", type=int, default=64)
    parser.add_argument("--rate-latency", type=float, default=0.05)
    parser.add_argument("--limiter", choices=["shipped", "paced", "per-second"],
                        default="shipped",
                        help="rate: the client's own limiter (a bucket of a minute's budget), "
                             "or what-ifs: one request per 60/rpm s, or a bucket of one "
                             "second's budget")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--leak-target", type=int, default=60)
    args = parser.parse_args()
    args.parts = args.parts or ["rate", "memory", "leaks"]
    if unknown := set(args.parts) - {"rate", "memory", "leaks"}:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    rows: list[Row] = []
    print(f"cores={os.cpu_count()} python={sys.version.split()[0]}")
    if "rate" in args.parts:
        r = bench_rate(args.rpm, args.seconds, args.rate_latency, args.rate_workers,
                       args.limiter)
        print(f"rate: {r.ok} ok in {r.seconds:.0f} s, {r.ok_last_window} in the last 60 s; "
              f"{r.rejected_429} of {r.attempts} attempts answered 429")
        if args.limiter != "shipped":
            print(f"rate: limiter {args.limiter!r} (what-if, not the shipped client)")
        rows += [
            ("rate", f"achieved, whole {r.seconds:.0f} s run (req/min)",
             f"{r.achieved_rpm:.0f} = {100 * r.achieved_rpm / r.limit_rpm:.1f}% of {r.limit_rpm}",
             ">= 95%"),
            ("rate", "achieved, last full 60 s window (req/min)",
             f"{r.last_window_rpm:.0f} = {100 * r.last_window_rpm / r.limit_rpm:.1f}%", ">= 95%"),
            ("rate", "attempts answered 429",
             f"{r.rejected_429}/{r.attempts} = {100 * r.fraction_429:.2f}%", "<= 1%"),
        ]
    if "memory" in args.parts:
        m = bench_memory(args.tasks, args.concurrency, args.latency)
        print(f"memory: exit {m.exit_code}, {m.accepted} accepted, {m.calls} calls in "
              f"{m.wall:.1f} s ({m.calls / m.wall:.0f} calls/s), server saw up to "
              f"{m.server_peak_in_flight} in flight")
        rows += [
            ("memory", f"peak RSS, {m.tasks} tasks C={m.concurrency} (wait4)",
             f"{m.peak_rss_mb:.0f} MB", "< 300 MB"),
            ("memory", "peak RSS (polled VmHWM)", f"{m.polled_peak_mb:.0f} MB", "< 300 MB"),
            ("memory", "wall / calls per second", f"{m.wall:.1f} s / {m.calls / m.wall:.0f}", "-"),
        ]
    if "leaks" in args.parts:
        census = bench_leaks(args.runs, args.leak_target)
        print(f"{'leaks':<18}{'fds':>6}{'tasks':>7}{'threads':>9}{'accepted':>10}")
        for c in census:
            print(f"{c.label:<18}{c.fds:>6}{c.tasks:>7}{c.threads:>9}{c.accepted:>10}")
        first, last = census[0], census[-2]
        rows += [
            ("leaks", "open fds before -> after last run", f"{first.fds} -> {last.fds}", "equal"),
            ("leaks", "asyncio tasks before -> after", f"{first.tasks} -> {last.tasks}", "equal"),
            ("leaks", "threads before -> after", f"{first.threads} -> {last.threads}", "equal"),
        ]
    print()
    widths = [max(len(r[i]) for r in [("part", "figure", "value", "target"), *rows])
              for i in range(4)]
    for row in [("part", "figure", "value", "target"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
