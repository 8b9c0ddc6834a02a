"""Typed records of one task's sample while it is made, and their form in the journal.

The journal keeps a sample's provenance as one JSON object (`samples.body`); inside the
pipeline it is a `SampleBody`, so no step reads a key that another step forgot to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gra_async.planner import Task
from gra_async.scoring import ScoredReview
from gra_async.store import SampleRecord

__all__ = ["Adjudication", "DecisionName", "Draft", "FailedReview", "SampleBody", "sample_record"]

# accept / reject: the gate (or the adjudicator) decided; duplicate: a copy of an accepted
# sample or of a few-shot seed; filtered: a user filter rejected the draft; failed: the
# task could not produce a sample.
DecisionName = Literal["accept", "reject", "duplicate", "filtered", "failed"]


@dataclass(frozen=True, slots=True)
class Draft:
    """A generated sample before any review is paid for: what a filter sees."""

    task_id: str
    round: int
    domain: str
    instruction: str
    response: str
    generator: str  # the model that wrote it
    seed_ids: tuple[str, ...]  # its few-shot examples


@dataclass(frozen=True, slots=True)
class FailedReview:
    """A reviewer whose reply never became a valid review, and why."""

    model: str
    error: str


@dataclass(frozen=True, slots=True)
class Adjudication:
    model: str
    decision: Literal["accept", "reject"]
    reason: str


@dataclass(slots=True)
class SampleBody:
    """A sample's provenance as the journal keeps it; filled step by step."""

    instruction: str = ""
    response: str = ""
    generator: str = ""
    tokens: int = 0
    reviews: tuple[ScoredReview, ...] = ()
    failed_reviews: tuple[FailedReview, ...] = ()
    mean: float | None = None
    std: float | None = None
    adjudication: Adjudication | None = None
    decision: DecisionName | None = None
    duplicate_of: str | None = None
    similarity: float | None = None  # embedding cosine to `duplicate_of` (semantic dedup)
    reason: str | None = None  # why a filter rejected it, or why the task failed
    failure: str | None = None  # the failure's kind, for counting
    keywords: tuple[str, ...] | None = None  # metadata of an accepted sample
    summary: str | None = None
    # `refine`: the seed sample this one is, or was rewritten from, and which of the two.
    source_id: str | None = None
    origin: Literal["kept", "rewritten"] | None = None
    rewrites: int | None = None  # rewrites made of the seed (`refine`)

    def to_json(self) -> dict[str, Any]:
        """The journal's `body`: the export's fields, and the optional ones only when set."""
        body: dict[str, Any] = {
            "instruction": self.instruction,
            "response": self.response,
            "generator": self.generator,
            "tokens": self.tokens,
            "reviews": [{"model": r.model, "scores": dict(r.scores), "mean": r.mean,
                         "feedback": r.feedback} for r in self.reviews],
            "failed_reviews": [{"model": f.model, "error": f.error} for f in self.failed_reviews],
            "mean": self.mean,
            "std": self.std,
            "adjudication": None if self.adjudication is None else {
                "model": self.adjudication.model, "decision": self.adjudication.decision,
                "reason": self.adjudication.reason},
            "decision": self.decision,
        }
        for key in ("duplicate_of", "similarity", "reason", "failure", "summary", "source_id", "origin",
                    "rewrites"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.keywords is not None:
            body["keywords"] = list(self.keywords)
        return body


def sample_record(task: Task, state: str, body: SampleBody) -> SampleRecord:
    """`task`'s sample in `state`, as the journal writes it."""
    return SampleRecord(task.id, task.round, task.index, state, task.domain, task.seed_ids,
                        body.to_json())
