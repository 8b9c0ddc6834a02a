"""One task's life, and the run that drives thousands of them at once.

generate -> review x R (in parallel) -> aggregate -> accept | reject | adjudicate -> dedup.

Every model call goes through `_call`: a call whose key is in the journal is answered
from it (resume); otherwise it waits for a run-wide slot (`--concurrency`), goes to the
role's pool, and its reply is journaled before it is used. A task holds no slot while it
parses or waits for its reviewers, so steps depending on each other never idle the slots.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

from gra_async.accounting import failure_kind, token_cost
from gra_async.client import ChatRequest, EndpointPool
from gra_async.config import Role, RunConfig
from gra_async.dedup import Deduplicator, copied_from
from gra_async.errors import BadRequestError, GraError, RetriesExhausted
from gra_async.planner import Planner, Task
from gra_async.prompts import PromptSet, ReviewView
from gra_async.scoring import (
    Decision,
    InvalidReply,
    Review,
    aggregate,
    decide,
    generation_schema,
    parse_generation,
    parse_review,
    parse_verdict,
    response_format,
    review_schema,
    verdict_schema,
)
from gra_async.seeds import Seed
from gra_async.store import CallRecord, FinishedTasks, Journal, SampleRecord, call_key
from gra_async.team import Team

__all__ = ["Pipeline", "Progress", "plan_size"]

T = TypeVar("T")


class TaskFailed(GraError):
    """This task cannot produce a sample; it is recorded as failed with the reason."""


class _Withdrawn(Exception):
    """The target was met while this task ran: it goes back to `planned`, unrecorded."""


@dataclass(slots=True)
class Progress:
    """Counters the progress display and the final summary read; mutated on the loop only."""

    target: int
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    duplicates: int = 0
    adjudicated: int = 0
    in_progress: int = 0
    calls_sent: int = 0
    calls_reused: int = 0
    accepted_at_start: int = 0  # from the journal, so rates count this session's work only
    finished_at_start: int = 0
    started: float = field(default_factory=time.monotonic)
    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (role, model, in|out)
    failures: Counter[str] = field(default_factory=Counter)
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> per 1M in/out

    @property
    def finished(self) -> int:
        return self.accepted + self.rejected + self.failed

    def cost(self) -> float | None:
        """This session's spend from the configured prices; None when no price is set."""
        return token_cost(self.tokens, self.prices)


def plan_size(config: RunConfig) -> int:
    """Tasks planned per round: enough for the target at a 10% acceptance rate."""
    per_round = math.ceil(config.run.target / config.run.rounds)
    return config.run.max_tasks or max(10 * per_round, 10)


class Pipeline:
    def __init__(
        self,
        config: RunConfig,
        team: Team,
        prompts: PromptSet,
        planner: Planner,
        journal: Journal,
        dedup: Deduplicator,
    ) -> None:
        self.config = config
        self.team = team
        self.prompts = prompts
        self.planner = planner
        self.journal = journal
        self.dedup = dedup
        self._slots = asyncio.Semaphore(config.run.concurrency)
        self._cache: dict[str, CallRecord] = {}
        self._finished = FinishedTasks()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._goal = 0
        self._dedup_filled: asyncio.Future[None]
        gen = config.generation
        self._schemas = {
            "generator": generation_schema(gen.max_tokens),
            "reviewer": review_schema(config.gate.criteria, gen.review_max_tokens),
            "adjudicator": verdict_schema(gen.verdict_max_tokens),
        }
        self.progress = Progress(target=config.run.target, prices=dict(team.prices))

    # --- the run ---------------------------------------------------------------------

    def resume_state(self) -> None:
        """Load what the journal already holds: finished tasks, replies of unfinished ones."""
        self._finished = self.journal.finished_tasks()
        self._cache = self.journal.unfinished_calls()
        counts = self.journal.state_counts()
        self.progress.accepted = counts["accepted"]
        self.progress.rejected, self.progress.failed = counts["rejected"], counts["failed"]
        self.progress.accepted_at_start = self.progress.accepted
        self.progress.finished_at_start = len(self._finished)

    def stop(self) -> None:
        """Stop admitting tasks (first Ctrl-C); tasks in flight go on."""
        self._stopping = True

    def abandon(self) -> None:
        """Cancel tasks in flight (second Ctrl-C, grace over, or target reached)."""
        for task in list(self._running.values()):
            task.cancel()

    def _fill_dedup(self) -> None:
        """Reload the dedup index from the journal; index accepted samples it lacks (none,
        unless the journal was made with another dedup layout)."""
        self.dedup.load()
        for record in self.journal.accepted(unindexed=True):
            body = record.body
            self.dedup.add(record.task_id, _dedup_text(body["instruction"], body["response"]))
            self.journal.commit_fingerprint(record.task_id)

    async def _dedup_index(self) -> Deduplicator:
        """The index, once filled: until then only calls go out (resume starts at once)."""
        await self._dedup_filled
        return self.dedup

    async def run(self) -> Progress:
        # A worker thread reloads the dedup index (~0.3 s per 100,000 samples) while the
        # first calls are in flight; tasks wait for it only at their dedup step.
        self._dedup_filled = asyncio.ensure_future(asyncio.to_thread(self._fill_dedup))
        try:
            return await self._run_rounds()
        finally:
            if not self._dedup_filled.done():
                self._dedup_filled.cancel()

    async def _run_rounds(self) -> Progress:
        rounds = self.config.run.rounds
        target = self.config.run.target
        for rnd in range(1, rounds + 1):
            if self._stopping:
                break
            if rnd > 1:
                await self._grow_pool(rnd)
            self._goal = math.ceil(target * rnd / rounds)
            if self.progress.accepted < self._goal:
                await self._run_round(rnd)
        return self.progress

    async def _grow_pool(self, rnd: int) -> None:
        """Accepted samples of earlier rounds join the seed pool, in plan order, streamed
        from the journal (the pool is on disk: a large round costs no memory)."""
        await self.journal.flush()
        seeds = (Seed(r.task_id, str(r.body["instruction"]), str(r.body["response"]), r.domain)
                 for r in self.journal.accepted(before_round=rnd))
        await asyncio.to_thread(self.planner.add_seeds, seeds, rnd)

    async def _run_round(self, rnd: int) -> None:
        # Tasks in flight: by default as many as the endpoints serve at once, so a task's
        # reviews never queue behind hundreds of newer tasks' generation calls.
        limit = self.config.run.max_in_flight or min(self.config.run.concurrency,
                                                     self.team.capacity())
        admit = asyncio.Semaphore(limit)
        try:
            await self._admit(rnd, admit)
        except BaseExceptionGroup as group:
            # A fatal error in one task (e.g. 401 mid-run) cancelled the others; surface it alone.
            raise _first_error(group) from None

    async def _admit(self, rnd: int, admit: asyncio.Semaphore) -> None:
        async with asyncio.TaskGroup() as group:
            for task in islice(self.planner.tasks(rnd), plan_size(self.config)):
                if (task.round, task.index) in self._finished:
                    continue
                await admit.acquire()
                if self._stopping or self.progress.accepted >= self._goal:
                    admit.release()
                    break
                runner = group.create_task(self._run_task(task, admit))
                self._running[task.id] = runner

    async def _run_task(self, task: Task, admit: asyncio.Semaphore) -> None:
        self.progress.in_progress += 1
        try:
            await self._life(task)
        except _Withdrawn:
            self.journal.forget_sample(task.id)
        except asyncio.CancelledError:
            self.journal.forget_sample(task.id)
            raise
        except (TaskFailed, RetriesExhausted, BadRequestError) as exc:
            reason = str(exc)
            kind = failure_kind(reason)
            self._record(task, "failed", {"decision": "failed", "reason": reason, "failure": kind})
            self.progress.failures[kind] += 1
            self.progress.failed += 1
        finally:
            self.progress.in_progress -= 1
            self._running.pop(task.id, None)
            admit.release()

    async def _life(self, task: Task) -> dict[str, Any]:
        gate = self.config.gate
        team = self.team.assign(task.id)
        examples = [self.planner.seed(s) for s in task.seed_ids]
        keywords = self.planner.keywords(task.domain, task.round)
        messages = self.prompts.generator(task.domain, keywords, examples)
        sample, gen_reply = await self._structured(
            task, "generator", team.generator, messages, parse_generation, "gen"
        )
        base: dict[str, Any] = {
            "instruction": sample.instruction,
            "response": sample.response,
            "generator": team.generator,
            "tokens": gen_reply.prompt_tokens + gen_reply.completion_tokens,
        }
        # A copy of one of its own few-shot seeds (what small models do most), or of an
        # accepted sample, is not a new sample: stop before paying for reviews.
        # The instruction alone counts too: a task copied from an example is not new,
        # whatever answer comes with it.
        threshold = self.dedup.threshold
        text = _dedup_text(sample.instruction, sample.response)
        instructions = {f"seed:{s.id}": s.instruction for s in examples}
        wholes = {f"seed:{s.id}": _dedup_text(s.instruction, s.response) for s in examples}
        dup = (copied_from(sample.instruction, instructions, threshold)
               or copied_from(text, wholes, threshold))
        if dup is None:
            dup = (await self._dedup_index()).check(task.id, text)
        if dup is not None:
            return self._finish(task, {**base, **_empty_verdict(), "decision": "duplicate",
                                       "duplicate_of": dup})
        self._record(task, "generated", base)

        review_prompt = self.prompts.reviewer(sample.instruction, sample.response, gate.criteria)
        outcomes = await asyncio.gather(
            *(self._review(task, model, review_prompt) for model in team.reviewers)
        )
        reviews = [r for r in outcomes if "error" not in r]
        failed_reviews = [r for r in outcomes if "error" in r]
        base["tokens"] += sum(int(r.pop("_tokens")) for r in outcomes)
        if team.reviewers and not reviews:
            raise TaskFailed(f"no valid review: {failed_reviews[0]['error']}")
        panel = aggregate([Review(scores=r["scores"], feedback=r["feedback"]) for r in reviews]) if reviews else None
        base |= {
            "reviews": reviews,
            "failed_reviews": failed_reviews,
            "mean": panel.mean if panel else None,
            "std": panel.std if panel else None,
            "adjudication": None,
        }
        decision = decide(panel, gate)
        if decision is Decision.ADJUDICATE and team.adjudicator is not None:
            self._record(task, "adjudicating", base)
            views = [ReviewView(f"Reviewer {i + 1}", r["scores"], r["feedback"])
                     for i, r in enumerate(reviews)]
            messages = self.prompts.adjudicator(sample.instruction, sample.response, views,
                                                gate.criteria)
            verdict, reply = await self._structured(
                task, "adjudicator", team.adjudicator, messages, parse_verdict, "adj"
            )
            base["tokens"] += reply.prompt_tokens + reply.completion_tokens
            base["adjudication"] = {"model": team.adjudicator, "decision": verdict.decision,
                                    "reason": verdict.reason}
            self.progress.adjudicated += 1
            decision = Decision.ACCEPT if verdict.decision == "accept" else Decision.REJECT
        elif decision is Decision.ADJUDICATE:  # no adjudicator endpoint: the mean decides
            decision = Decision.ACCEPT if panel and panel.mean >= gate.accept_mean else Decision.REJECT
        else:
            self._record(task, "reviewed", base)
        base["decision"] = "accept" if decision is Decision.ACCEPT else "reject"
        return self._finish(task, base)

    def _finish(self, task: Task, body: dict[str, Any]) -> dict[str, Any]:
        """Synchronous on the loop: the target check and the dedup insert cannot interleave."""
        if body["decision"] == "accept":
            if self.progress.accepted >= self._goal:
                raise _Withdrawn
            text = _dedup_text(body["instruction"], body["response"])
            dup = self.dedup.check_and_add(task.id, text)
            if dup is not None:
                body |= {"decision": "duplicate", "duplicate_of": dup}
        state = "accepted" if body["decision"] == "accept" else "rejected"
        self._record(task, state, body)
        if state == "accepted":
            self.progress.accepted += 1
            if self.progress.accepted >= self._goal:
                self.abandon()
        elif body["decision"] == "duplicate":
            self.progress.duplicates += 1
            self.progress.rejected += 1
        else:
            self.progress.rejected += 1
        return body

    # --- calls -----------------------------------------------------------------------

    async def _review(self, task: Task, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
        criteria = self.config.gate.criteria
        try:
            review, reply = await self._structured(
                task, "reviewer", model, messages,
                lambda text: parse_review(text, criteria), f"rev/{model}",
            )
        except (TaskFailed, RetriesExhausted, BadRequestError) as exc:
            return {"model": model, "error": str(exc), "_tokens": 0}
        scores = dict(review.scores)
        return {
            "model": model,
            "scores": scores,
            "mean": sum(scores.values()) / len(scores),
            "feedback": review.feedback,
            "_tokens": reply.prompt_tokens + reply.completion_tokens,
        }

    async def _structured(
        self,
        task: Task,
        role: Role,
        model: str,
        messages: list[dict[str, str]],
        parse: Callable[[str], T],
        slot: str,
    ) -> tuple[T, CallRecord]:
        """A call whose reply must parse; an invalid reply is asked again, within a budget."""
        budget = self.config.gate.invalid_reply_retries
        asked, max_tokens = messages, self._max_tokens(role)
        for attempt in range(budget + 1):
            record = await self._call(task, role, model, asked, f"{slot}/{attempt}", max_tokens)
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

    def _max_tokens(self, role: Role) -> int:
        gen = self.config.generation
        return {"generator": gen.max_tokens, "reviewer": gen.review_max_tokens,
                "adjudicator": gen.verdict_max_tokens}[role]

    async def _call(
        self, task: Task, role: Role, model: str, messages: list[dict[str, str]], slot: str,
        max_tokens: int,
    ) -> CallRecord:
        gen = self.config.generation
        temperature = gen.temperature if role == "generator" else gen.review_temperature
        fmt = response_format(f"gra_{role}", self._schemas[role],
                              self.team.json_modes.get(model, "json_schema"))
        params = {"max_tokens": max_tokens, "temperature": temperature, "response_format": fmt}
        key = call_key(role=role, model=model, messages=messages, params=params,
                       task_id=task.id, slot=slot)
        cached = self._cache.pop(key, None)
        if cached is not None:
            self.progress.calls_reused += 1
            return cached
        pool: EndpointPool = self.team.pools[role]
        request = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature,
                              response_format=fmt)
        async with self._slots:
            reply = await pool.chat(request, model=model)
        record = CallRecord(key, task.id, role, model, reply.endpoint, reply.content,
                            reply.finish_reason, reply.prompt_tokens, reply.completion_tokens,
                            reply.latency, reply.attempts)
        self.journal.record_call(record)
        self.progress.calls_sent += 1
        self.progress.tokens[(role, model, "in")] += reply.prompt_tokens
        self.progress.tokens[(role, model, "out")] += reply.completion_tokens
        return record

    def _record(self, task: Task, state: str, body: dict[str, Any]) -> None:
        self.journal.record_sample(
            SampleRecord(task.id, task.round, task.index, state, task.domain, task.seed_ids, body)
        )


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        return error
    return group


def _dedup_text(instruction: str, response: str) -> str:
    """What dedup compares: the sample whole, as every check and every stored entry sees it."""
    return f"{instruction}\n{response}"


def _empty_verdict() -> dict[str, Any]:
    return {"reviews": [], "failed_reviews": [], "mean": None, "std": None, "adjudication": None}

