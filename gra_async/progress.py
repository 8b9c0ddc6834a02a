"""What a person watching a run sees: a live rich table on a terminal, log lines elsewhere."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gra_async.client import EndpointStats
from gra_async.pipeline import Progress

if TYPE_CHECKING:
    from gra_async.synthesizer import RunSummary

__all__ = ["ProgressDisplay", "headline", "status_lines", "summary_table"]

_LOG_EVERY = 10.0  # seconds between plain log lines when stdout is not a terminal


_ROLE_SHORT = {"generator": "gen", "reviewer": "rev", "adjudicator": "adj"}


def _rate(progress: Progress) -> tuple[float, float | None]:
    """Accepted per second this session, and seconds left to the target at that rate."""
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


def status_phrases(progress: Progress, plan: int = 0) -> tuple[list[str], list[str]]:
    """The status line as phrases: the run's totals (earlier sessions included), then this
    session's figures. A line is only ever broken between two phrases."""
    rate, eta = _rate(progress)
    finished = progress.finished - progress.finished_at_start
    accepted = progress.accepted - progress.accepted_at_start
    failed = progress.failed - progress.failed_at_start
    run = [f"run: accepted {progress.accepted}/{progress.target}",
           f"rejected {progress.rejected}", f"failed {progress.failed}"]
    if plan:
        run.append(f"planned {max(plan - progress.finished, 0)}")
    session = [f"this session: accepted {accepted}",
               f"rejected {finished - accepted - failed} (dup {progress.duplicates}, "
               f"filtered {progress.filtered})",
               f"failed {failed}", f"in progress {progress.in_progress}",
               f"acceptance {100 * accepted / finished:.0f}%" if finished else "acceptance -",
               f"adjudicated {progress.adjudicated}",
               f"calls {progress.calls_sent} (+{progress.calls_reused} reused)",
               f"{rate:.2f} accepted/s", f"ETA {_eta(eta)}"]
    return run, session


def _pack(phrases: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for phrase in phrases:
        if lines and len(lines[-1]) + 2 + len(phrase) <= width:
            lines[-1] += "  " + phrase
        else:
            lines.append(phrase)
    return lines


def status_lines(progress: Progress, width: int, plan: int = 0) -> list[str]:
    """The status line laid out in `width` columns: the run's totals and this session's
    figures on one line when both fit, else each group from a line of its own."""
    run, session = status_phrases(progress, plan)
    lines = _pack(run, width) + _pack(session, width)
    if len(lines) == 2 and len(lines[0]) + 4 + len(lines[1]) <= width:
        return [f"{lines[0]}  |  {lines[1]}"]
    return lines


def headline(progress: Progress, plan: int = 0) -> str:
    """The status line as one line (logs, the final summary)."""
    run, session = status_phrases(progress, plan)
    return "  ".join(run) + "  |  " + "  ".join(session)


def _short_label(label: str) -> str:
    """model@host:port: the scheme and the usual /v1 say nothing on a narrow terminal."""
    model, _, url = label.partition("@")
    url = url.split("://", 1)[-1]
    return f"{model}@{url.removesuffix('/v1')}" if url else label


# Columns a terminal narrower than _WIDE leaves out, so every endpoint stays on one line.
_WIDE = 110
_NARROW_DROPS = frozenset({"win", "t/o", "tok/s"})
# Columns but the label, with their gaps, at realistic figures (narrow, wide).
_OTHER_COLUMNS = (66, 86)


def endpoint_table(stats: Sequence[EndpointStats], elapsed: float, width: int = _WIDE) -> Table:
    """Each endpoint once, with the roles it serves; figures of this session."""
    table = Table(box=None, pad_edge=False, title="endpoints, this session", title_justify="left")
    columns = ("endpoint", "roles", "flight", "win", "done", "fail", "retry", "429", "t/o",
               "req/s", "tok/s", "lat", "state")
    shown = [c for c in columns if width >= _WIDE or c not in _NARROW_DROPS]
    for column in shown:
        left = column in ("endpoint", "roles")
        # The label gives way first: the numbers keep their natural width.
        table.add_column(column, justify="left" if left else "right", no_wrap=True,
                         overflow="ellipsis",
                         max_width=max(10, width - _OTHER_COLUMNS[width >= _WIDE]) if column == "endpoint" else None)
    for s in stats:
        cells = {
            "endpoint": _short_label(s.label), "roles": ",".join(_ROLE_SHORT.get(r, r) for r in s.roles),
            "flight": str(s.in_flight), "win": f"{s.window:.0f}", "done": str(s.succeeded),
            "fail": str(s.failed), "retry": str(s.retries), "429": str(s.rate_limited),
            "t/o": str(s.timeouts), "req/s": f"{s.succeeded / elapsed:.1f}",
            "tok/s": f"{(s.tokens_in + s.tokens_out) / elapsed:.0f}",
            "lat": f"{s.latency_mean:.2f}s", "state": s.health,
        }
        table.add_row(*(cells[c] for c in shown))
    return table


def summary_table(progress: Progress, stats: Sequence[EndpointStats], plan: int = 0) -> Table:
    table = Table(title="gra-async run summary (tokens: this session)", show_header=True)
    table.add_column("role / model")
    table.add_column("prompt tokens", justify="right")
    table.add_column("completion tokens", justify="right")
    keys = sorted({(role, model) for role, model, _ in progress.tokens})
    for role, model in keys:
        table.add_row(f"{role} / {model}", str(progress.tokens[(role, model, "in")]),
                      str(progress.tokens[(role, model, "out")]))
    return table


def summary_lines(progress: Progress, width: int, plan: int = 0) -> list[str]:
    """Under the summary table: the status line laid out in `width`, cost, top failures."""
    lines = status_lines(progress, width, plan)
    cost = progress.cost()
    if cost is not None:
        lines.append(f"cost ${cost:.4f} this session")
    lines += [f"failed x{n}: {kind}" for kind, n in progress.failures.most_common(5)]
    return lines


class ProgressDisplay:
    """The console of a run: `refresh()` runs until cancelled, `final()` prints the summary.

    The CLI owns it and runs `refresh()` in the task group of the run, so cancelling it
    is the group's business: nothing here catches a `CancelledError`.
    """

    def __init__(
        self, progress: Progress, stats: Callable[[], Sequence[EndpointStats]],
        stream: TextIO | None = None, *, plan: int = 0,
    ) -> None:
        self.progress = progress
        self.stats = stats
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.plan = plan  # tasks the run plans (`planned` counts down from it)

    def render(self, width: int) -> Group:
        """What the live display shows in a terminal `width` columns wide."""
        elapsed = max(time.monotonic() - self.progress.started, 1e-9)
        lines = [Text(line, no_wrap=True, overflow="ellipsis")
                 for line in status_lines(self.progress, width, self.plan)]
        return Group(*lines, endpoint_table(self.stats(), elapsed, width))

    async def refresh(self) -> None:
        if self.live:
            console = Console(file=self.stream)
            with Live(self.render(console.width), console=console, refresh_per_second=4,
                      transient=True) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(self.render(console.width))
        else:
            while True:
                await asyncio.sleep(_LOG_EVERY)
                print(headline(self.progress, self.plan), file=self.stream, flush=True)

    def final(self, summary: RunSummary, explain: str | None = None) -> None:
        """The last table and lines; `explain` replaces the summary's own last line."""
        console = Console(file=self.stream)
        console.print(summary_table(self.progress, self.stats(), self.plan))
        last = summary.explain() if explain is None else explain
        for line in [*summary_lines(self.progress, console.width, self.plan), last]:
            console.print(Text(line, no_wrap=True, overflow="ellipsis"))
