"""The samples of a run as typed records: what `export` writes and `read_samples` yields.

These are the file formats' models (pydantic): the export's fields as the README lists them, in
that order, then the provenance a run adds (`round`, `failed_reviews`, `duplicate_of`,
`similarity`, `reason`) the metadata (`keywords`, `summary`), and a refine's `source_id`, `origin`, `rewrites`. Unknown keys in a journal written by a later version are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gra_async.report import sample_row
from gra_async.store import TERMINAL_STATES, JournalReader

__all__ = ["Adjudication", "FailedReview", "Review", "Sample", "read_samples"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Review(_Record):
    """One reviewer model's scores (1-10 per criterion), their mean and its feedback."""

    model: str
    scores: dict[str, int]
    mean: float
    feedback: str = ""


class FailedReview(_Record):
    """A reviewer whose reply never became a valid review, and why."""

    model: str
    error: str


class Adjudication(_Record):
    """The adjudicator's decision on a sample its reviewers disagreed on, and why."""

    model: str
    decision: Literal["accept", "reject"]
    reason: str = ""


class Sample(_Record):
    """One sample with its full provenance. A failed task has no text (empty strings)."""

    id: str
    instruction: str = ""
    response: str = ""
    domain: str
    seed_ids: list[str] = Field(default_factory=list)
    generator: str = ""
    reviews: list[Review] = Field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    decision: Literal["accept", "reject", "duplicate", "filtered", "failed"] | None = None
    adjudication: Adjudication | None = None
    tokens: int = 0
    round: int = 1
    failed_reviews: list[FailedReview] = Field(default_factory=list)
    duplicate_of: str | None = None
    # Embedding cosine to `duplicate_of` when the semantic dedup found it (None: a copy
    # that MinHash caught, or no duplicate).
    similarity: float | None = None
    reason: str | None = None  # why a filter rejected it, or why the task failed
    keywords: list[str] = Field(default_factory=list)  # metadata (README: Metadata)
    summary: str | None = None
    # `refine` (README: Refining an existing dataset); None in a generation run.
    source_id: str | None = None  # the seed's id
    origin: Literal["kept", "rewritten"] | None = None
    rewrites: int | None = None  # rewrites made of the seed


def read_samples(run_dir: str | Path, *, include_all: bool = False) -> Iterator[Sample]:
    """The accepted samples of a run (every finished one with `include_all`), in plan order.

    Streamed from the journal through a read-only connection: safe while the run writes,
    and memory stays flat however large the run. Raises `RunDirError` when `run_dir`
    holds no journal.
    """
    states = TERMINAL_STATES if include_all else ("accepted",)
    reader = JournalReader(Path(run_dir))  # here, so a wrong path fails at the call
    return _stream(reader, states)


def _stream(reader: JournalReader, states: tuple[str, ...]) -> Iterator[Sample]:
    try:
        for record in reader.samples(states):
            yield Sample.model_validate(sample_row(record))
    finally:
        reader.close()
