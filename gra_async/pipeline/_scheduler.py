"""The run that drives thousands of tasks at once: rounds, admission, and one cancel scope.

Each round is one task group. Stopping it early (the target is met, a second Ctrl-C, the
grace after a first one is over) is the group's own cancellation: a watcher task in the
group raises `_Abandoned`, the group cancels every task it owns and waits for them, and
each cancelled task puts its sample back to `planned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice

import orjson

from gra_async import defaults
from gra_async._concurrency import Slots, first_error, thread_until_done
from gra_async.accounting import failure_kind, spend
from gra_async.client import Transport
from gra_async.config import EMBEDDER, RunConfig
from gra_async.dedup import Deduplicator
from gra_async.errors import (
    BadRequestError,
    GraError,
    RetriesExhausted,
    Stalled,
    TaskFailed,
    TaskParked,
)
from gra_async.pipeline._batch import BatchWaves
from gra_async.pipeline._budget import Budget, OverBudget
from gra_async.pipeline._calls import Caller
from gra_async.pipeline._embed import Embedder, SemanticCheck
from gra_async.pipeline._progress import Progress
from gra_async.pipeline._records import SampleBody, sample_record
from gra_async.pipeline._refine import RefineSteps
from gra_async.pipeline._steps import Filter, Gate, TaskSteps, dedup_text
from gra_async.planner import Planner, Task
from gra_async.prompts import PromptSet
from gra_async.seeds import Seed
from gra_async.semantic import EmbeddingIndex
from gra_async.store import FinishedTasks, Journal
from gra_async.team import Team

__all__ = ["Pipeline", "plan_size"]

log = logging.getLogger("gra_async")


class _Withdrawn(Exception):
    """The target was met while this task ran: it goes back to `planned`, unrecorded."""


class _Abandoned(Exception):
    """Raised inside a round's task group to cancel everything it owns."""


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
        *,
        filters: Sequence[Filter] = (),
        gate: Gate | None = None,
        transport: Transport | None = None,
        max_rewrites: int | None = None,
    ) -> None:
        """With an embedder in `team` and `config.semantic_dedup`, `dedup.semantic` is set
        here to the embedding index the semantic stage fills."""
        self.config = config
        self.team = team
        self.planner = planner
        self.journal = journal
        self.dedup = dedup
        self.progress = Progress(target=config.run.target, prices=dict(team.prices),
                                 batch_prices=dict(team.batch_prices))
        self.budget = Budget(config.run.max_cost, team.prices)
        self._caller = Caller(config, team, journal, self.progress, self.budget)
        self._waves: BatchWaves | None = None
        if config.run.mode == "batch":
            if transport is None:
                raise ValueError("batch mode needs the run's transport")
            self._waves = BatchWaves(config, team, journal, self.progress, self.budget,
                                     transport, lambda: self._running)
            self._caller.waves = self._waves
        self.semantic: SemanticCheck | None = None
        embedders = team.pools.get(EMBEDDER)
        if embedders is not None and config.semantic_dedup:
            planner_config = config.planner
            embedder = Embedder(embedders, embedders.models[0], journal, self.progress,
                                self._caller.slots, batch=planner_config.embed_batch,
                                prefix=planner_config.embed_prefix)
            index = EmbeddingIndex()
            dedup.semantic, dedup.semantic_threshold = index, planner_config.semantic_threshold
            self.semantic = SemanticCheck(embedder, index, planner_config.semantic_threshold)
        # `refine` (max_rewrites set): each task's sample is a seed, reviewed and rewritten.
        self._steps = (TaskSteps(config, team, prompts, planner, journal, self._caller,
                                 self.progress, self._dedup_index, filters=filters, gate=gate,
                                 semantic=self.semantic)
                       if max_rewrites is None else
                       RefineSteps(config, team, prompts, planner, journal, self._caller,
                                   self.progress, self._dedup_index, gate=gate,
                                   semantic=self.semantic, max_rewrites=max_rewrites))
        self._finished = FinishedTasks()
        self._goal = 0
        self._stopping = False
        self._grace: float | None = config.run.grace
        self._abandoned = False
        self._signal = asyncio.Event()  # stop() or abandon() was called
        self._index_ready = asyncio.Event()
        self._parked: deque[Task] = deque()
        # Tasks that got a 400, with the calls completed by then: a second 400 is the
        # task's own only if other calls have succeeded since (the endpoint works).
        self._bad_requests: dict[str, int] = {}
        self._running = 0  # tasks admitted and not yet finished, this round
        self._changed = asyncio.Event()  # a task finished or parked: admission looks again
        self._abandoned_before = self._abandoned_tokens_before = 0
        reads = [e.config.read_timeout for p in team.stats_pools() for e in p.endpoints]
        self._stall_timeout = config.run.stall_timeout or max(defaults.STALL_MIN,
                                                              2 * max(reads, default=0.0))

    # --- control ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def resume_state(self) -> None:
        """Load what the journal already holds: finished tasks, replies of unfinished ones."""
        self._finished = self.journal.finished_tasks()
        self._caller.reuse(self.journal.unfinished_calls())
        counts = self.journal.state_counts()
        progress = self.progress
        progress.accepted = counts["accepted"]
        progress.rejected, progress.failed = counts["rejected"], counts["failed"]
        progress.accepted_at_start = progress.accepted
        progress.failed_at_start = progress.failed
        progress.finished_at_start = len(self._finished)
        spent = spend(self.journal.spend_rows(), self.team.prices, self.team.batch_prices)
        self.budget = Budget(self.config.run.max_cost, self.team.prices, spent=spent)
        self._caller.budget = self.budget
        if self._waves is not None:
            self._waves.budget = self.budget
            batches = self.journal.open_batches()
            keys = {key for record in batches for key, _, _ in record.calls}
            self._waves.resume(batches, self.journal.journaled(keys))
        # Calls cut off in flight by earlier sessions: counted at their end, and one per
        # task that a kill -9 left mid-way (at least one call was in flight there).
        self._abandoned_before = (int(self.journal.meta("abandoned_calls") or 0)
                                  + self.journal.reset_at_open)
        self._abandoned_tokens_before = int(self.journal.meta("abandoned_tokens") or 0)

    def stop(self, grace: float | None = None) -> None:
        """Stop admitting tasks; tasks in flight get `grace` seconds (default `run.grace`,
        `math.inf` to wait for all of them), then they are abandoned."""
        self._stopping = True
        if grace is not None:
            self._grace = grace
        self._signal.set()

    def abandon(self) -> None:
        """Cancel the tasks in flight now; their samples go back to `planned`."""
        self._abandoned = True
        self._signal.set()

    # --- the run ---------------------------------------------------------------------

    async def run(self) -> Progress:
        """Every round until the target, the plan's end or a stop. A fatal error (a 401
        mid-run) cancels the tasks in flight and is raised alone."""
        try:
            async with asyncio.TaskGroup() as group:
                # The index reloads (~0.3 s per 100,000 samples) while the first calls are
                # in flight; tasks wait for it only at their dedup step.
                group.create_task(self._fill_index())
                waves = None if self._waves is None else group.create_task(self._waves.run())
                for rnd in range(1, self.config.run.rounds + 1):
                    if self._stopping:
                        break
                    if rnd > 1:
                        await self._grow_pool(rnd)
                    self._goal = math.ceil(self.config.run.target * rnd / self.config.run.rounds)
                    if self.progress.accepted < self._goal:
                        await self._run_round(rnd)
                if waves is not None:
                    waves.cancel()
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        finally:
            self._record_abandoned()
        return self.progress

    def _record_abandoned(self) -> None:
        stats = self.team.stats()
        calls = self._abandoned_before + sum(s.abandoned for s in stats)
        tokens = self._abandoned_tokens_before + sum(s.abandoned_tokens for s in stats)
        with contextlib.suppress(GraError):  # a journal that failed says so on close
            self.journal.set_meta("abandoned_calls", str(calls))
            self.journal.set_meta("abandoned_tokens", str(tokens))
        self._record_endpoints()

    def _record_endpoints(self) -> None:
        """This session's endpoint statistics, for `status` (which reads only the journal)."""
        rows = [{"endpoint": s.label, "roles": list(s.roles), "health": s.health,
                 "in_flight": s.in_flight, "succeeded": s.succeeded, "failed": s.failed,
                 "retries": s.retries, "rate_limited": s.rate_limited, "timeouts": s.timeouts,
                 "latency_mean": round(s.latency_mean, 4), "last_error": s.last_error}
                for s in self.team.stats()]
        with contextlib.suppress(GraError):
            self.journal.set_meta("endpoints", orjson.dumps(rows).decode())

    async def _fill_index(self) -> None:
        missing = await thread_until_done(self._fill_dedup)
        if self.semantic is not None and missing:
            log.info("semantic dedup: embedding %d accepted samples the journal has no "
                     "vector of", len(missing))
            await self.semantic.embed_missing(missing)
        self._index_ready.set()

    def _fill_dedup(self, stop: threading.Event) -> list[tuple[str, str]]:
        """Reload the index from the journal; index accepted samples it lacks (none, unless
        the journal was made with another dedup layout). The embedding index reloads the
        vectors journaled; the accepted samples without one are returned, to embed."""
        self.dedup.load()
        for record in self.journal.accepted(unindexed=True):
            if stop.is_set():
                return []
            body = record.body
            self.dedup.add(record.task_id, dedup_text(body["instruction"], body["response"]))
            self.journal.commit_fingerprint(record.task_id)
        if self.semantic is None:
            return []
        accepted = ((r.task_id, dedup_text(r.body["instruction"], r.body["response"]))
                    for r in self.journal.accepted())
        return self.semantic.reload(accepted, stop)

    async def _dedup_index(self) -> Deduplicator:
        await self._index_ready.wait()
        return self.dedup

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
        if self._waves is not None:  # a batch holds a whole slice, whatever the concurrency
            limit = self.config.run.max_in_flight or self.config.batch.slice
        admit = Slots(limit)
        self._abandoned = False
        self._parked.clear()  # left from an earlier round: planned still, for a later session
        try:
            async with asyncio.TaskGroup() as scope:
                watchers = (scope.create_task(self._watch()), scope.create_task(self._stall_watch()))
                async with asyncio.TaskGroup() as tasks:
                    await self._admit(rnd, admit, tasks)
                for watcher in watchers:
                    watcher.cancel()
        except BaseExceptionGroup as group:
            _, errors = group.split(_Abandoned)
            if errors is not None:
                # A fatal error in one task (a 401 mid-run) cancelled the others: surface it alone.
                raise first_error(errors) from None

    async def _watch(self) -> None:
        """The round's cancel scope: raises once abandon() is called, or once the grace
        after stop() is over."""
        while True:
            await self._signal.wait()
            self._signal.clear()
            if self._abandoned:
                break
            if self._stopping:
                grace = None if self._grace is None or math.isinf(self._grace) else self._grace
                try:
                    async with asyncio.timeout(grace):
                        while not self._abandoned:
                            await self._signal.wait()
                            self._signal.clear()
                except TimeoutError:
                    log.info("grace of %ss over: abandoning the calls in flight", grace)
                break
        raise _Abandoned

    async def _stall_watch(self) -> None:
        """Stop the run when tasks wait and no call has completed for `stall_timeout` s:
        every endpoint down or timing out is then the user's to look at, not ours to hide."""
        stall = self._stall_timeout
        while True:
            await asyncio.sleep(min(stall / 10, 5.0))
            self._record_endpoints()
            idle = time.monotonic() - self.progress.last_activity
            if self._running and idle > stall:
                states = "; ".join(
                    f"{s.label}: {s.health}" + (f" ({s.last_error})" if s.last_error else "")
                    + (f", {s.timeouts} timeouts" if s.timeouts else "")
                    for s in self.team.stats())
                raise Stalled(f"stalled: no call completed for {idle:.0f} s with {self._running} "
                              f"tasks waiting ({states}); run the same command again to resume")

    async def _admit(self, rnd: int, admit: Slots, tasks: asyncio.TaskGroup) -> None:
        """The round's plan, then the tasks parked along the way, until the goal or a stop."""
        tasks_of_round = self.planner.tasks(rnd, shard=self.config.run.shard_parts)
        plan = (t for t in islice(tasks_of_round, plan_size(self.config))
                if (t.round, t.index) not in self._finished)
        in_slice = 0
        while True:
            task = self._parked.popleft() if self._parked else next(plan, None)
            if task is None:
                if not self._running:
                    return
                self._changed.clear()
                await self._changed.wait()  # a parked task may come back
                continue
            if self._waves is not None and in_slice >= self.config.batch.slice:
                # Batch mode: the next slice starts when this one is done, so each wave
                # holds one step of every task of a slice.
                while self._running:
                    self._changed.clear()
                    await self._changed.wait()
                in_slice = 0
            await self._room(admit)
            if self._stopping or self.progress.accepted >= self._goal:
                admit.release()
                return
            in_slice += 1
            self._running += 1
            tasks.create_task(self._run_task(task, admit))

    async def _room(self, admit: Slots) -> None:
        """A slot for one more task, and no more tasks in flight than the goal still needs
        at the acceptance rate seen so far (x1.5): what is in flight when the goal is met
        is cancelled, and a gateway may bill it anyway. The rate starts at 1/2 (Laplace's
        rule: (accepted + 1) / (finished + 2)) and follows what the session sees."""
        await admit.acquire()
        progress = self.progress
        while True:
            finished = progress.finished - progress.finished_at_start
            accepted = progress.accepted - progress.accepted_at_start
            needed = max(self._goal - progress.accepted, 0)
            if self._running < math.ceil(1.5 * needed * (finished + 2) / (accepted + 1)):
                return
            self._changed.clear()
            await self._changed.wait()

    async def _run_task(self, task: Task, admit: Slots) -> None:
        self.progress.in_progress += 1
        parked = False
        try:
            self._finish(task, await self._steps.run(task))
        except _Withdrawn:
            self.journal.forget_sample(task.id)
        except OverBudget as exc:
            # Back to `planned` with its replies kept: a rerun with a higher --max-cost
            # goes on from here. The tasks in flight may finish: their calls are paid for.
            log.info("task %s stopped at the budget: %s", task.id, exc)
            self.journal.forget_sample(task.id)
            self._caller.keep(task.id)
            parked = True
            if not self._stopping:
                self.stop(math.inf)
        except asyncio.CancelledError:
            self.journal.forget_sample(task.id)
            raise
        except (RetriesExhausted, TaskParked) as exc:
            parked = self._park(task, exc)
        except BadRequestError as exc:
            # A 400 may be the endpoint's (a gateway that lost its key store answers every
            # call so): the task runs again, and a 400 is its own only once other calls
            # have succeeded in between. If every call gets the same 400, the breaker
            # stops the run instead.
            before = self._bad_requests.get(task.id)
            if before is not None and self.progress.calls_sent > before:
                self._fail(task, exc)
            else:
                self._bad_requests[task.id] = self.progress.calls_sent
                parked = self._park(task, exc)
        except TaskFailed as exc:
            self._fail(task, exc)
        finally:
            if self.semantic is not None:  # an accepted sample's vector is in the index now
                self.semantic.discard(task.id)
            self.progress.in_progress -= 1
            self._running -= 1
            if not parked:  # a parked task made no progress: the stall watchdog still counts
                self._caller.done(task.id)
                self.progress.last_activity = time.monotonic()
            self._changed.set()
            admit.release()

    def _park(self, task: Task, error: Exception) -> bool:
        log.info("task %s parked: %s", task.id, error)
        self.journal.forget_sample(task.id)
        self._caller.keep(task.id)
        self._parked.append(task)
        self.progress.parked += 1
        return True

    def _fail(self, task: Task, error: Exception) -> None:
        reason = str(error)
        kind = failure_kind(reason)
        self._record(task, "failed", SampleBody(decision="failed", reason=reason, failure=kind))
        self.progress.failures[kind] += 1
        self.progress.failed += 1

    def _finish(self, task: Task, body: SampleBody) -> None:
        """Synchronous on the loop: the target check and the dedup insert cannot interleave."""
        if body.decision == "accept":
            if self.progress.accepted >= self._goal:
                raise _Withdrawn
            duplicate = self.dedup.find_and_add(task.id, dedup_text(body.instruction, body.response))
            if duplicate is not None:
                body.decision, body.duplicate_of = "duplicate", duplicate.key
                body.similarity = duplicate.similarity
        progress = self.progress
        if body.decision == "accept":
            self._record(task, "accepted", body)
            progress.accepted += 1
            if progress.accepted >= self._goal:
                self.abandon()
            return
        self._record(task, "rejected", body)
        progress.rejected += 1
        progress.rejections[str(body.decision)] += 1
        if body.decision == "duplicate":
            progress.duplicates += 1
        elif body.decision == "filtered":
            progress.filtered += 1

    def _record(self, task: Task, state: str, body: SampleBody) -> None:
        self.journal.record_sample(sample_record(task, state, body))

