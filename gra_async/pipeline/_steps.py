"""The GRA steps of one task: generate, copy check (MinHash, then embeddings), filters,
review panel, gate, adjudicator, metadata.

`TaskSteps.run` takes a planned task to a `SampleBody` with a decision; what happens to
that decision (the target, the final dedup insert, the counters) is the scheduler's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal, TypeAlias

from gra_async.config import GateConfig, RunConfig
from gra_async.dedup import Deduplicator, copied_from
from gra_async.errors import BadRequestError, RetriesExhausted, TaskFailed, TaskParked, UsageError
from gra_async.pipeline._budget import OverBudget
from gra_async.pipeline._calls import Caller
from gra_async.pipeline._embed import SemanticCheck
from gra_async.pipeline._progress import Progress
from gra_async.pipeline._records import (
    Adjudication,
    Draft,
    FailedReview,
    SampleBody,
    sample_record,
)
from gra_async.planner import Planner, Task
from gra_async.prompts import PromptSet, ReviewView
from gra_async.scoring import (
    Decision,
    Panel,
    ScoredReview,
    aggregate,
    decide,
    parse_generation,
    parse_metadata,
    parse_review,
    parse_verdict,
)
from gra_async.store import Journal
from gra_async.team import Assignment, Team

__all__ = ["Filter", "Gate", "GateVerdict", "TaskSteps", "dedup_text"]

log = logging.getLogger("gra_async")

GateVerdict: TypeAlias = Literal["accept", "reject", "adjudicate"]
Filter: TypeAlias = Callable[[Draft], "str | Awaitable[str | None] | None"]
Gate: TypeAlias = Callable[[Panel, GateConfig], "GateVerdict | Decision | Awaitable[GateVerdict | Decision]"]


def dedup_text(instruction: str, response: str) -> str:
    """What dedup compares: the sample whole, as every check and every stored entry sees it."""
    return f"{instruction}\n{response}"


async def _maybe_await(value: object) -> object:
    return await value if inspect.isawaitable(value) else value


class TaskSteps:
    def __init__(
        self,
        config: RunConfig,
        team: Team,
        prompts: PromptSet,
        planner: Planner,
        journal: Journal,
        caller: Caller,
        progress: Progress,
        dedup: Callable[[], Awaitable[Deduplicator]],
        *,
        filters: Sequence[Filter] = (),
        gate: Gate | None = None,
        semantic: SemanticCheck | None = None,
    ) -> None:
        self._config = config
        self._semantic = semantic
        self._team = team
        self._prompts = prompts
        self._planner = planner
        self._journal = journal
        self._caller = caller
        self._progress = progress
        self._dedup = dedup
        self._filters = tuple(filters)
        self._gate = gate
        # Without an adjudicator for a task, disagreement is settled by the mean, with the
        # same tolerance at the bar as every other decision (scoring.decide).
        self._mean_gate = config.gate.model_copy(update={"adjudicator": False})

    async def run(self, task: Task) -> SampleBody:
        """The sample of `task`, decided; raises `TaskFailed` when it cannot be made."""
        team = self._team.assign(task.id)
        examples = [self._planner.seed(s) for s in task.seed_ids]
        keywords = self._planner.keywords(task.domain, task.round)
        messages = self._prompts.generator(task.domain, keywords, examples)
        sample, reply = await self._caller.structured(
            task, "generator", team.generator, messages, parse_generation, "gen")
        body = SampleBody(instruction=sample.instruction, response=sample.response,
                          generator=team.generator,
                          tokens=reply.prompt_tokens + reply.completion_tokens)

        # A copy of one of its own few-shot seeds (what small models do most), or of an
        # accepted sample, is not a new sample: stop before paying for reviews. The
        # instruction alone counts too: a task copied from an example is not new,
        # whatever answer comes with it.
        dedup = await self._dedup()
        text = dedup_text(sample.instruction, sample.response)
        instructions = {f"seed:{s.id}": s.instruction for s in examples}
        wholes = {f"seed:{s.id}": dedup_text(s.instruction, s.response) for s in examples}
        duplicate = (copied_from(sample.instruction, instructions, dedup.threshold)
                     or copied_from(text, wholes, dedup.threshold)
                     or dedup.check(task.id, text))
        if duplicate is not None:
            body.decision, body.duplicate_of = "duplicate", duplicate
            return body
        # MinHash above is the cheap filter for copies; a paraphrase of a seed or of an
        # accepted sample is caught here, by embedding cosine, still before the reviews.
        if await self._paraphrase(task, body, text, wholes):
            return body

        draft = Draft(task.id, task.round, task.domain, sample.instruction, sample.response,
                      team.generator, task.seed_ids)
        for check in self._filters:
            reason = await _maybe_await(check(draft))
            if reason is not None:
                if not isinstance(reason, str):
                    raise UsageError(f"filter {check!r} returned {reason!r}; return a reason "
                                     "(str) to reject the draft, or None to keep it")
                body.decision, body.reason = "filtered", reason
                return body
        self._record(task, "generated", body)
        await self._judge(task, team, body)
        if body.decision == "accept" and self._config.metadata.enabled:
            await self._describe(task, body, team.generator)
        return body

    async def _paraphrase(self, task: Task, body: SampleBody, text: str,
                          references: Mapping[str, str]) -> bool:
        """Whether the embedding check makes `body` a duplicate (of a reference or an
        accepted sample); False without an embedder."""
        if self._semantic is None:
            return False
        found = await self._semantic.duplicate(task.id, text, references)
        if found is None:
            return False
        body.decision, body.duplicate_of = "duplicate", found.key
        body.similarity = found.similarity
        return True

    async def _judge(self, task: Task, team: Assignment, body: SampleBody, slot: str = "") -> None:
        """The review panel, the gate and, on a dispute, the adjudicator: `body.decision`
        becomes accept or reject. `slot` keeps apart the calls of the versions of one
        task's sample (`refine` reviews each rewrite again)."""
        review_prompt = self._prompts.reviewer(body.instruction, body.response,
                                               self._config.gate.criteria)
        async with asyncio.TaskGroup() as group:
            pending = [group.create_task(self._review(task, model, review_prompt, slot))
                       for model in team.reviewers]
        outcomes = [p.result() for p in pending]
        # A review lost to the endpoint (not the reviewer's fault) is asked again when the
        # task runs again; the reviews that came back are reused from the journal then.
        lost = [r for r, _ in outcomes if isinstance(r, Exception)]
        for error in lost:
            if isinstance(error, BadRequestError | OverBudget):
                raise error
        if lost:
            raise TaskParked(f"a review was lost to the endpoint: {lost[0]}")
        body.reviews = tuple(r for r, _ in outcomes if isinstance(r, ScoredReview))
        body.failed_reviews = tuple(r for r, _ in outcomes if isinstance(r, FailedReview))
        body.tokens += sum(tokens for _, tokens in outcomes)
        if team.reviewers and not body.reviews:
            raise TaskFailed(f"no valid review: {body.failed_reviews[0].error}")
        quorum = min(self._config.gate.min_reviews or len(team.reviewers), len(team.reviewers))
        if len(body.reviews) < quorum:
            raise TaskFailed(f"{len(body.reviews)} valid reviews of {len(team.reviewers)}, "
                             f"below the quorum of {quorum}: {body.failed_reviews[0].error}")
        panel = aggregate(body.reviews) if body.reviews else None
        if panel is not None:
            body.mean, body.std = panel.mean, panel.std
        decision = await self._decide(panel, has_adjudicator=team.adjudicator is not None)

        if decision is Decision.ADJUDICATE and team.adjudicator is not None:
            self._record(task, "adjudicating", body)
            views = [ReviewView(f"Reviewer {i + 1}", r.scores, r.feedback)
                     for i, r in enumerate(body.reviews)]
            messages = self._prompts.adjudicator(body.instruction, body.response, views,
                                                 self._config.gate.criteria)
            verdict, reply = await self._caller.structured(
                task, "adjudicator", team.adjudicator, messages, parse_verdict, f"{slot}adj")
            body.tokens += reply.prompt_tokens + reply.completion_tokens
            body.adjudication = Adjudication(team.adjudicator, verdict.decision, verdict.reason)
            self._progress.adjudicated += 1
            decision = Decision.ACCEPT if verdict.decision == "accept" else Decision.REJECT
        else:
            self._record(task, "reviewed", body)
        body.decision = "accept" if decision is Decision.ACCEPT else "reject"

    async def _describe(self, task: Task, body: SampleBody, model: str) -> None:
        """Keywords and a summary of an accepted sample, asked of the model that wrote it.

        Metadata that stays invalid after the re-asks leaves the sample without it: an
        accepted sample is never lost to its description.
        """
        count = self._config.metadata.keywords
        instruction, response = body.instruction, body.response
        messages = self._prompts.metadata(instruction, response, count)
        try:
            meta, reply = await self._caller.structured(
                task, "metadata", model, messages,
                lambda text: parse_metadata(text, instruction, response, count), "meta")
        except TaskFailed as exc:
            log.info("task %s keeps no metadata: %s", task.id, exc)
            return
        body.keywords, body.summary = meta.keywords, meta.summary
        body.tokens += reply.prompt_tokens + reply.completion_tokens

    async def _decide(self, panel: Panel | None, *, has_adjudicator: bool) -> Decision:
        """The gate, in one place: the configured rule or the user's, then the fallback
        when this task has no adjudicator. No panel (no reviewers) accepts."""
        gate = self._config.gate if has_adjudicator else self._mean_gate
        if panel is None:
            return Decision.ACCEPT
        if self._gate is None:
            decision = decide(panel, gate)
        else:
            said = await _maybe_await(self._gate(panel, gate))
            try:
                decision = Decision(str(said))
            except ValueError:
                raise UsageError(f"gate {self._gate!r} returned {said!r}; return 'accept', "
                                 "'reject' or 'adjudicate'") from None
        if decision is Decision.ADJUDICATE and not has_adjudicator:
            decision = decide(panel, self._mean_gate)
        return decision

    async def _review(
        self, task: Task, model: str, messages: list[dict[str, str]], slot: str = "",
    ) -> tuple[ScoredReview | FailedReview | RetriesExhausted | BadRequestError | OverBudget, int]:
        """One reviewer's review and the tokens it cost. Invalid replies make a failed
        review; a call lost to the endpoint comes back as its error, so the other
        reviews of the panel are not cancelled with it."""
        criteria = self._config.gate.criteria
        try:
            review, reply = await self._caller.structured(
                task, "reviewer", model, messages,
                lambda text: parse_review(text, criteria), f"{slot}rev/{model}")
        except TaskFailed as exc:
            return FailedReview(model, str(exc)), 0
        except (RetriesExhausted, BadRequestError, OverBudget) as exc:
            # The budget refusing one review must not cancel the others in flight: those
            # are paid for, and their replies are journaled for the rerun.
            return exc, 0
        return (ScoredReview(model, dict(review.scores), review.feedback),
                reply.prompt_tokens + reply.completion_tokens)

    def _record(self, task: Task, state: str, body: SampleBody) -> None:
        self._journal.record_sample(sample_record(task, state, body))
