"""Prometheus metrics of a running run: `/metrics` in the client library's text format.

Nothing is counted on the hot path for them. A collector reads, at scrape time, what
the run keeps anyway: the journal's calls (committed rows, read incrementally by rowid,
so each call is read once), the endpoints' statistics and the run's progress counters.
It serves from prometheus_client's own HTTP server in a daemon thread: a scrape and its
SQLite read never run on the event loop.

    gra_calls_total{role,model,endpoint,outcome}  ok: journaled calls of the run (as `status`
                                                  counts them); rate_limited, timeout, error:
                                                  failed attempts of this process
    gra_samples_total{decision}                   finished samples of the run by decision
    gra_tokens_total{role,model,direction}        journaled tokens, direction "prompt"|"completion"
    gra_retries_total{endpoint,reason}            retried attempts of this process
    gra_in_flight{endpoint}, gra_concurrency_window{endpoint}
    gra_cost_usd                                  at the configured prices (absent without any)
    gra_call_latency_seconds{endpoint}            histogram of journaled calls' successful attempt
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from gra_async.accounting import token_cost
from gra_async.errors import ConfigError
from gra_async.store import JournalReader

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from gra_async.runner import Run

__all__ = ["LATENCY_BUCKETS", "METRIC_NAMES", "MetricsServer", "RunCollector"]

log = logging.getLogger("gra_async")

# Seconds: from a fake server's milliseconds to a 7B model's long replies on a busy GPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
METRIC_NAMES = ("gra_calls_total", "gra_samples_total", "gra_tokens_total", "gra_retries_total",
                "gra_in_flight", "gra_concurrency_window", "gra_cost_usd",
                "gra_call_latency_seconds")
_BATCH = 20_000  # calls read per query; the first scrape of a resumed run reads them all


@dataclass(slots=True)
class _Latency:
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_BUCKETS) + 1, np.int64))
    total: float = 0.0


class RunCollector(Collector):
    """The metrics of one open run, collected when scraped (any thread)."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._lock = threading.Lock()  # scrapes may overlap; the tallies are cumulative
        self._reader: JournalReader | None = None
        self._last_rowid = 0
        self._calls: Counter[tuple[str, str, str]] = Counter()
        self._tokens: Counter[tuple[str, str, str]] = Counter()
        self._latency: dict[str, _Latency] = defaultdict(_Latency)
        reader = JournalReader(run.config.run.run_dir)
        try:
            # Rejections of earlier sessions by decision; the run's progress adds this one's.
            self._rejected_before = Counter({str(d): n for d, n in
                                             reader.body_counts("rejected", "decision")})
        finally:
            reader.close()

    def _read_calls(self) -> None:
        if self._reader is None:
            self._reader = JournalReader(self._run.config.run.run_dir)
        while rows := self._reader.calls_after(self._last_rowid, _BATCH):
            latencies = np.fromiter((row[6] for row in rows), np.float64, len(rows))
            slots = np.searchsorted(np.asarray(LATENCY_BUCKETS), latencies, side="left")
            for (rowid, role, model, endpoint, t_in, t_out, latency, _), slot in zip(rows, slots, strict=True):
                self._calls[(role, model, endpoint)] += 1
                self._tokens[(role, model, "prompt")] += t_in
                self._tokens[(role, model, "completion")] += t_out
                tally = self._latency[endpoint]
                tally.buckets[slot] += 1
                tally.total += latency
                self._last_rowid = rowid

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._read_calls()
            yield from self._families()

    def _families(self) -> Iterator[Metric]:
        run = self._run
        endpoints = run.team.endpoints()
        calls = CounterMetricFamily("gra_calls", "Model calls by outcome: ok = journaled calls of "
                                    "the run; rate_limited, timeout, error = failed attempts of "
                                    "this process", labels=("role", "model", "endpoint", "outcome"))
        for (role, model, endpoint), n in sorted(self._calls.items()):
            calls.add_metric((role, model, endpoint, "ok"), n)
        retries = CounterMetricFamily("gra_retries", "Retried attempts of this process by reason",
                                      labels=("endpoint", "reason"))
        in_flight = GaugeMetricFamily("gra_in_flight", "Calls in flight now", labels=("endpoint",))
        window = GaugeMetricFamily("gra_concurrency_window", "Adaptive concurrency limit now in "
                                   "force (halved by a 429)", labels=("endpoint",))
        for member, roles in endpoints:
            stats = member.stats()
            role = ",".join(roles)
            other = stats.failed - stats.rate_limited - stats.timeouts
            for outcome, n in (("rate_limited", stats.rate_limited), ("timeout", stats.timeouts),
                               ("error", other)):
                calls.add_metric((role, stats.model, stats.label, outcome), n)
            for reason, n in sorted(dict(member.retry_reasons).items()):
                retries.add_metric((stats.label, reason), n)
            in_flight.add_metric((stats.label,), stats.in_flight)
            window.add_metric((stats.label,), stats.window)
        yield calls
        yield retries
        yield in_flight
        yield window

        progress = run.pipeline.progress
        samples = CounterMetricFamily("gra_samples", "Finished samples of the run by decision",
                                      labels=("decision",))
        rejected = self._rejected_before + Counter(dict(progress.rejections))
        for decision, n in (("accept", progress.accepted), ("failed", progress.failed),
                            *sorted(rejected.items())):
            samples.add_metric((decision,), n)
        yield samples

        tokens = CounterMetricFamily("gra_tokens", "Journaled tokens of the run",
                                     labels=("role", "model", "direction"))
        for key, n in sorted(self._tokens.items()):
            tokens.add_metric(key, n)
        yield tokens
        cost = token_cost({(role, model, "in" if d == "prompt" else "out"): n
                           for (role, model, d), n in self._tokens.items()}, dict(run.team.prices))
        if cost is not None:
            yield GaugeMetricFamily("gra_cost_usd", "Spend of the run at the configured prices",
                                    value=cost)

        latency = HistogramMetricFamily("gra_call_latency_seconds", "Latency of the successful "
                                        "attempt of journaled calls", labels=("endpoint",))
        for endpoint_label, tally in sorted(self._latency.items()):
            cumulative = np.cumsum(tally.buckets)
            buckets = [(f"{bound:g}", int(n)) for bound, n in zip(LATENCY_BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", int(cumulative[-1])))
            latency.add_metric((endpoint_label,), buckets, tally.total)
        yield latency

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


class MetricsServer:
    """`/metrics` of one run on `host:port` (port 0: any free port), until `close()`."""

    def __init__(self, run: Run, host: str, port: int) -> None:
        from prometheus_client import start_wsgi_server

        self.collector = RunCollector(run)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server: WSGIServer
            self._server, self._thread = start_wsgi_server(port, host, registry)
        except OSError as exc:
            self.collector.close()
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} "
                              f"({exc.strerror or exc}); pick another port, or 0 for any free one") from None
        self.host, self.port = host, int(self._server.server_address[1])
        log.info("metrics at %s", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.collector.close()
