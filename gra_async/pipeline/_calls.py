"""The journaled call layer: every model call of a run, and the re-asks of invalid replies.

A call whose key is in the journal is answered from it (resume); otherwise it waits for a
run-wide slot (`run.concurrency`), goes to the role's pool, and its reply is journaled
before it is used. A task holds no slot while it parses or waits for other calls, so
steps depending on each other never idle the slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

from gra_async._concurrency import Slots
from gra_async.accounting import BATCH_ENDPOINT_SUFFIX
from gra_async.client import ChatRequest
from gra_async.config import Role, RunConfig
from gra_async.errors import InvalidReply, TaskFailed
from gra_async.pipeline._batch import BatchWaves
from gra_async.pipeline._budget import Budget
from gra_async.pipeline._progress import Progress
from gra_async.planner import Task
from gra_async.scoring import (
    generation_schema,
    metadata_schema,
    response_format,
    review_schema,
    verdict_schema,
)
from gra_async.store import CallRecord, Journal, call_key
from gra_async.team import Team

__all__ = ["CallRole", "Caller"]

T = TypeVar("T")
Messages = list[dict[str, str]]
# What a call is for, as the journal and `status` name it. Metadata is asked of the
# sample's generator, through the generator's pool.
CallRole = Literal["generator", "reviewer", "adjudicator", "metadata"]
_POOL: dict[CallRole, Role] = {"generator": "generator", "reviewer": "reviewer",
                               "adjudicator": "adjudicator", "metadata": "generator"}


class Caller:
    def __init__(
        self, config: RunConfig, team: Team, journal: Journal, progress: Progress, budget: Budget,
    ) -> None:
        self._config = config
        self.budget = budget
        self.waves: BatchWaves | None = None  # batch mode: calls go in waves to the Batch API
        self._team = team
        self._journal = journal
        self._progress = progress
        self._slots = Slots(config.run.concurrency)
        self._cache: dict[str, CallRecord] = {}
        self._made: dict[str, list[CallRecord]] = {}  # replies of the tasks in flight
        gen = config.generation
        self._schemas = {
            "generator": generation_schema(gen.max_tokens),
            "reviewer": review_schema(config.gate.criteria, gen.review_max_tokens),
            "adjudicator": verdict_schema(gen.verdict_max_tokens),
            "metadata": metadata_schema(config.metadata.keywords),
        }
        self._max_tokens: dict[CallRole, int] = {
            "generator": gen.max_tokens, "reviewer": gen.review_max_tokens,
            "adjudicator": gen.verdict_max_tokens, "metadata": config.metadata.max_tokens,
        }
        self._temperature: dict[CallRole, float] = {
            "generator": gen.temperature, "reviewer": gen.review_temperature,
            "adjudicator": gen.review_temperature, "metadata": config.metadata.temperature,
        }

    @property
    def slots(self) -> Slots:
        """The run-wide slots (`run.concurrency`); embedder calls take one each too."""
        return self._slots

    def reuse(self, replies: dict[str, CallRecord]) -> None:
        """Replies journaled by an earlier session for tasks it did not finish."""
        self._cache = replies

    def keep(self, task_id: str) -> None:
        """The task runs again later (parked): its replies so far answer it then."""
        for record in self._made.pop(task_id, ()):
            self._cache[record.key] = record

    def done(self, task_id: str) -> None:
        self._made.pop(task_id, None)

    async def structured(
        self, task: Task, role: CallRole, model: str, messages: Messages,
        parse: Callable[[str], T], slot: str,
    ) -> tuple[T, CallRecord]:
        """A call whose reply must parse; an invalid reply is asked again, within a budget.

        Raises `TaskFailed` when every try gave an invalid reply.
        """
        budget = self._config.gate.invalid_reply_retries
        asked, max_tokens = messages, self._max_tokens[role]
        reason = ""
        for attempt in range(budget + 1):
            record = await self.call(task, role, model, asked, f"{slot}/{attempt}", max_tokens)
            if record.finish_reason == "length":
                # Whatever parses out of a cut reply is not the whole reply; the same request
                # would be cut again, so the next one gets twice the room.
                reason = "reply cut off at max_tokens (raise the role's max_tokens)"
                max_tokens *= 2
                continue
            try:
                return parse(record.content), record
            except InvalidReply as exc:
                reason = exc.reason
            # At temperature 0 the same request gets the same reply: show the model what it
            # wrote and what was wrong with it.
            asked = [*messages, {"role": "assistant", "content": record.content[:2000]},
                     {"role": "user", "content": f"That reply was not valid ({reason}). Reply "
                      "again with only the JSON object, in the shape asked for."}]
        raise TaskFailed(f"invalid {role} reply after {budget + 1} tries from {model}: {reason}")

    async def call(
        self, task: Task, role: CallRole, model: str, messages: Messages, slot: str,
        max_tokens: int,
    ) -> CallRecord:
        temperature = self._temperature[role]
        fmt = response_format(f"gra_{role}", self._schemas[role],
                              self._team.json_modes.get(model, "json_schema"))
        params = {"max_tokens": max_tokens, "temperature": temperature, "response_format": fmt}
        key = call_key(role=role, model=model, messages=messages, params=params,
                       task_id=task.id, slot=slot)
        cached = self._cache.pop(key, None)
        if cached is not None:
            self._progress.calls_reused += 1
            return cached
        request = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature,
                              response_format=fmt)
        if self.waves is not None:
            # Journaled by the waves, as soon as its output file is read.
            record = await self.waves.call(task.id, role, model, key, request)
            self._count(task, role, model, record)
            return record
        async with self._slots:
            # Held once the call has its slot: calls queued behind the run's concurrency
            # are not in flight yet and must not starve the budget of the ones that are.
            held = await self.budget.reserve(model, request)
            try:
                reply = await self._team.pools[_POOL[role]].chat(request, model=model)
            except BaseException:
                self.budget.release(held)
                raise
        self.budget.settle(held, reply.prompt_tokens, reply.completion_tokens)
        self._progress.last_activity = time.monotonic()
        record = CallRecord(key, task.id, role, model, reply.endpoint, reply.content,
                            reply.finish_reason, reply.prompt_tokens, reply.completion_tokens,
                            reply.latency, reply.attempts)
        self._journal.record_call(record)
        self._count(task, role, model, record)
        return record

    def _count(self, task: Task, role: CallRole, model: str, record: CallRecord) -> None:
        self._made.setdefault(task.id, []).append(record)
        progress = self._progress
        progress.calls_sent += 1
        progress.tokens[(role, model, "in")] += record.prompt_tokens
        progress.tokens[(role, model, "out")] += record.completion_tokens
        if record.endpoint.endswith(BATCH_ENDPOINT_SUFFIX):
            progress.batch_tokens[(role, model, "in")] += record.prompt_tokens
            progress.batch_tokens[(role, model, "out")] += record.completion_tokens
