"""Re-gating: decide a finished run's samples again under another gate, from their journaled reviews.

    summary = gra_async.regate("runs/a", "runs/a-strict", accept_mean=8.0)

The source run is only read (a consistent SQLite backup, safe while it runs). The new run
directory is built beside its place (`DST.partial`) and renamed whole at the end, so a
kill -9 leaves either no DST or a complete one; the adjudications an interrupted regate
paid for stay in `DST.partial` and are reused when the same command runs again.

What is sent: no generator or reviewer call, ever. A sample the new gate sends to the
adjudicator keeps its journaled verdict when it has one; only the rest call the
adjudicator, which needs adjudicator endpoints (else: one line, exit 2, nothing written).
Samples accepted under the new gate go through the MinHash check again in plan order
(those accepted before come first), since a sample once rejected may now duplicate one
accepted later. DST is a normal run directory: `status`, `export`, and `run` with a
higher target and the new gate values resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gra_async._concurrency import block_on, first_error
from gra_async.client import Endpoint, EndpointPool, H1Transport, Transport, probe
from gra_async.config import EndpointConfig, GateConfig, RunConfig
from gra_async.errors import ConfigError, RunDirError, TaskFailed
from gra_async.pipeline import Progress
from gra_async.pipeline._budget import Budget
from gra_async.pipeline._calls import Caller
from gra_async.pipeline._embed import journaled_dedup
from gra_async.pipeline._steps import dedup_text
from gra_async.planner import Task
from gra_async.prompts import PromptSet, ReviewView
from gra_async.scoring import Decision, ScoredReview, aggregate, decide, parse_verdict
from gra_async.store import Journal, JournalReader, SampleRecord
from gra_async.team import Team

__all__ = ["RegateSummary", "regate", "regate_async"]

_PARTIAL = ".partial"


@dataclass(frozen=True, slots=True)
class RegateSummary:
    """What the new gate made of a run: counts of the new run directory, and the calls paid."""

    src: Path
    dst: Path
    gate: GateConfig
    reviewed: int  # samples with a review panel, decided again
    changed: int  # of those, how many got another decision
    accepted: int  # in DST
    rejected: int  # in DST (duplicates included)
    verdicts_reused: int  # disputed under the new gate, with a journaled verdict
    adjudicator_calls: int  # disputed, no verdict: the adjudicator was asked now
    duplicates: int  # newly accepted samples that duplicate an accepted one
    failed: int = 0  # the adjudicator's replies stayed invalid
    decisions: Mapping[str, int] = field(default_factory=dict)

    def explain(self) -> str:
        return (f"{self.dst}: {self.accepted} accepted, {self.rejected} rejected of "
                f"{self.reviewed} reviewed ({self.changed} decided otherwise; "
                f"{self.verdicts_reused} journaled verdicts reused, {self.adjudicator_calls} "
                f"adjudicated now, {self.duplicates} new duplicates)")


@dataclass(slots=True)
class _Outcome:
    record: SampleRecord
    state: str
    body: dict[str, Any]


def _new_gate(snapshot: Mapping[str, Any], overrides: Mapping[str, Any]) -> GateConfig:
    from pydantic import ValidationError

    try:
        return GateConfig.model_validate({**snapshot.get("gate", {}), **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"regate: gate.{key}: {first['msg']}") from None


def _redecide(record: SampleRecord, gate: GateConfig) -> _Outcome | None:
    """The sample under `gate`: its new state and body; `None` when no panel reviewed it
    (nothing to decide again); state "planned" when it needs a verdict it does not have."""
    body = dict(record.body)
    reviews = [ScoredReview(r["model"], r["scores"], r.get("feedback", ""))
               for r in body.get("reviews") or ()]
    if not reviews or record.state not in ("accepted", "rejected"):
        return None
    if body.get("decision") not in ("accept", "reject", "duplicate"):
        return None  # filtered: a user filter's say, not the gate's
    decision = decide(aggregate(reviews), gate)
    body.pop("duplicate_of", None)
    if decision is Decision.ADJUDICATE:
        verdict = body.get("adjudication")
        if verdict is None:
            body["decision"] = None
            return _Outcome(record, "planned", body)
        decision = Decision(verdict["decision"])
    else:
        body["adjudication"] = None
    body["decision"] = decision.value
    return _Outcome(record, "accepted" if decision is Decision.ACCEPT else "rejected", body)


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite file (WAL): what a reader would see, whole."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


async def regate_async(
    src: str | Path, dst: str | Path, *, accept_mean: float | None = None,
    disagreement_std: float | None = None, adjudicator: bool | None = None,
    endpoints: Sequence[EndpointConfig] = (), transport: Transport | None = None,
) -> RegateSummary:
    """Decide `src`'s reviewed samples again under the new gate, into the new run `dst`.

    Unset gate values keep `src`'s. `endpoints` serve the adjudicator for samples that
    become disputed and have no journaled verdict; without them such samples raise
    `ConfigError` before anything is written (or pass `adjudicator=False`: the mean
    decides). Raises `RunDirError` when `src` is no run or `dst` exists.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConfigError(f"regate: --out-run-dir {dst} is the source run; a regate never "
                          "changes its source: name a new directory")
    if dst.exists():
        raise RunDirError(f"{dst}: exists already; pass a new --out-run-dir (a regate writes "
                          "a whole new run directory)")
    reader = JournalReader(src)
    try:
        snapshot = orjson.loads(reader.meta("config") or "{}")
        overrides = {k: v for k, v in (("accept_mean", accept_mean),
                                       ("disagreement_std", disagreement_std),
                                       ("adjudicator", adjudicator)) if v is not None}
        gate = _new_gate(snapshot, overrides)
        reviewed = 0
        outcomes: list[_Outcome] = []  # only the samples whose record changes
        for record in reader.samples():
            outcome = _redecide(record, gate)
            reviewed += outcome is not None
            if outcome is not None and (outcome.state != record.state
                                        or outcome.body != dict(record.body)):
                outcomes.append(outcome)
    finally:
        reader.close()
    pending = [o for o in outcomes if o.state == "planned"]
    reused = sum(1 for o in outcomes if o.state != "planned"
                 and o.body.get("adjudication") is not None)
    if pending and not endpoints:
        raise ConfigError(
            f"regate: {len(pending)} samples become disputed under the new gate and have no "
            "journaled verdict: pass --endpoint adjudicator=MODEL@URL (or --config) so they "
            "can be adjudicated, or --no-adjudicator to let the mean decide them")

    partial = dst.with_name(dst.name + _PARTIAL)
    partial.mkdir(parents=True, exist_ok=True)
    fresh = partial / "journal.sqlite.new"
    _backup(src / "journal.sqlite", fresh)
    _keep_paid_calls(partial / "journal.sqlite", fresh)
    fresh.replace(partial / "journal.sqlite")
    for leftover in ("journal.sqlite-wal", "journal.sqlite-shm"):
        (partial / leftover).unlink(missing_ok=True)
    if (src / "seeds.sqlite").exists():
        _backup(src / "seeds.sqlite", partial / "seeds.sqlite")
    new_snapshot = {**snapshot, "gate": gate.model_dump(mode="json")}
    if new_snapshot["gate"].get("min_reviews") is None:
        new_snapshot["gate"].pop("min_reviews", None)
    _apply(partial, [o for o in outcomes if o.state != "planned"], pending)

    journal = Journal.open(partial, new_snapshot, force=True)
    calls = failed = 0
    try:
        journal.start()
        if pending:
            calls, failed = await _adjudicate(journal, snapshot, gate, pending, endpoints,
                                              transport)
        await journal.flush()
    finally:
        await journal.close()
    duplicates = _dedup_again(partial, snapshot, {o.record.task_id for o in outcomes})
    partial.replace(dst)
    reader = JournalReader(dst)
    try:
        counts = reader.state_counts()
        decisions = {str(d): n for d, n in reader.body_counts("rejected", "decision")}
    finally:
        reader.close()
    return RegateSummary(
        src=src, dst=dst, gate=gate, reviewed=reviewed,
        changed=sum(1 for o in outcomes if o.body.get("decision") != o.record.body.get("decision")),
        accepted=counts["accepted"], rejected=counts["rejected"],
        verdicts_reused=reused,
        adjudicator_calls=calls, duplicates=duplicates, failed=failed,
        decisions={"accept": counts["accepted"], **decisions})


def _keep_paid_calls(partial_journal: Path, fresh: Path) -> None:
    """The adjudications an interrupted regate journaled go into the fresh copy."""
    if not partial_journal.exists():
        return
    conn = sqlite3.connect(fresh)
    try:
        conn.execute("ATTACH DATABASE ? AS old", (f"file:{partial_journal}?mode=ro",))
        conn.execute("INSERT OR IGNORE INTO calls SELECT * FROM old.calls WHERE role = 'adjudicator'")
        conn.commit()
    except sqlite3.DatabaseError:
        pass  # an unreadable leftover: its calls are sent again
    finally:
        conn.close()


def _apply(run_dir: Path, decided: Sequence[_Outcome], pending: Sequence[_Outcome]) -> None:
    """Write the new decisions; samples waiting for a verdict are left mid-way, which is
    what makes `Journal.unfinished_calls` hand their journaled calls back."""
    conn = sqlite3.connect(run_dir / "journal.sqlite")
    try:
        with conn:
            conn.executemany(
                "UPDATE samples SET state = ?, body = ? WHERE task_id = ?",
                [(o.state if o.state != "planned" else "adjudicating",
                  orjson.dumps(o.body).decode(), o.record.task_id) for o in (*decided, *pending)])
            # The fingerprints are of the old accepted set: resume indexes the new one.
            conn.execute("DELETE FROM dedup_keys")
            conn.execute("DELETE FROM meta WHERE key = 'dedup_layout'")
    finally:
        conn.close()


def _adjudicator_model(models: Sequence[str], generator: str, rotate: bool, seed: int,
                       task_id: str) -> str:
    """A model never judges its own sample in `rotate`; the draw is seeded like the team's."""
    eligible = [m for m in models if not rotate or m != generator] or list(models)
    digest = hashlib.sha256(f"gra-regate/{seed}/{task_id}".encode()).digest()
    return eligible[int.from_bytes(digest[:8], "big") % len(eligible)]


async def _adjudicate(
    journal: Journal, snapshot: Mapping[str, Any], gate: GateConfig,
    pending: Sequence[_Outcome], endpoints: Sequence[EndpointConfig],
    transport: Transport | None,
) -> tuple[int, int]:
    """Ask the adjudicator about each pending sample; (calls sent, samples failed)."""
    config = RunConfig.model_validate({
        "run": dict(snapshot.get("run", {})),
        "gate": gate.model_dump(), "generation": snapshot.get("generation", {}),
        "prompts_dir": snapshot.get("prompts_dir")})
    prompts = PromptSet.load(config.prompts_dir)
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            transport = H1Transport()
            stack.push_async_callback(transport.aclose)
        members = [Endpoint(e, transport, uncapped=config.run.concurrency) for e in endpoints]
        try:
            async with asyncio.TaskGroup() as group:
                for member in members:
                    group.create_task(probe(member, transport))
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        pool = EndpointPool(members)
        team = Team(mode=config.run.roles, pools={"adjudicator": pool}, panel_size=None,
                    run_seed=config.run.seed,
                    json_modes={m.model: m.config.json_mode for m in members},
                    prices={m.model: (m.config.price_in, m.config.price_out) for m in members})
        progress = Progress(target=0, prices=dict(team.prices))
        caller = Caller(config, team, journal, progress, Budget(None, team.prices))
        caller.reuse(journal.unfinished_calls())
        failed = 0

        async def one(outcome: _Outcome) -> None:
            nonlocal failed
            record, body = outcome.record, outcome.body
            task = Task(record.task_id, record.round, record.index, record.domain,
                        record.seed_ids)
            model = _adjudicator_model(pool.models, str(body.get("generator", "")),
                                       config.run.roles == "rotate", config.run.seed, task.id)
            views = [ReviewView(f"Reviewer {i + 1}", r["scores"], r.get("feedback", ""))
                     for i, r in enumerate(body["reviews"])]
            messages = prompts.adjudicator(str(body["instruction"]), str(body["response"]),
                                           views, gate.criteria)
            try:
                verdict, reply = await caller.structured(task, "adjudicator", model, messages,
                                                         parse_verdict, "adj")
            except TaskFailed as exc:
                failed += 1
                body.update(decision="failed", reason=str(exc), failure="invalid_reply")
                journal.record_sample(SampleRecord(task.id, task.round, task.index, "failed",
                                                   task.domain, task.seed_ids, body))
                return
            body["tokens"] = int(body.get("tokens", 0)) + reply.prompt_tokens + reply.completion_tokens
            body["adjudication"] = {"model": model, "decision": verdict.decision,
                                    "reason": verdict.reason}
            body["decision"] = verdict.decision
            state = "accepted" if verdict.decision == "accept" else "rejected"
            outcome.state = state
            journal.record_sample(SampleRecord(task.id, task.round, task.index, state,
                                               task.domain, task.seed_ids, body))

        try:
            async with asyncio.TaskGroup() as group:
                for outcome in pending:
                    group.create_task(one(outcome))
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
    return progress.calls_sent, failed


def _dedup_again(run_dir: Path, snapshot: Mapping[str, Any], touched: set[str]) -> int:
    """Newly accepted samples against the accepted set, in plan order; how many were copies
    (MinHash, and paraphrases by the vectors the source journaled, if it had an embedder)."""
    reader = JournalReader(run_dir)
    dedup, prepare = journaled_dedup(snapshot, reader.embeddings)
    later: list[SampleRecord] = []
    copies: list[tuple[str, float | None, str]] = []
    try:
        for record in reader.samples(("accepted",)):
            text = dedup_text(str(record.body["instruction"]), str(record.body["response"]))
            prepare(record.task_id, text)
            if record.task_id in touched:
                later.append(record)
            else:
                dedup.add(record.task_id, text)
        for record in later:
            text = dedup_text(str(record.body["instruction"]), str(record.body["response"]))
            duplicate = dedup.find_and_add(record.task_id, text)
            if duplicate is not None:
                copies.append((duplicate.key, duplicate.similarity, record.task_id))
    finally:
        reader.close()
    if copies:
        conn = sqlite3.connect(run_dir / "journal.sqlite")
        try:
            with conn:
                conn.executemany(
                    "UPDATE samples SET state = 'rejected', body = json_set(body, "
                    "'$.decision', 'duplicate', '$.duplicate_of', ?) WHERE task_id = ?",
                    [(key, task_id) for key, _, task_id in copies])
                conn.executemany(
                    "UPDATE samples SET body = json_set(body, '$.similarity', ?) "
                    "WHERE task_id = ?",
                    [(similar, task_id) for _, similar, task_id in copies if similar is not None])
        finally:
            conn.close()
    return len(copies)


def regate(src: str | Path, dst: str | Path, **kwargs: Any) -> RegateSummary:
    """`regate_async` for scripts: blocks until DST is written. Inside a running event loop
    raises `UsageError`: await `gra_async.regate_async(...)` there."""
    return block_on(regate_async(src, dst, **kwargs), "regate")
