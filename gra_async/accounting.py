"""What a run spent and why its tasks failed, in the forms the display and `status` count.

Kept apart from the pipeline so that `status` and `export` stay light to import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["BATCH_ENDPOINT_SUFFIX", "batch_prices", "failure_kind", "spend", "token_cost"]

# Marks, in a journaled call's `endpoint`, a reply that came from a Batch API output file:
# it was billed at the endpoint's `batch_discount`, and the spend must say so.
BATCH_ENDPOINT_SUFFIX = " (batch)"


def token_cost(
    tokens: Mapping[tuple[str, str, str], int],
    prices: Mapping[str, tuple[float, float]],
) -> float | None:
    if not any(p_in or p_out for p_in, p_out in prices.values()):
        return None
    total = 0.0
    for (_, model, direction), n in tokens.items():
        p_in, p_out = prices.get(model, (0.0, 0.0))
        total += n * (p_in if direction == "in" else p_out) / 1e6
    return total


def batch_prices(
    prices: Mapping[str, tuple[float, float]], discounts: Mapping[str, float],
) -> dict[str, tuple[float, float]]:
    """Per-model prices of the Batch API: the online prices times each model's discount."""
    return {model: (p_in * discounts.get(model, 1.0), p_out * discounts.get(model, 1.0))
            for model, (p_in, p_out) in prices.items()}


def spend(
    rows: Iterable[tuple[str, bool, int, int]],
    prices: Mapping[str, tuple[float, float]],
    batched: Mapping[str, tuple[float, float]],
) -> float:
    """Dollars of (model, from a batch?, prompt tokens, completion tokens) rows."""
    total = 0.0
    for model, batch, t_in, t_out in rows:
        p_in, p_out = (batched if batch else prices).get(model, (0.0, 0.0))
        total += (t_in * p_in + t_out * p_out) / 1e6
    return total


_LABEL = re.compile(r"^\S+@\S+?: ")


def failure_kind(reason: str) -> str:
    """A failure reason without its endpoint and details, to count failures by kind."""
    return _LABEL.sub("", reason).split(": ")[0].split(" (")[0][:80]
