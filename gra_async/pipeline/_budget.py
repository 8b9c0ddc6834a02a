"""The run's money: what it has spent, what its calls in flight may still cost, and the cap.

A call is admitted only if its worst case fits: the budget left must cover what every call
in flight may still cost (prompt estimate plus the whole `max_tokens`) and this one. Its
reservation is replaced by the usage the server reports once it answers, so the spend is
the servers' own count, and a run stops at its budget, never past it by more than the
estimate's error.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass

from gra_async.client import ChatRequest

__all__ = ["Budget", "OverBudget", "Reservation"]

_PER_MESSAGE = 4  # tokens a chat template wraps around each message (OpenAI's rule of thumb)


class OverBudget(Exception):
    """A call's worst-case cost does not fit in the budget left: the task goes back."""


@dataclass(frozen=True, slots=True)
class Reservation:
    model: str
    amount: float  # dollars held while the call is in flight
    prompt_estimate: int  # tokens, to learn how far the estimate is from the server's count


class Budget:
    """Lives on the event loop; `limit=None` counts the spend and never refuses a call."""

    def __init__(
        self,
        limit: float | None,
        prices: Mapping[str, tuple[float, float]],
        *,
        spent: float = 0.0,
    ) -> None:
        self.limit = limit
        self._prices = dict(prices)
        self.spent_before = spent  # earlier sessions, from the journal
        self.spent = spent  # run total, servers' usage
        self.reserved = 0.0  # worst case of the calls in flight
        self.reached = False  # a call was refused for want of money
        # Reported prompt tokens per estimated one, per model: chars/4 undercounts for some
        # tokenizers, and an estimate that undercounts would let the spend pass the cap.
        self._ratio: dict[str, float] = {}
        self._freed: list[asyncio.Future[None]] = []  # calls waiting for reservations to end

    @property
    def left(self) -> float | None:
        return None if self.limit is None else self.limit - self.spent

    def _rate(self, model: str, prompt: float, completion: float, discount: float) -> float:
        p_in, p_out = self._prices.get(model, (0.0, 0.0))
        return (prompt * p_in + completion * p_out) * discount / 1e6

    async def reserve(
        self, model: str, request: ChatRequest, *, discount: float = 1.0,
    ) -> Reservation:
        """Hold this call's worst-case cost. While calls in flight hold what it needs, wait
        for them to answer (they mostly cost far less than their worst case); raise
        `OverBudget` when it would not fit even with nothing in flight."""
        chars = sum(len(m.get("content", "")) for m in request.messages)
        # A chat template adds a few tokens per message around its content.
        prompt = math.ceil(chars / 4) + _PER_MESSAGE * len(request.messages)
        worst = self._rate(model, prompt * self._ratio.get(model, 1.0), request.max_tokens,
                           discount)
        while self.limit is not None and self.spent + self.reserved + worst > self.limit:
            if self.reserved <= 0 or self.spent + worst > self.limit:
                self.reached = True
                raise OverBudget(f"a {model} call may cost ${worst:.6f}, more than the "
                                 f"${self.limit - self.spent:.6f} left")
            freed = asyncio.get_running_loop().create_future()
            self._freed.append(freed)
            await freed
        self.reserved += worst
        return Reservation(model, worst, prompt)

    def settle(
        self, held: Reservation, prompt_tokens: int, completion_tokens: int, *,
        discount: float = 1.0,
    ) -> float:
        """The call answered: its reservation becomes what it cost. Returns that cost."""
        self._free(held)
        cost = self._rate(held.model, prompt_tokens, completion_tokens, discount)
        self.spent += cost
        ratio = prompt_tokens / held.prompt_estimate
        if ratio > self._ratio.get(held.model, 1.0):
            self._ratio[held.model] = ratio
        return cost

    def release(self, held: Reservation) -> None:
        """The call got no reply (an error, a cancel): nothing was billed for it here."""
        self._free(held)

    def _free(self, held: Reservation) -> None:
        self.reserved = max(0.0, self.reserved - held.amount)
        waiting, self._freed = self._freed, []
        for future in waiting:
            if not future.done():
                future.set_result(None)
