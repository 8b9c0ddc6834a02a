"""Batch mode: the calls of the tasks in flight gathered into waves for the provider's Batch API.

Tasks run their steps as online; only where a call goes differs. Each call joins the
pending wave and waits. Once every running task waits on a call (or the wave is full),
the wave goes out: one input file and one batch per model (split at the provider's line
and byte limits), `custom_id` = the call's journal key. A slice's generations therefore
go as one wave, then their reviews, then their adjudications.

Crash safety: the journal holds each uploaded file (and the calls in it) before its batch
is created, and the batch id before it is polled. A rerun polls what is journaled and
never sends those calls again (a file whose batch id was lost is looked up by its id
among the provider's batches first). Replies are journaled as online ones are; a batch is
marked read only after them.

Lines that fail (error file, a non-200 `status_code`, missing from an expired or cancelled
batch) go to the next wave, at most `max_retries` times; a 4xx is the request's own and
fails at once, as online.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gra_async.accounting import BATCH_ENDPOINT_SUFFIX
from gra_async.client import ChatRequest, RetryPolicy, Transport
from gra_async.client.batch import BatchApi, BatchLine, BatchStatus, parse_lines, request_line
from gra_async.config import EndpointConfig, RunConfig
from gra_async.errors import BadRequestError, GraError, RetriesExhausted, TaskFailed
from gra_async.pipeline._budget import Budget, Reservation
from gra_async.pipeline._progress import Progress
from gra_async.store import BATCH_READ, BatchRecord, CallRecord, Journal
from gra_async.team import Team

__all__ = ["BatchWaves"]

log = logging.getLogger("gra_async")

# Seconds between looks at whether every running task waits; two looks in a row must agree,
# so the reviews of one task, started one after the other, land in the same wave.
_SETTLE = 0.05
_RETRY_STATUSES = frozenset({408, 409, 429})


@dataclass(slots=True)
class _Entry:
    key: str
    task_id: str
    role: str
    model: str
    request: ChatRequest | None  # None: submitted by an earlier session, not asked for yet
    held: Reservation | None
    attempts: int = 0
    line: bytes = b""


class BatchWaves:
    def __init__(
        self, config: RunConfig, team: Team, journal: Journal, progress: Progress,
        budget: Budget, transport: Transport, running: Callable[[], int],
        policy: RetryPolicy | None = None,
    ) -> None:
        self._config = config
        self._batch = config.batch
        self._team = team
        self._journal = journal
        self._progress = progress
        self.budget = budget
        self._running = running
        self._policy = policy or RetryPolicy()
        self._apis: dict[str, BatchApi] = {}
        self._discounts: dict[str, float] = {}
        self._labels: dict[str, str] = {}
        for pool in team.stats_pools():
            for endpoint in pool.endpoints:
                if endpoint.model not in self._apis:
                    cfg: EndpointConfig = endpoint.config
                    self._apis[endpoint.model] = BatchApi(cfg, transport, policy=self._policy)
                    self._discounts[endpoint.model] = cfg.batch_discount
                    self._labels[endpoint.model] = endpoint.label
        self._pending: list[_Entry] = []
        self._waiters: dict[str, asyncio.Future[CallRecord]] = {}
        self._arrived: dict[str, CallRecord] = {}
        self._submitted: dict[str, _Entry] = {}  # in a batch at the provider
        self._waiting: Counter[str] = Counter()  # task id -> its calls waiting here
        self._resumed: list[BatchRecord] = []
        self._group: asyncio.TaskGroup | None = None
        self._files = 0

    # --- what the scheduler and the caller use --------------------------------------

    def resume(self, records: Iterable[BatchRecord], journaled: set[str]) -> None:
        """Batches earlier sessions submitted: their calls are awaited, never sent again."""
        for record in records:
            self._resumed.append(record)
            for key, task_id, role in record.calls:
                if key not in journaled:
                    self._submitted[key] = _Entry(key, task_id, role, record.model, None, None)

    def discount(self, model: str) -> float:
        return self._discounts.get(model, 1.0)

    async def call(
        self, task_id: str, role: str, model: str, key: str, request: ChatRequest,
    ) -> CallRecord:
        """The reply to this call, from the wave it joins (or the batch it is in already)."""
        arrived = self._arrived.pop(key, None)
        if arrived is not None:
            return arrived
        self._waiting[task_id] += 1
        entry: _Entry | None = None
        try:
            submitted = self._submitted.get(key)
            if submitted is not None:
                submitted.request = request  # should it fail, it goes to the next wave
            else:
                held = await self.budget.reserve(model, request, discount=self.discount(model))
                entry = _Entry(key, task_id, role, model, request, held)
                entry.line = request_line(key, model, request)
                self._pending.append(entry)
            future: asyncio.Future[CallRecord] = asyncio.get_running_loop().create_future()
            self._waiters[key] = future
            return await future
        except asyncio.CancelledError:
            if entry is not None and entry in self._pending:
                self._pending.remove(entry)
                if entry.held is not None:
                    self.budget.release(entry.held)
            raise
        finally:
            self._waiters.pop(key, None)
            self._waiting[task_id] -= 1
            if self._waiting[task_id] <= 0:
                del self._waiting[task_id]

    async def run(self) -> None:
        """Send waves until cancelled; the batches of earlier sessions are followed first."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for record in self._resumed:
                group.create_task(self._resume(record))
            self._resumed = []
            agreed = 0
            while True:
                await asyncio.sleep(_SETTLE)
                if not self._pending:
                    agreed = 0
                    continue
                full = len(self._pending) >= self._batch.max_lines
                agreed = agreed + 1 if len(self._waiting) >= self._running() else 0
                if full or agreed >= 2:
                    agreed = 0
                    self._flush()

    # --- waves -----------------------------------------------------------------------

    def _flush(self) -> None:
        assert self._group is not None
        entries, self._pending = self._pending, []
        if len(entries) < self._batch.min_size and self._batch.online_tail:
            for entry in entries:
                self._group.create_task(self._online(entry))
            return
        by_model: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_model.setdefault(entry.model, []).append(entry)
        for model, group in by_model.items():
            for chunk in self._chunks(group):
                self._group.create_task(self._wave(model, chunk))

    def _chunks(self, entries: list[_Entry]) -> Iterable[list[_Entry]]:
        """The provider's limits per batch: lines, and bytes of the input file."""
        chunk: list[_Entry] = []
        size = 0
        for entry in entries:
            if chunk and (len(chunk) >= self._batch.max_lines
                          or size + len(entry.line) + 1 > self._batch.max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry.line) + 1
        if chunk:
            yield chunk

    async def _wave(self, model: str, entries: list[_Entry]) -> None:
        api = self._apis[model]
        data = b"\n".join(e.line for e in entries) + b"\n"
        self._files += 1
        try:
            file_id = await api.upload(data, f"gra-{model}-{self._files}.jsonl")
        except GraError as exc:
            self._fail_all(entries, exc)
            return
        record = BatchRecord(file_id, None, self._labels[model], model,
                             tuple((e.key, e.task_id, e.role) for e in entries), "uploaded", {})
        self._journal.record_batch_file(record)
        await self._journal.flush()
        for entry in entries:
            self._submitted[entry.key] = entry
        try:
            status = await self._create(api, file_id)
        except GraError as exc:
            self._journal.record_batch_state(file_id, status=BATCH_READ)
            self._fail_all(entries, exc)
            return
        await self._follow(api, file_id, status, {e.key: e for e in entries})

    async def _create(self, api: BatchApi, file_id: str) -> BatchStatus:
        try:
            status = await api.create(file_id, self._batch.completion_window,
                                      {"gra_file": file_id})
        except RetriesExhausted:
            # The create may have landed before its answer was lost: never twice.
            found = await api.find(file_id)
            if found is None:
                raise
            status = found
        self._journal.record_batch_state(file_id, batch_id=status.id, status=status.status)
        await self._journal.flush()
        log.info("%s: batch %s submitted", api.label, status.id)
        return status

    async def _resume(self, record: BatchRecord) -> None:
        api = self._apis.get(record.model)
        entries = {key: self._submitted[key] for key, _, _ in record.calls if key in self._submitted}
        if api is None:
            log.warning("batch %s of %s: that model is no longer configured; its calls will "
                        "be sent again", record.batch_id or record.file_id, record.model)
            self._drop(entries)
            self._journal.record_batch_state(record.file_id, status=BATCH_READ)
            return
        try:
            if record.batch_id is None:
                found = await api.find(record.file_id)
                status = found if found is not None else await self._create(api, record.file_id)
            else:
                status = BatchStatus(id=record.batch_id, status="validating",
                                     input_file_id=record.file_id)
        except GraError as exc:
            log.warning("batch of %s: cannot resume (%s); its calls will be sent again",
                        record.file_id, exc)
            self._drop(entries)
            return
        await self._follow(api, record.file_id, status, entries)

    def _drop(self, entries: dict[str, _Entry]) -> None:
        for key, entry in entries.items():
            self._submitted.pop(key, None)
            if entry.request is not None:
                self._again(entry)

    async def _follow(
        self, api: BatchApi, file_id: str, status: BatchStatus, entries: dict[str, _Entry],
    ) -> None:
        started = time.monotonic()

        def seen(now: BatchStatus) -> None:
            self._progress.last_activity = time.monotonic()  # a batch that moves is no stall
            counts = now.request_counts.model_dump() if now.request_counts else None
            self._journal.record_batch_state(file_id, status=now.status, counts=counts)

        try:
            final = status if status.done else await api.poll(
                status.id, first=self._batch.poll_interval, longest=self._batch.poll_max,
                seen=seen)
            lines: dict[str, BatchLine] = {}
            for result in (final.output_file_id, final.error_file_id):
                if result is not None:
                    for read in parse_lines(await api.content(result)):
                        lines[read.custom_id] = read
        except GraError as exc:
            # A refused key or a removed model: the run stops as it would online.
            for key in entries:
                self._submitted.pop(key, None)
            self._fail_all(list(entries.values()), exc)
            return
        elapsed = time.monotonic() - started
        label = self._labels.get(entries[next(iter(entries))].model, api.label) if entries else ""
        for key, entry in entries.items():
            self._submitted.pop(key, None)
            line = lines.get(key)
            if line is None:
                self._retry(entry, f"missing from the {final.status} batch {final.id}", None)
            elif line.response is None or line.response.status_code != 200:
                code = line.response.status_code if line.response is not None else None
                why = (line.error.message or line.error.code) if line.error else f"HTTP {code}"
                self._retry(entry, f"batch {final.id}: {why}", code)
            else:
                self._deliver(entry, line.response.body, label, elapsed)
        counts = final.request_counts.model_dump() if final.request_counts else None
        self._journal.record_batch_state(file_id, status=BATCH_READ, counts=counts)

    def _deliver(self, entry: _Entry, body: Any, label: str, elapsed: float) -> None:
        try:
            choice = body["choices"][0]
            content = choice["message"]["content"]
            usage = body.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens", 0)), int(
                usage.get("completion_tokens", 0))
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            self._retry(entry, "a batch reply that is not a chat completion", None)
            return
        record = CallRecord(entry.key, entry.task_id, entry.role, entry.model,
                            label + BATCH_ENDPOINT_SUFFIX, content,
                            str(choice.get("finish_reason") or "stop"), prompt, completion,
                            elapsed, entry.attempts + 1)
        held = entry.held or Reservation(entry.model, 0.0, max(1, prompt))
        self.budget.settle(held, prompt, completion, discount=self.discount(entry.model))
        self._hand_over(record)

    def _hand_over(self, record: CallRecord) -> None:
        """Journal a reply, then give it to the task waiting on it, or keep it for the task
        that will ask (a batch of an earlier session answers before its tasks run)."""
        self._journal.record_call(record)
        self._progress.last_activity = time.monotonic()
        future = self._waiters.get(record.key)
        if future is not None and not future.done():
            future.set_result(record)
        else:
            self._arrived[record.key] = record

    def _retry(self, entry: _Entry, reason: str, status: int | None) -> None:
        label = self._labels.get(entry.model, entry.model)
        if status is not None and status < 500 and status not in _RETRY_STATUSES:
            self._fail(entry, BadRequestError(f"{label}: HTTP {status} ({reason})",
                                              endpoint=label, status=status, message=reason))
            return
        entry.attempts += 1
        if entry.attempts > self._policy.max_retries:
            # The provider ran this line and failed it every time: unlike an endpoint that
            # does not answer, waiting gives no other answer, so the task fails (bounded).
            self._fail(entry, TaskFailed(
                f"{label}: batch line failed {entry.attempts} times: {reason}"))
            return
        log.info("%s: %s; to the next wave", label, reason)
        self._again(entry)

    def _again(self, entry: _Entry) -> None:
        if entry.request is None:  # nobody asked for it this session: asked again if needed
            return
        if not entry.line:
            entry.line = request_line(entry.key, entry.model, entry.request)
        self._pending.append(entry)

    def _fail(self, entry: _Entry, error: Exception) -> None:
        if entry.held is not None:
            self.budget.release(entry.held)
        future = self._waiters.get(entry.key)
        if future is not None and not future.done():
            future.set_exception(error)

    def _fail_all(self, entries: list[_Entry], error: GraError) -> None:
        """The upload or the batch failed whole: each call's task gets the error, as online
        (a transient one parks the task; a refused key stops the run)."""
        for entry in entries:
            self._fail(entry, error)

    async def _online(self, entry: _Entry) -> None:
        """A wave too small for a batch (`batch.online_tail`): sent as online calls are."""
        assert entry.request is not None
        if entry.held is not None:
            self.budget.release(entry.held)
        try:
            held = await self.budget.reserve(entry.model, entry.request)
        except Exception as exc:  # OverBudget: the task goes back, as online
            self._fail(_Entry(entry.key, entry.task_id, entry.role, entry.model, None, None), exc)
            return
        try:
            # A metadata call is the generator model's: it goes to the generator pool.
            pool = self._team.pools.get(entry.role) or self._team.pools["generator"]  # type: ignore[call-overload]
            reply = await pool.chat(entry.request, model=entry.model)
        except GraError as exc:
            self.budget.release(held)
            self._fail(_Entry(entry.key, entry.task_id, entry.role, entry.model, None, None), exc)
            return
        self.budget.settle(held, reply.prompt_tokens, reply.completion_tokens)
        record = CallRecord(entry.key, entry.task_id, entry.role, entry.model, reply.endpoint,
                            reply.content, reply.finish_reason, reply.prompt_tokens,
                            reply.completion_tokens, reply.latency, reply.attempts)
        self._hand_over(record)
