"""The counters of a run that the display, the final summary and `RunSummary` read."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from gra_async.accounting import token_cost

__all__ = ["Progress"]


@dataclass(slots=True)
class Progress:
    """Mutated on the event loop only; totals include what the journal held at start."""

    target: int
    accepted: int = 0
    rejected: int = 0  # every rejection, duplicates and filtered drafts included
    failed: int = 0
    duplicates: int = 0
    filtered: int = 0
    adjudicated: int = 0
    in_progress: int = 0
    calls_sent: int = 0
    calls_reused: int = 0
    embedded: int = 0  # texts sent to the embedder this session (each once)
    parked: int = 0  # tasks that lost a call to the endpoint and went back to run again
    last_activity: float = field(default_factory=time.monotonic)  # a call or a task finished
    accepted_at_start: int = 0  # from the journal, so rates count this session's work only
    finished_at_start: int = 0
    failed_at_start: int = 0
    started: float = field(default_factory=time.monotonic)
    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (role, model, in|out)
    failures: Counter[str] = field(default_factory=Counter)  # this session's, by kind
    rejections: Counter[str] = field(default_factory=Counter)  # this session's, by decision
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> per 1M in/out
    # Of `tokens`, those from Batch API output files, billed at `batch_prices`.
    batch_tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    batch_prices: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return self.accepted + self.rejected + self.failed

    def cost(self) -> float | None:
        """This session's spend from the configured prices; None when no price is set."""
        if not self.batch_tokens:
            return token_cost(self.tokens, self.prices)
        online = token_cost(self.tokens - self.batch_tokens, self.prices) or 0.0
        return online + (token_cost(self.batch_tokens, self.batch_prices) or 0.0)
