"""The Python front door: `Synthesizer` runs a GRA synthesis, `run` is its synchronous form.

    async with Synthesizer(config, filters=[...], gate=...) as synth:
        summary = await synth.run()

A run is resumable whatever ends it: run the same config on the same run directory again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from gra_async._concurrency import run_coroutine
from gra_async.client import EndpointStats, Transport
from gra_async.config import RunConfig
from gra_async.errors import UsageError
from gra_async.pipeline import Filter, Gate, Progress
from gra_async.runner import Run, open_run
from gra_async.store import JournalReader

if TYPE_CHECKING:
    from gra_async.metrics import MetricsServer

__all__ = ["RunSummary", "StopReason", "Synthesizer", "TokenUsage", "run"]

# target: the target was reached. plan_exhausted: every planned task finished short of it.
# all_failed: every task this session ran failed. stopped: stop() or a signal ended it early.
# budget: the next call could have taken the spend past `run.max_cost`.
StopReason = Literal["target", "plan_exhausted", "all_failed", "stopped", "budget"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one model spent in one role this session."""

    role: str
    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class RunSummary:
    """How a run ended. Counts are the run directory's totals (earlier sessions included);
    calls, tokens and cost are this session's."""

    run_dir: Path
    target: int
    accepted: int
    rejected: int  # duplicates and filtered drafts included
    failed: int
    duplicates: int
    filtered: int
    adjudicated: int
    calls: int  # sent this session
    calls_reused: int  # answered from the journal (resume)
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # at the configured prices; None when no price is set
    stop_reason: StopReason
    reached_target: bool
    elapsed: float  # seconds
    usage: tuple[TokenUsage, ...] = ()
    rejections: Mapping[str, int] = field(default_factory=dict)  # run totals by decision
    failures: Mapping[str, int] = field(default_factory=dict)  # this session's, by kind
    budget: float | None = None  # `run.max_cost`
    spent: float | None = None  # the run's spend, earlier sessions included; None: no price set

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def explain(self) -> str:
        """One line saying how the run ended and, short of the target, why."""
        got = f"{self.accepted} of {self.target} accepted"
        if self.stop_reason == "target":
            return f"target reached: {got}"
        if self.stop_reason == "budget":
            return (f"budget reached: spent ${self.spent or 0.0:.4f} of the ${self.budget or 0.0:.4f} "
                    f"budget; {got}; rerun with a higher --max-cost to continue")
        if self.stop_reason == "stopped":
            return f"stopped: {got}; run the same command again to resume"
        if self.stop_reason == "all_failed":
            kind, n = next(iter(self.failures.items()), ("?", self.failed))
            return (f"every task failed: {got}; most often ({n}x): {kind} "
                    "(see status for every reason)")
        reasons = ", ".join(f"{name} x{n}" for name, n in self.rejections.items()) or "none"
        return (f"plan exhausted: {got}; rejected: {reasons} (raise --max-tasks to plan "
                "more tasks, or see status for the reasons)")


class Synthesizer:
    """One GRA run: generator, review panel, gate, adjudicator, dedup, journal.

    `filters` are callables `(draft) -> str | None`, sync or async, that see each generated
    draft (`gra_async.Draft`) before any review is paid for: a string rejects the draft with
    that reason. `gate` replaces the decision rule: `(panel, gate_config)` returns
    "accept", "reject" or "adjudicate" (sync or async); without an adjudicator for a task,
    "adjudicate" falls back to the panel mean. An exception raised by either stops the run.
    `force` continues a run directory made with another config; `retry_failed` plans again
    the failed tasks whose endpoint failed them (journals of versions that failed those).
    `transport` replaces the HTTP stack (`gra_async.client.Transport`: `request` and
    `aclose`); the caller closes it.
    """

    _refine = False  # `gra_async.Refiner`: the seeds are the samples (refining.py)

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any],
        *,
        filters: Sequence[Filter] = (),
        gate: Gate | None = None,
        force: bool = False,
        retry_failed: bool = False,
        transport: Transport | None = None,
    ) -> None:
        self.config = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
        self._filters = tuple(filters)
        self._gate = gate
        self._force = force
        self._retry_failed = retry_failed
        self._transport = transport
        self._stack: contextlib.AsyncExitStack | None = None
        self._run: Run | None = None
        self._ran = False
        self._pending_stop: float | None = None
        self._metrics: MetricsServer | None = None

    async def __aenter__(self) -> Synthesizer:
        if self._stack is not None:
            raise UsageError("this Synthesizer is open already")
        stack = contextlib.AsyncExitStack()
        try:
            self._run = await stack.enter_async_context(open_run(
                self.config, force=self._force, filters=self._filters, gate=self._gate,
                retry_failed=self._retry_failed, transport=self._transport,
                refine=self._refine))
            settings = self.config.run
            if settings.metrics_port is not None:
                from gra_async.metrics import MetricsServer

                self._metrics = MetricsServer(self._run, settings.metrics_host, settings.metrics_port)
                stack.callback(self._close_metrics)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @property
    def live_config(self) -> RunConfig:
        """The config the run uses: with the embedded default's endpoints, when it is used."""
        return self._opened().config

    def _close_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()

    @property
    def metrics_url(self) -> str | None:
        """Where Prometheus scrapes this run (`run.metrics_port`), or None without metrics."""
        return None if self._metrics is None else self._metrics.url

    @property
    def progress(self) -> Progress:
        return self._opened().pipeline.progress

    def endpoint_stats(self) -> list[EndpointStats]:
        return self._opened().stats()

    def stop(self, grace: float | None = None) -> None:
        """Stop admitting tasks; calls in flight get `grace` seconds (default `run.grace`)."""
        if self._run is None:
            self._pending_stop = self.config.run.grace if grace is None else grace
        else:
            self._run.pipeline.stop(grace)

    def abandon(self) -> None:
        """Cancel the calls in flight now; their tasks go back to `planned`."""
        if self._run is not None:
            self._run.pipeline.abandon()
        else:
            self._pending_stop = 0.0

    async def run(self) -> RunSummary:
        """Run to the target (or until stopped) and say how it ended; resumable either way."""
        if self._stack is None:
            async with self:
                return await self.run()
        if self._ran:
            raise UsageError("a Synthesizer runs once; make a new one to resume the run")
        self._ran = True
        run = self._opened()
        if self._pending_stop is not None:
            run.pipeline.stop(self._pending_stop)
        started = time.monotonic()
        progress = await run.pipeline.run()
        await run.journal.flush()
        return _summary(run, progress, time.monotonic() - started)

    def _opened(self) -> Run:
        if self._run is None:
            raise UsageError("open the Synthesizer first: `async with Synthesizer(config) as s:`")
        return self._run


def _summary(run: Run, progress: Progress, elapsed: float) -> RunSummary:
    target = run.config.run.target
    session_finished = progress.finished - progress.finished_at_start
    session_failed = progress.failed - progress.failed_at_start
    reason: StopReason
    budget = run.pipeline.budget
    if progress.accepted >= target:
        reason = "target"
    elif budget.reached:
        reason = "budget"
    elif run.pipeline.stopping:
        reason = "stopped"
    elif session_finished > 0 and session_failed == session_finished:
        reason = "all_failed"
    else:
        reason = "plan_exhausted"
    reader = JournalReader(run.config.run.run_dir)
    try:
        rejections = {str(d): n for d, n in sorted(reader.body_counts("rejected", "decision"),
                                                   key=lambda row: -row[1])}
    finally:
        reader.close()
    usage = tuple(
        TokenUsage(role, model, progress.tokens[(role, model, "in")],
                   progress.tokens[(role, model, "out")])
        for role, model in sorted({(role, model) for role, model, _ in progress.tokens}))
    return RunSummary(
        run_dir=run.config.run.run_dir,
        target=target,
        accepted=progress.accepted,
        rejected=progress.rejected,
        failed=progress.failed,
        duplicates=progress.duplicates,
        filtered=progress.filtered,
        adjudicated=progress.adjudicated,
        calls=progress.calls_sent,
        calls_reused=progress.calls_reused,
        prompt_tokens=sum(u.prompt_tokens for u in usage),
        completion_tokens=sum(u.completion_tokens for u in usage),
        cost=progress.cost(),
        stop_reason=reason,
        reached_target=reason == "target",
        elapsed=elapsed,
        usage=usage,
        rejections=rejections,
        failures=dict(progress.failures.most_common()),
        budget=budget.limit,
        spent=budget.spent if any(p_in or p_out for p_in, p_out in run.team.prices.values())
        else None,
    )


def run(config: RunConfig | Mapping[str, Any], **kwargs: Any) -> RunSummary:
    """`Synthesizer(config, **kwargs).run()` for scripts: blocks until the run ends.

    Inside a running event loop (Jupyter, async code) raises `UsageError`: await
    `Synthesizer(config).run()` there instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise UsageError("gra_async.run() cannot block inside a running event loop (Jupyter, "
                         "async code); use `summary = await gra_async.Synthesizer(config).run()`")
    return run_coroutine(Synthesizer(config, **kwargs).run())
