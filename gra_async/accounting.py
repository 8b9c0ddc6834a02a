"""What a run spent and why its tasks failed, in the forms the display and `status` count.

Kept apart from the pipeline so that `status` and `export` stay light to import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["failure_kind", "token_cost"]


def token_cost(
    tokens: Mapping[tuple[str, str, str], int],
    prices: dict[str, tuple[float, float]],
) -> float | None:
    if not any(p_in or p_out for p_in, p_out in prices.values()):
        return None
    total = 0.0
    for (_, model, direction), n in tokens.items():
        p_in, p_out = prices.get(model, (0.0, 0.0))
        total += n * (p_in if direction == "in" else p_out) / 1e6
    return total


_LABEL = re.compile(r"^\S+@\S+?: ")


def failure_kind(reason: str) -> str:
    """A failure reason without its endpoint and details, to count failures by kind."""
    return _LABEL.sub("", reason).split(": ")[0].split(" (")[0][:80]
