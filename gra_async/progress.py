"""What a person watching a run sees: a live rich table on a terminal, log lines elsewhere."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gra_async.client import EndpointStats
from gra_async.pipeline import Progress

if TYPE_CHECKING:
    from gra_async.synthesizer import RunSummary

__all__ = ["ProgressDisplay", "summary_table"]

_LOG_EVERY = 10.0  # seconds between plain log lines when stdout is not a terminal


def _rate(progress: Progress) -> tuple[float, float | None]:
    """Accepted per second so far, and seconds left to the target at that rate."""
    elapsed = max(time.monotonic() - progress.started, 1e-9)
    new = progress.accepted - progress.accepted_at_start
    rate = new / elapsed
    left = progress.target - progress.accepted
    return rate, (left / rate if rate > 0 and left > 0 else None)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def headline(progress: Progress) -> str:
    rate, eta = _rate(progress)
    finished = max(progress.finished - progress.finished_at_start, 1)
    return (
        f"accepted {progress.accepted}/{progress.target}  rejected {progress.rejected} "
        f"(dup {progress.duplicates}, filtered {progress.filtered})  failed {progress.failed}  in progress {progress.in_progress}  "
        f"acceptance {100 * (progress.accepted - progress.accepted_at_start) / finished:.0f}%  "
        f"adjudicated {progress.adjudicated}  calls {progress.calls_sent} "
        f"(+{progress.calls_reused} reused)  {rate:.2f} samples/s  ETA {_eta(eta)}"
    )


def endpoint_table(stats: Sequence[EndpointStats], elapsed: float) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("endpoint", "in flight", "window", "done", "failed", "retries", "429s",
                   "timeouts", "req/s", "tok/s", "latency", "state"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for s in stats:
        table.add_row(
            s.label, str(s.in_flight), f"{s.window:.0f}", str(s.succeeded), str(s.failed), str(s.retries),
            str(s.rate_limited), str(s.timeouts), f"{s.succeeded / elapsed:.1f}",
            f"{(s.tokens_in + s.tokens_out) / elapsed:.0f}", f"{s.latency_mean:.2f}s",
            s.health,
        )
    return table


def summary_table(progress: Progress, stats: Sequence[EndpointStats]) -> Table:
    table = Table(title="gra-async run summary", show_header=True)
    table.add_column("role / model")
    table.add_column("prompt tokens", justify="right")
    table.add_column("completion tokens", justify="right")
    keys = sorted({(role, model) for role, model, _ in progress.tokens})
    for role, model in keys:
        table.add_row(f"{role} / {model}", str(progress.tokens[(role, model, "in")]),
                      str(progress.tokens[(role, model, "out")]))
    cost = progress.cost()
    lines = [headline(progress) + (f"  cost ${cost:.4f}" if cost is not None else "")]
    lines += [f"failed x{n}: {kind}" for kind, n in progress.failures.most_common(5)]
    table.caption = "\n".join(lines)
    return table


class ProgressDisplay:
    """The console of a run: `refresh()` runs until cancelled, `final()` prints the summary.

    The CLI owns it and runs `refresh()` in the task group of the run, so cancelling it
    is the group's business: nothing here catches a `CancelledError`.
    """

    def __init__(
        self, progress: Progress, stats: Callable[[], Sequence[EndpointStats]],
        stream: TextIO | None = None,
    ) -> None:
        self.progress = progress
        self.stats = stats
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def _render(self) -> Table:
        elapsed = max(time.monotonic() - self.progress.started, 1e-9)
        table = endpoint_table(self.stats(), elapsed)
        table.title = headline(self.progress)
        return table

    async def refresh(self) -> None:
        if self.live:
            with Live(self._render(), console=Console(file=self.stream), refresh_per_second=4,
                      transient=True) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(self._render())
        else:
            while True:
                await asyncio.sleep(_LOG_EVERY)
                print(headline(self.progress), file=self.stream, flush=True)

    def final(self, summary: RunSummary) -> None:
        table = summary_table(self.progress, self.stats())
        table.caption = f"{table.caption}\n{summary.explain()}"
        Console(file=self.stream).print(table)
