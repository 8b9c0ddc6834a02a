"""Plain values that cross the client boundary: what a call asks for and what it got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ChatReply", "ChatRequest", "EmbedReply", "EmbedRequest", "EndpointStats", "Message"]

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[Message]
    max_tokens: int
    temperature: float = 0.0
    response_format: dict[str, Any] | None = None
    seed: int | None = None

    def estimated_tokens(self) -> int:
        """Prompt (~4 characters a token) plus the whole completion budget: a ceiling for TPM."""
        return sum(len(m.get("content", "")) for m in self.messages) // 4 + self.max_tokens


@dataclass(frozen=True, slots=True)
class ChatReply:
    content: str
    finish_reason: str
    model: str  # the model name the endpoint was asked for
    endpoint: str  # the endpoint's label (model@url), for provenance
    prompt_tokens: int
    completion_tokens: int
    latency: float  # seconds, the successful attempt only
    attempts: int  # 1 when no retry was needed


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Texts for one `/v1/embeddings` call: several per call (a batch), in order."""

    texts: tuple[str, ...]

    def estimated_tokens(self) -> int:
        """~4 characters a token, the ceiling TPM limits count; no completion."""
        return sum(len(text) for text in self.texts) // 4 + len(self.texts)


@dataclass(frozen=True, slots=True)
class EmbedReply:
    vectors: npt.NDArray[np.float32]  # one row per text, in the request's order, unit length
    model: str
    endpoint: str
    prompt_tokens: int
    latency: float
    attempts: int


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """A consistent snapshot of one endpoint, for the progress display and `status`."""

    label: str
    model: str
    in_flight: int
    window: float  # adaptive concurrency limit now in force
    requests: int  # attempts sent
    succeeded: int
    failed: int  # attempts that failed, transient or not
    retries: int  # failed attempts that were retried
    rate_limited: int  # 429 answers
    tokens_in: int
    tokens_out: int
    latency_mean: float  # seconds, successful attempts
    health: str = "ok"  # ok | open (failing transiently: probed) | refusing (the same 4xx)
    timeouts: int = 0  # attempts that got no complete reply within read_timeout
    last_error: str = ""  # the latest failure since the last success
    abandoned: int = 0  # calls cancelled while in flight (target reached, stop)
    abandoned_tokens: int = 0  # their estimated tokens: prompt plus the whole completion budget
    roles: tuple[str, ...] = ()  # the roles it serves in this run (filled in by the team)

    @property
    def healthy(self) -> bool:
        """False while the circuit breaker is open."""
        return self.health == "ok"
