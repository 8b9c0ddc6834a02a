"""The run directory: a SQLite journal (WAL) of every model call and every sample's state.

Why SQLite: one file, atomic commits, readers that never block the writer (WAL), and
`PRAGMA integrity_check` to prove it. One writer thread owns the write connection and
commits in small groups, so the event loop never waits on the disk; a kill -9 loses at
most the rows of one commit window, and those are calls that resume simply sends again.

Layout of `runs/<name>/`:
    config.json       the resolved config, as the run was started (no secrets)
    journal.sqlite    calls, samples, dedup fingerprints, embeddings, meta (+ -wal / -shm
                      while open)
    seeds.sqlite      the seed pool (`seeds.SeedStore`), rebuilt from the seed files if lost
    .lock             held by the run writing here
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import hashlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gra_async._sqlite import transaction
from gra_async.accounting import BATCH_ENDPOINT_SUFFIX
from gra_async.errors import RunDirError

__all__ = [
    "BATCH_READ",
    "TERMINAL_STATES",
    "BatchRecord",
    "CallRecord",
    "FinishedTasks",
    "Journal",
    "JournalFingerprints",
    "JournalReader",
    "RunLock",
    "SampleRecord",
    "call_key",
    "config_hash",
    "embedding_key",
]

SCHEMA_VERSION = "1"
TERMINAL_STATES = ("accepted", "rejected", "failed")
STATES = ("planned", "generated", "reviewed", "adjudicating", *TERMINAL_STATES)
_TERMINAL_SQL = "(" + ",".join(f"'{state}'" for state in TERMINAL_STATES) + ")"
_COMMIT_EVERY = 0.05  # seconds: the commit window a kill -9 may lose
_COMMIT_ROWS = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    role TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency REAL NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_task ON calls (task_id);
CREATE TABLE IF NOT EXISTS samples (
    task_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    domain TEXT NOT NULL,
    seed_ids TEXT NOT NULL,
    body TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_state ON samples (state);
-- Batch API jobs (run.mode = "batch"): a row as soon as its input file is uploaded, its
-- batch id once created, so a rerun after a crash polls it instead of sending its calls again.
CREATE TABLE IF NOT EXISTS batches (
    file_id TEXT PRIMARY KEY,
    batch_id TEXT,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    calls TEXT NOT NULL,     -- JSON [[key, task_id, role], ...]: the custom_ids and their owners
    status TEXT NOT NULL,    -- "uploaded", then the provider's status
    counts TEXT NOT NULL,    -- JSON request_counts
    created REAL NOT NULL,
    updated REAL NOT NULL
);
-- Dedup fingerprints of accepted samples (see JournalFingerprints), one row each.
CREATE TABLE IF NOT EXISTS dedup_keys (
    task_id TEXT NOT NULL UNIQUE,
    digest INTEGER NOT NULL,
    buckets BLOB NOT NULL,   -- int64 per LSH band
    shingles BLOB            -- sorted uint64 shingle hashes; NULL under three words
);
-- Embedder replies, one row per text (semantic dedup): a resume reads them back instead
-- of embedding a text again. `key` is `embedding_key(model, text)`.
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    vector BLOB NOT NULL,    -- float32, unit length
    tokens INTEGER NOT NULL, -- the call's prompt tokens, shared out over its texts
    created REAL NOT NULL
);
"""


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def call_key(
    *, role: str, model: str, messages: Any, params: Mapping[str, Any], task_id: str, slot: str
) -> str:
    """Content hash of one model call: same inputs, same key, so resume reuses the reply."""
    material = {"role": role, "model": model, "messages": messages, "params": params,
                "task": task_id, "slot": slot}
    return hashlib.sha256(_canonical(material)).hexdigest()


def embedding_key(model: str, text: str) -> str:
    """Content hash of one embedded text: the same text never goes to the same model twice."""
    return hashlib.sha256(_canonical({"embed": model, "text": text})).hexdigest()


def config_hash(snapshot: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(snapshot)).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CallRecord:
    key: str
    task_id: str
    role: str
    model: str
    endpoint: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency: float
    attempts: int


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One task's sample as the journal holds it; `body` carries the provenance fields."""

    task_id: str
    round: int
    index: int
    state: str
    domain: str
    seed_ids: tuple[str, ...]
    body: Mapping[str, Any]


class FinishedTasks:
    """Finished tasks by (round, index), a byte each instead of a ~100-byte id in a set:
    resuming a run of millions of tasks stays small."""

    def __init__(self) -> None:
        self._rounds: dict[int, bytearray] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, task: tuple[int, int]) -> bool:
        rnd, index = task
        flags = self._rounds.get(rnd)
        return flags is not None and index < len(flags) and bool(flags[index])

    def add(self, rnd: int, index: int) -> None:
        flags = self._rounds.setdefault(rnd, bytearray())
        if index >= len(flags):
            flags.extend(bytes(max(index + 1 - len(flags), len(flags))))
        self._count += not flags[index]
        flags[index] = 1


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process kill; only power loss can
        # roll back the last commits, which resume then redoes.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _state_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for state, n in conn.execute("SELECT state, count(*) FROM samples GROUP BY state"):
        counts[state] = n
    return counts


def _spend_rows(conn: sqlite3.Connection) -> list[tuple[str, bool, int, int]]:
    """(model, from a batch?, prompt tokens, completion tokens) over every journaled call."""
    rows = list(conn.execute(
        "SELECT model, endpoint LIKE '%' || ?, sum(prompt_tokens), sum(completion_tokens) "
        "FROM calls GROUP BY 1, 2", (BATCH_ENDPOINT_SUFFIX,)))
    with contextlib.suppress(sqlite3.OperationalError):  # no embeddings table: an older journal
        # The embedder's tokens, at its model's price_in (online: embeddings never batch).
        rows += conn.execute("SELECT model, 0, sum(tokens), 0 FROM embeddings GROUP BY model")
    return [(str(m), bool(b), int(t_in or 0), int(t_out or 0)) for m, b, t_in, t_out in rows]


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One Batch API job as the journal holds it. `status` "read" once its results are in."""

    file_id: str
    batch_id: str | None
    endpoint: str
    model: str
    calls: tuple[tuple[str, str, str], ...]  # (call key = custom_id, task id, role)
    status: str
    counts: Mapping[str, int]


BATCH_READ = "read"  # its results are journaled: nothing left to wait for


def _batches(conn: sqlite3.Connection, *, open_only: bool) -> list[BatchRecord]:
    where = f"WHERE status != '{BATCH_READ}'" if open_only else ""
    rows = conn.execute("SELECT file_id, batch_id, endpoint, model, calls, status, counts FROM "
                        f"batches {where} ORDER BY created")
    return [BatchRecord(f, b, e, m, tuple(tuple(c) for c in orjson.loads(calls)), s,
                        orjson.loads(counts)) for f, b, e, m, calls, s, counts in rows]


def _samples(
    conn: sqlite3.Connection, states: tuple[str, ...], before_round: int | None = None,
    unindexed: bool = False,
) -> Iterator[SampleRecord]:
    where = f"state IN ({','.join('?' * len(states))})"
    params: tuple[Any, ...] = states
    if before_round is not None:
        where, params = f"{where} AND round < ?", (*params, before_round)
    if unindexed:
        where += " AND task_id NOT IN (SELECT task_id FROM dedup_keys)"
    rows = conn.execute(
        f"SELECT task_id, round, idx, state, domain, seed_ids, body FROM samples "
        f"WHERE {where} ORDER BY round, idx", params)
    while batch := rows.fetchmany(256):
        for task_id, rnd, idx, state, domain, seed_ids, body in batch:
            yield SampleRecord(task_id, rnd, idx, state, domain,
                               tuple(orjson.loads(seed_ids)), orjson.loads(body))


class JournalReader:
    """Read-only view for `status` and `export`; safe while a run is writing (WAL)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        path = run_dir / "journal.sqlite"
        if not path.exists():
            raise RunDirError(f"{run_dir}: no journal.sqlite here (is this a run directory?)")
        try:
            self._conn = _connect(path, readonly=True)
            self._conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise RunDirError(f"{path}: cannot read the journal ({exc})") from None

    def close(self) -> None:
        self._conn.close()

    def state_counts(self) -> dict[str, int]:
        return _state_counts(self._conn)

    def call_totals(self) -> list[tuple[str, str, int, int, int]]:
        """(role, model, calls, prompt tokens, completion tokens) per role and model."""
        return list(self._conn.execute(
            "SELECT role, model, count(*), sum(prompt_tokens), sum(completion_tokens) "
            "FROM calls GROUP BY role, model ORDER BY role, model"
        ))

    def spend_rows(self) -> list[tuple[str, bool, int, int]]:
        """(model, from a batch?, prompt tokens, completion tokens): what spend is priced on."""
        return _spend_rows(self._conn)

    def task_usage(self) -> list[tuple[str, str | None, str | None, float, str, str, int, int, int]]:
        """(task id, state, decision, updated, role, model, calls, prompt tokens, completion
        tokens) per task, role and model: what each outcome costs (`estimate`). State and
        decision are None for calls whose task has no sample row (cut off in flight)."""
        rows = self._conn.execute(
            "SELECT c.task_id, s.state, json_extract(s.body, '$.decision'), "
            "coalesce(s.updated, 0), c.role, c.model, count(*), sum(c.prompt_tokens), "
            "sum(c.completion_tokens) FROM calls c LEFT JOIN samples s ON s.task_id = c.task_id "
            "GROUP BY c.task_id, c.role, c.model ORDER BY 4, 1")
        return [(str(t), s, d, float(u), str(r), str(m), int(n), int(a or 0), int(b or 0))
                for t, s, d, u, r, m, n, a, b in rows]

    def batches(self, *, open_only: bool = False) -> list[BatchRecord]:
        """The run's Batch API jobs, oldest first; journals from before batch mode have none."""
        try:
            return _batches(self._conn, open_only=open_only)
        except sqlite3.OperationalError:  # no batches table: a journal of an older version
            return []

    def latencies(self) -> dict[str, float]:
        """Mean latency (seconds, the answering attempt) of each model's online calls."""
        rows = self._conn.execute(
            "SELECT model, avg(latency) FROM calls WHERE endpoint NOT LIKE '%' || ? "
            "GROUP BY model", (BATCH_ENDPOINT_SUFFIX,))
        return {str(model): float(mean or 0.0) for model, mean in rows}

    def body_counts(self, state: str, *fields: str) -> list[tuple[Any, ...]]:
        """(values of `fields` in the body, count) over the samples in `state`, counted by
        SQLite: `status` stays fast on a journal of millions of samples."""
        columns = ", ".join(f"json_extract(body, '$.{field}')" for field in fields)
        return list(self._conn.execute(
            f"SELECT {columns}, count(*) FROM samples WHERE state = ? GROUP BY {columns}", (state,)))

    def samples(
        self, states: tuple[str, ...] = TERMINAL_STATES, *, before_round: int | None = None,
        unindexed: bool = False,
    ) -> Iterator[SampleRecord]:
        """Samples in plan order; of earlier rounds only, or missing from the dedup index."""
        return _samples(self._conn, states, before_round, unindexed)

    def samples_by_id(self, task_ids: list[str]) -> Iterator[SampleRecord]:
        """The samples with these ids (at most a few hundred at a time: one query)."""
        rows = self._conn.execute(
            "SELECT task_id, round, idx, state, domain, seed_ids, body FROM samples "
            f"WHERE task_id IN ({','.join('?' * len(task_ids))})", task_ids)
        for task_id, rnd, idx, state, domain, seed_ids, body in rows:
            yield SampleRecord(task_id, rnd, idx, state, domain,
                               tuple(orjson.loads(seed_ids)), orjson.loads(body))

    def fingerprints(self) -> Iterator[tuple[str, int, bytes]]:
        """(task id, digest, buckets) of every dedup fingerprint, in the order committed."""
        rows = self._conn.execute("SELECT task_id, digest, buckets FROM dedup_keys ORDER BY rowid")
        while batch := rows.fetchmany(1024):
            yield from batch

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def embeddings(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The stored vectors of these embedding keys (float32 bytes), those there are."""
        return _embeddings(self._conn, keys)

    def embedding_totals(self) -> tuple[int, int]:
        """(texts embedded, their tokens); (0, 0) for a journal from before the embedder."""
        try:
            row = self._conn.execute("SELECT count(*), sum(tokens) FROM embeddings").fetchone()
        except sqlite3.OperationalError:
            return 0, 0
        return int(row[0] or 0), int(row[1] or 0)

    def time_span(self) -> tuple[float, float] | None:
        row = self._conn.execute("SELECT min(created), max(created) FROM calls").fetchone()
        return None if row is None or row[0] is None else (float(row[0]), float(row[1]))

    def calls_after(self, rowid: int, limit: int = 4096) -> list[tuple[Any, ...]]:
        """(rowid, role, model, endpoint, prompt tokens, completion tokens, latency, attempts)
        of the calls committed after `rowid`, oldest first. Calls are only ever inserted,
        so a reader that remembers the last rowid it saw reads each call once."""
        return self._conn.execute(
            "SELECT rowid, role, model, endpoint, prompt_tokens, completion_tokens, latency, "
            "attempts FROM calls WHERE rowid > ? ORDER BY rowid LIMIT ?", (rowid, limit)).fetchall()

    def session_spans(self) -> list[tuple[float, float]]:
        """(start, last call) of each session that made calls, from the session starts the
        runs recorded (meta `sessions`). Calls from before the first recorded start (a
        journal of an older version) count as one session of their own."""
        starts = sorted(float(s) for s in orjson.loads(self.meta("sessions") or "[]"))
        first = self.time_span()
        if first is None:
            return []
        if not starts or starts[0] > first[0]:
            starts.insert(0, first[0])
        # One scan gives every session its calls' span: each call falls in the session
        # whose start is the latest one before it.
        case = " ".join(f"WHEN created >= {start!r} THEN {i}" for i, start in reversed(
            list(enumerate(starts))))
        rows = self._conn.execute(
            f"SELECT CASE {case} ELSE 0 END AS session, max(created) FROM calls GROUP BY session")
        return sorted((starts[i], float(last)) for i, last in rows)


def _embeddings(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for i in range(0, len(keys), 500):
        part = list(keys[i:i + 500])
        try:
            found.update(conn.execute(
                f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(part))})",
                part))
        except sqlite3.OperationalError:  # no such table: a journal of an older version
            return found
    return found


_Op = tuple[str, tuple[Any, ...]]
_Group = list[_Op]  # committed together or not at all
_STOP = object()
_CALL_INSERT = "INSERT OR IGNORE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_SAMPLE_UPSERT = "INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?)"
_SAMPLE_FORGET = "UPDATE samples SET state = 'planned' WHERE task_id = ?"
# Rows per multi-row INSERT: SQLite before 3.32 binds at most 999 parameters a statement.
_ROWS_PER_STEP = 128
_MAX_PARAMS = 999


def _execute(conn: sqlite3.Connection, writes: Iterable[_Op | _Group]) -> None:
    """The writes of one transaction, in as few SQLite steps as their meaning allows.

    The sqlite3 module lets go of the GIL around every step, and with `executemany` a step
    is one row; each time, the writer waits for the event loop to hand the GIL back. At
    0 ms latency that made commits of ~3,000 rows take 0.3-1.4 s, and 8,700-19,000 of a
    run's ~30,000 writes were still queued at its end (`bench/pipeline_bench.py
    --latency 0`; 480-1,300 with this). So:
    - a call's row is only ever inserted, once (its key): calls go in together;
    - a sample's row is replaced whole at each state, so only its last state in the
      transaction is written (a `forget` after it edits that row; one before it is moot);
    - every other write keeps its order, and runs of one INSERT become multi-row INSERTs.
    Rows of different tables commute inside one transaction; the order within each holds.
    """
    calls: list[tuple[Any, ...]] = []
    samples: dict[str, tuple[Any, ...]] = {}
    forgotten: dict[str, None] = {}
    ordered: list[_Op] = []
    for write in writes:
        for op in write if isinstance(write, list) else (write,):
            sql, params = op
            if sql == _CALL_INSERT:
                calls.append(params)
            elif sql == _SAMPLE_UPSERT:
                samples[params[0]] = params
                forgotten.pop(params[0], None)
            elif sql == _SAMPLE_FORGET:
                row = samples.get(params[0])
                if row is None:
                    forgotten[params[0]] = None
                else:
                    samples[params[0]] = (*row[:3], "planned", *row[4:])
            else:
                ordered.append(op)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i][0] != ordered[start][0]:
            _many(conn, ordered[start][0], [params for _, params in ordered[start:i]])
            start = i
    _many(conn, _CALL_INSERT, calls)
    _many(conn, _SAMPLE_UPSERT, list(samples.values()))
    _many(conn, _SAMPLE_FORGET, [(task_id,) for task_id in forgotten])


def _many(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """`executemany`, with an INSERT's rows sent many to a statement."""
    if not rows:
        return
    if len(rows) == 1 or not sql.startswith("INSERT") or " VALUES (" not in sql or not rows[0]:
        conn.executemany(sql, rows)
        return
    per = min(_ROWS_PER_STEP, _MAX_PARAMS // len(rows[0]))
    done = 0
    while done < len(rows):
        left = len(rows) - done
        # Full statements, then powers of two: a few distinct statements for the cache.
        count = per if left >= per else 1 << (left.bit_length() - 1)
        conn.execute(_rows_sql(sql, count),
                     [value for row in rows[done:done + count] for value in row])
        done += count


@functools.lru_cache(maxsize=64)
def _rows_sql(sql: str, count: int) -> str:
    """`INSERT ... VALUES (?,?)` for `count` rows: `... VALUES (?,?),(?,?),...`."""
    head, values, row = sql.rpartition(" VALUES ")
    return head + values + ",".join([row] * count)


class Journal:
    """The writable journal of one run directory, with its single writer thread."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, lock: RunLock | None) -> None:
        self.run_dir = run_dir
        self._conn = conn
        self._lock = lock
        self._queue: queue.SimpleQueue[_Op | _Group | object | asyncio.Future[None]] = (
            queue.SimpleQueue())
        self.queued = 0  # writes queued so far, each one's number; `committed` follows it
        self._order = threading.Lock()
        # The writer sleeps a commit interval and then takes everything queued: woken per
        # write instead, it took the GIL from the event loop ~1,000 times a second.
        self._wake = threading.Event()
        self.committed = 0  # writes committed so far, in queue order (set by the writer)
        self._fingerprints: JournalFingerprints | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="gra-journal", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reset_at_open = 0  # samples a crash had left mid-way, put back to planned
        self._readers = threading.local()  # read connections for `embeddings`, one a thread
        self._reader_conns: list[sqlite3.Connection] = []

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls, run_dir: Path, snapshot: Mapping[str, Any], *, force: bool = False,
        lock: RunLock | None = None,
    ) -> Journal:
        """Create or reopen `run_dir`; a different config is refused unless `force`.

        Without `lock` the journal takes the run directory's lock and releases it on close.
        """
        owned = lock is None
        lock = RunLock(run_dir) if lock is None else lock
        try:
            conn = _open_journal(run_dir, snapshot, force=force)
        except BaseException:
            if owned:
                lock.release()
            raise
        journal = cls(run_dir, conn, lock if owned else None)
        journal.reset_at_open = journal.reset_in_progress()
        return journal

    # --- what resume needs -----------------------------------------------------------

    def finished_tasks(self) -> FinishedTasks:
        finished = FinishedTasks()
        for rnd, index in self._conn.execute(
                f"SELECT round, idx FROM samples WHERE state IN {_TERMINAL_SQL}"):
            finished.add(rnd, index)
        return finished

    def unfinished_calls(self) -> dict[str, CallRecord]:
        """Replies of tasks that were cut off mid-way: resume reuses them instead of re-sending."""
        rows = self._conn.execute(
            "SELECT key, task_id, role, model, endpoint, content, finish_reason, prompt_tokens, "
            "completion_tokens, latency, attempts FROM calls WHERE task_id NOT IN "
            f"(SELECT task_id FROM samples WHERE state IN {_TERMINAL_SQL})"
        )
        return {row[0]: CallRecord(*row) for row in rows}

    def state_counts(self) -> dict[str, int]:
        return _state_counts(self._conn)

    def open_batches(self) -> list[BatchRecord]:
        """Batches submitted by earlier sessions and not yet read back (call before `start`)."""
        assert not self._thread.is_alive(), "Journal.open_batches() after start()"
        return _batches(self._conn, open_only=True)

    def journaled(self, keys: Iterable[str]) -> set[str]:
        """Which of these call keys have a reply in the journal (call before `start`)."""
        found: set[str] = set()
        wanted = list(keys)
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            found.update(k for (k,) in self._conn.execute(
                f"SELECT key FROM calls WHERE key IN ({','.join('?' * len(part))})", part))
        return found

    def record_batch_file(self, record: BatchRecord) -> None:
        now = time.time()
        self._put(("INSERT OR REPLACE INTO batches VALUES (?,?,?,?,?,?,?,?,?)",
                   (record.file_id, record.batch_id, record.endpoint, record.model,
                    orjson.dumps([list(c) for c in record.calls]).decode(), record.status,
                    orjson.dumps(record.counts).decode(), now, now)))

    def record_batch_state(
        self, file_id: str, *, batch_id: str | None = None, status: str,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        self._put(("UPDATE batches SET batch_id = coalesce(?, batch_id), status = ?, "
                   "counts = coalesce(?, counts), updated = ? WHERE file_id = ?",
                   (batch_id, status, None if counts is None else orjson.dumps(counts).decode(),
                    time.time(), file_id)))

    def spend_rows(self) -> list[tuple[str, bool, int, int]]:
        """What earlier sessions spent, as tokens per model (call before `start`)."""
        assert not self._thread.is_alive(), "Journal.spend_rows() after start()"
        return _spend_rows(self._conn)

    def meta(self, key: str) -> str | None:
        """A meta value as committed; call before `start` (the writer owns the connection after)."""
        assert not self._thread.is_alive(), "Journal.meta() after start()"
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def accepted(
        self, before_round: int | None = None, *, unindexed: bool = False,
    ) -> Iterator[SampleRecord]:
        """Accepted samples as committed so far, streamed: of earlier rounds only, or only
        those missing from the dedup index (a journal from before it, or a new layout).

        Read on a connection of their own, so any thread may call this while the writer runs.
        """
        reader = JournalReader(self.run_dir)
        try:
            yield from reader.samples(("accepted",), before_round=before_round, unindexed=unindexed)
        finally:
            reader.close()

    def replan_failed(self) -> int:
        """Failed tasks whose reason was the endpoint's, not theirs, go back to `planned`.

        Journals of earlier versions failed a task for good when its endpoint was down
        (retries exhausted) or answered every call with a 400; those reasons carry "gave up
        after" or "HTTP 4xx/5xx". Invalid replies stay failed: they are the task's own.
        """
        try:
            with transaction(self._conn):
                cursor = self._conn.execute(
                    "UPDATE samples SET state = 'planned' WHERE state = 'failed' AND ("
                    "json_extract(body, '$.reason') LIKE '%gave up after%' OR "
                    "json_extract(body, '$.reason') GLOB '*HTTP [45][0-9][0-9]*')")
        except sqlite3.DatabaseError as exc:
            raise RunDirError.writing(self.run_dir, exc) from None
        return cursor.rowcount

    def reset_in_progress(self) -> int:
        """Samples left mid-way by a crash go back to `planned`; their calls stay journaled."""
        cursor = self._conn.execute(
            f"UPDATE samples SET state = 'planned' WHERE state != 'planned' "
            f"AND state NOT IN {_TERMINAL_SQL}"
        )
        return cursor.rowcount

    # --- writing ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def _put(self, write: _Op | _Group) -> int:
        """Queue one write for the writer thread; its number, for `committed`."""
        self._check()
        with self._order:  # numbers follow queue order, whichever thread writes
            self.queued += 1
            number = self.queued
            self._queue.put(write)
        if self._queue.qsize() >= _COMMIT_ROWS:
            self._wake.set()
        return number

    def record_call(self, record: CallRecord) -> None:
        self._put((
            _CALL_INSERT,
            (record.key, record.task_id, record.role, record.model, record.endpoint,
             record.content, record.finish_reason, record.prompt_tokens,
             record.completion_tokens, record.latency, record.attempts, time.time()),
        ))

    def record_sample(self, sample: SampleRecord) -> None:
        """An accepted sample is committed together with its dedup fingerprint, if indexed."""
        write = (
            _SAMPLE_UPSERT,
            (sample.task_id, sample.round, sample.index, sample.state, sample.domain,
             orjson.dumps(list(sample.seed_ids)).decode(), orjson.dumps(sample.body).decode(),
             time.time()),
        )
        if sample.state == "accepted" and self._fingerprints is not None:
            self._fingerprints.commit_with(sample.task_id, write)
        else:
            self._put(write)

    def record_embeddings(self, rows: Sequence[tuple[str, str, str, bytes, int]]) -> None:
        """(key, model, endpoint, float32 vector bytes, tokens) of one embedder reply."""
        now = time.time()
        self._put([("INSERT OR IGNORE INTO embeddings VALUES (?,?,?,?,?,?)", (*row, now))
                   for row in rows])

    def embeddings(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Stored vectors of these keys, as committed; from any thread after `start` (each
        thread reads on a connection of its own: the writer owns the journal's)."""
        local = self._readers
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = _connect(self.run_dir / "journal.sqlite", readonly=True)
            self._reader_conns.append(conn)
        return _embeddings(conn, keys)

    def set_meta(self, key: str, value: str) -> None:
        self._put(("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)))

    def forget_sample(self, task_id: str) -> None:
        """A cancelled task goes back to `planned` (in_progress is 0 after every exit)."""
        self._put((_SAMPLE_FORGET, (task_id,)))

    def commit_fingerprint(self, task_id: str) -> None:
        """Write the fingerprint of a sample that is accepted already (see `fingerprints`)."""
        assert self._fingerprints is not None, "fingerprints() was not called"
        self._fingerprints.commit_with(task_id, None)

    def fingerprints(self, layout: str) -> JournalFingerprints:
        """The dedup fingerprints kept in this journal (call before `start`).

        `layout` says how fingerprints were made; those made another way are dropped,
        and `accepted(unindexed=True)` then lists every accepted sample to index again
        (each `Deduplicator.add`, then `commit_fingerprint`).
        """
        stored = self._conn.execute("SELECT value FROM meta WHERE key = 'dedup_layout'").fetchone()
        if stored is None or stored[0] != layout:
            try:
                with transaction(self._conn):
                    self._conn.execute("DELETE FROM dedup_keys")
                    self._conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('dedup_layout', ?)",
                        (layout,))
            except sqlite3.DatabaseError as exc:
                raise RunDirError.writing(self.run_dir, exc) from None
        self._fingerprints = JournalFingerprints(self)
        return self._fingerprints

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        self._check()
        assert self._loop is not None, "Journal.start() was not called"
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(done)
        self._wake.set()
        await done
        self._check()

    async def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RunDirError):
                await self.flush()
            self._queue.put(_STOP)
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        with contextlib.suppress(sqlite3.DatabaseError):
            self.reset_in_progress()
        if self._fingerprints is not None:
            self._fingerprints.close()
        for reader in self._reader_conns:
            with contextlib.suppress(sqlite3.DatabaseError):
                reader.close()
        self._conn.close()  # last, so SQLite checkpoints and removes the WAL file
        if self._lock is not None:
            self._lock.release()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RunDirError.writing(self.run_dir, self._error)

    def _write_loop(self) -> None:
        taken = 0
        stop = False
        while not stop:
            self._wake.wait(_COMMIT_EVERY)
            self._wake.clear()
            pending: list[_Op | _Group] = []
            waiters: list[asyncio.Future[None]] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                elif isinstance(item, asyncio.Future):
                    waiters.append(item)
                else:
                    pending.append(item)  # type: ignore[arg-type]
                    taken += 1
            if self._commit(pending):
                self.committed = taken
            for future in waiters:
                self._resolve(future)

    def _commit(self, writes: list[_Op | _Group]) -> bool:
        if self._error is not None:
            return False
        if not writes:
            return True
        try:
            self._conn.execute("BEGIN")
            _execute(self._conn, writes)
            self._conn.execute("COMMIT")
        except Exception as exc:  # any failure must reach the event loop
            # Not only DatabaseError: an InterfaceError ("bad parameter or other API misuse")
            # once killed this thread, and the run finished "fine" with its writes dropped.
            # `_error` fails every later write, flush and close instead.
            self._error = exc
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            return False
        return True

    def _resolve(self, future: asyncio.Future[None]) -> None:
        def settle() -> None:
            if not future.done():
                future.set_result(None)

        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(settle)


class JournalFingerprints:
    """The dedup fingerprints of a run's accepted samples, kept in its journal
    (a `dedup.FingerprintStore`).

    A fingerprint is committed in the same transaction as its sample's accepted state,
    so a crash keeps both or neither. Until that commit lands, its shingle hashes are
    served from here; after it, from the table, on a connection of its own (WAL: reads
    never wait for the writer).
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._read = _connect(journal.run_dir / "journal.sqlite", readonly=True)
        self._unsaved: dict[str, tuple[int, bytes, bytes | None]] = {}
        self._queued: collections.deque[tuple[int, str]] = collections.deque()

    def save(self, key: str, digest: int, buckets: bytes, shingles: bytes | None) -> None:
        """Held until the sample is recorded as accepted (`commit_with`), or, for a sample
        accepted already (indexed again after a layout change), `Journal.commit_fingerprint`."""
        self._prune()
        self._unsaved[key] = (digest, buckets, shingles)

    def saved(self) -> Iterator[tuple[str, int, bytes]]:
        reader = JournalReader(self._journal.run_dir)
        try:
            yield from reader.fingerprints()
        finally:
            reader.close()

    def shingles(self, key: str) -> bytes | None:
        self._prune()
        unsaved = self._unsaved.get(key)
        if unsaved is not None:
            return unsaved[2]
        row = self._read.execute("SELECT shingles FROM dedup_keys WHERE task_id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def commit_with(self, key: str, write: _Op | None) -> None:
        """Queue `key`'s fingerprint and `write` as one transaction."""
        unsaved = self._unsaved.get(key)
        group: _Group = []
        if unsaved is not None:
            group.append(("INSERT OR IGNORE INTO dedup_keys (task_id, digest, buckets, shingles) "
                          "VALUES (?, ?, ?, ?)", (key, *unsaved)))
        if write is not None:
            group.append(write)
        if not group:
            return
        number = self._journal._put(group)
        if unsaved is not None:
            self._queued.append((number, key))

    def _prune(self) -> None:
        """Drop the copies of fingerprints the writer has committed."""
        committed = self._journal.committed
        while self._queued and self._queued[0][0] <= committed:
            self._unsaved.pop(self._queued.popleft()[1], None)

    def close(self) -> None:
        self._read.close()


def _diff_keys(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _open_journal(run_dir: Path, snapshot: Mapping[str, Any], *, force: bool) -> sqlite3.Connection:
    """The journal's connection, its stored config checked against (or set to) `snapshot`."""
    digest = config_hash(snapshot)
    path = run_dir / "journal.sqlite"
    try:
        if not path.exists():
            _create_journal(path)
        conn = _connect(path, readonly=False)
        conn.executescript(_SCHEMA)
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise RunDirError(
            f"{run_dir / 'journal.sqlite'}: not a readable journal ({exc}); use a new --run-dir"
        ) from None
    try:
        old = stored.get("config_hash")
        if old is not None and old != digest and not force:
            before = orjson.loads(stored.get("config", "{}"))
            changed = ", ".join(_diff_keys(before, snapshot)) or "unknown keys"
            raise RunDirError(
                f"{run_dir}: this run directory was created with a different config "
                f"(changed: {changed}); pass --force or use a new --run-dir"
            )
        if old != digest:
            with transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("schema", SCHEMA_VERSION), ("config_hash", digest),
                     ("config", _canonical(snapshot).decode()),
                     ("created", stored.get("created", repr(time.time())))],
                )
            _atomic_write(run_dir / "config.json",
                          orjson.dumps(snapshot, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    except (sqlite3.DatabaseError, OSError) as exc:
        conn.close()
        raise RunDirError.writing(run_dir, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_journal(path: Path) -> None:
    """A new journal is built beside its place and renamed whole: a kill -9 at any moment
    leaves either no journal or one with every table (never a file `status` cannot read)."""
    fresh = path.with_name(path.name + ".new")
    for leftover in (fresh, fresh.with_name(fresh.name + "-journal")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(fresh)
    try:
        conn.executescript(_SCHEMA)
    finally:
        conn.close()
    os.replace(fresh, path)


class RunLock:
    """One writer per run directory: two runs on one journal would do the work twice.

    Taken before anything is written there (the seed store, the journal), and
    released by the OS if the process dies.
    """

    def __init__(self, run_dir: Path) -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
            fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError.writing(run_dir, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{run_dir}: in use by another run (pid {holder}); wait for it to finish, "
                "or pass another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
