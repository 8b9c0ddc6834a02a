"""GRA-Refined (`refine`): the steps of one task whose sample is a seed of an existing dataset.

The seed is reviewed by the panel as a generated sample is (gate, adjudicator on a
dispute); a rejected one is rewritten by the generator, shown the reviews, and the
rewrite reviewed again, up to `refine.max_rewrites` times. Every version is checked
against the accepted set before its reviews are paid for, and the scheduler's final
check keeps two accepted versions from being near-copies of each other.
"""

from __future__ import annotations

from typing import Any

from gra_async.errors import InvalidReply, TaskFailed
from gra_async.pipeline._records import SampleBody
from gra_async.pipeline._steps import TaskSteps, dedup_text
from gra_async.planner import Task
from gra_async.prompts import ReviewView
from gra_async.scoring import GeneratedSample, parse_generation
from gra_async.team import Assignment

__all__ = ["RefineSteps"]


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


class RefineSteps(TaskSteps):
    def __init__(self, *args: Any, max_rewrites: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_rewrites = max_rewrites

    async def run(self, task: Task) -> SampleBody:
        """The seed of `task`, kept, rewritten or dropped; raises `TaskFailed` like a run's task."""
        seed = self._planner.seed(task.seed_ids[0])
        team = self._team.assign(task.id)
        body = SampleBody(instruction=seed.instruction, response=seed.response,
                          source_id=seed.id, origin="kept", rewrites=0)
        dedup = await self._dedup()
        rewrites = 0
        while True:
            text = dedup_text(body.instruction, body.response)
            duplicate = dedup.check(task.id, text)
            if duplicate is not None:
                body.decision, body.duplicate_of = "duplicate", duplicate
                return body
            # A paraphrase of a kept sample, by embedding cosine, before the reviews too.
            if await self._paraphrase(task, body, text, {}):
                return body
            self._record(task, "generated", body)
            # The seed's calls keep the slots of a run's task; each rewrite gets its own.
            await self._judge(task, team, body, f"rw{rewrites}/" if rewrites else "")
            if body.decision == "accept" or rewrites >= self._max_rewrites:
                break
            rewrites += 1
            try:
                body = await self._rewrite(task, team, body, rewrites)
            except TaskFailed as exc:
                # No valid rewrite: the seed stays rejected, as its panel decided.
                body.reason = f"no rewrite: {exc}"
                break
        if body.decision == "accept" and self._config.metadata.enabled:
            await self._describe(task, body, team.generator)
        return body

    async def _rewrite(self, task: Task, team: Assignment, rejected: SampleBody,
                       number: int) -> SampleBody:
        """The generator's rewrite of a rejected version, shown what its reviewers said."""
        views = [ReviewView(f"Reviewer {i + 1}", r.scores, r.feedback)
                 for i, r in enumerate(rejected.reviews)]
        messages = self._prompts.rewrite(rejected.instruction, rejected.response, views,
                                         self._config.gate.criteria)

        def parse(text: str) -> GeneratedSample:
            sample = parse_generation(text)
            # At temperature 0 a small model may hand the sample back as it was: reviewing
            # it again would pay for the same rejection.
            if _same(sample.instruction, rejected.instruction) and _same(sample.response,
                                                                         rejected.response):
                raise InvalidReply("the rewrite is the rejected sample unchanged", text)
            return sample

        sample, reply = await self._caller.structured(
            task, "generator", team.generator, messages, parse, f"rw{number}/gen")
        return SampleBody(instruction=sample.instruction, response=sample.response,
                          generator=team.generator,
                          tokens=rejected.tokens + reply.prompt_tokens + reply.completion_tokens,
                          source_id=rejected.source_id, origin="rewritten", rewrites=number)
