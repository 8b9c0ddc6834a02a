"""What the journal's writer thread commits: every row as given, in order, and a failed
write that stops the run instead of vanishing with the thread."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from gra_async import store
from gra_async.errors import RunDirError
from gra_async.store import CallRecord, Journal, SampleRecord

# Texts a model may return: quotes, escapes, astral characters, a NUL, a literal
# backslash-u sequence, empty, long.
AWKWARD = ['say "hi"\n\tthen \\ leave', "😀 日本語 ß", "before\x00after", "\\u0000 literal",
           "", "x" * 20_000]


def call(i: int, content: str) -> CallRecord:
    return CallRecord(f"k{i:05d}", f"t{i // 3}", "reviewer", "m", "m@http://h/v1", content,
                      "stop", 2**40 + i, i, 0.1 + 0.2 * i, 1)


def sample(task: str, state: str, note: str) -> SampleRecord:
    return SampleRecord(task, 1, 0, state, "d", ("s1", "s2"), {"note": note, "score": 4.25})


def test_rows_committed_together_read_back_exactly_and_in_order(tmp_path: Path) -> None:
    # Two commits at least: the first 200 rows, then the rest.
    clean = [text for text in AWKWARD if "\x00" not in text]
    calls = [call(i, clean[i % len(clean)]) for i in range(200)]
    calls += [call(i, AWKWARD[i % len(AWKWARD)]) for i in range(200, 300)]

    async def go() -> None:
        journal = Journal.open(tmp_path, {"test": 1})
        journal.start()
        for record in calls[:200]:
            journal.record_call(record)
        await journal.flush()
        for record in calls[200:]:
            journal.record_call(record)
        # One task's states in one commit: the last one written is the one kept.
        for state in ("planned", "generated", "reviewed", "accepted"):
            journal.record_sample(sample("t-order", state, state))
        await journal.close()

    asyncio.run(go())
    with sqlite3.connect(tmp_path / "journal.sqlite") as conn:
        stored = conn.execute(
            "SELECT key, task_id, role, model, endpoint, content, finish_reason, prompt_tokens, "
            "completion_tokens, latency, attempts FROM calls ORDER BY key").fetchall()
        states = conn.execute("SELECT state, body, seed_ids FROM samples").fetchall()
        types = conn.execute("SELECT DISTINCT typeof(prompt_tokens), typeof(latency), "
                             "typeof(content) FROM calls").fetchall()
    assert [CallRecord(*row) for row in stored] == calls
    assert types == [("integer", "real", "text")]
    assert states == [("accepted", '{"note":"accepted","score":4.25}', '["s1","s2"]')]


def test_a_write_the_database_refuses_fails_the_next_write_and_the_close(tmp_path: Path) -> None:
    async def go() -> None:
        journal = Journal.open(tmp_path, {"test": 1})
        journal.start()
        journal.record_call(call(0, "fine"))
        await journal.flush()
        # Another process breaks the schema under the run (a disk error would do the same).
        with sqlite3.connect(tmp_path / "journal.sqlite") as other:
            other.execute("DROP TABLE calls")
        journal.record_call(call(1, "lost"))
        with pytest.raises(RunDirError, match="run the same command again"):
            await journal.flush()
        with pytest.raises(RunDirError):
            journal.record_call(call(2, "refused"))
        with pytest.raises(RunDirError):
            await journal.close()

    asyncio.run(go())


def test_one_commit_of_mixed_writes_equals_them_applied_one_by_one(tmp_path: Path) -> None:
    """The writer folds a commit's writes into few statements (calls together, a sample's
    last state, multi-row INSERTs); the tables must end as if each write ran in turn."""
    rng = random.Random(7)
    tasks = [f"t{i}" for i in range(40)]
    ops: list[tuple[str, tuple[object, ...]]] = []
    for n in range(3000):
        kind = rng.random()
        task = rng.choice(tasks)
        if kind < 0.45:  # a key seen before is ignored, as a resumed call's is
            key = f"k{rng.randrange(1500)}"
            ops.append((store._CALL_INSERT, (key, task, "reviewer", "m", "e", f"c{n}", "stop",
                                             n, n, 0.5, 1, float(n))))
        elif kind < 0.8:
            state = rng.choice(["planned", "generated", "reviewed", "accepted"])
            ops.append((store._SAMPLE_UPSERT, (task, 1, n, state, "d", "[]", f'{{"n":{n}}}',
                                               float(n))))
        elif kind < 0.88:
            ops.append((store._SAMPLE_FORGET, (task,)))
        elif kind < 0.94:
            ops.append(("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (f"m{rng.randrange(5)}", str(n))))
        else:
            ops.append(("INSERT OR IGNORE INTO dedup_keys (task_id, digest, buckets, shingles) "
                        "VALUES (?, ?, ?, ?)", (task, n, b"b", None)))

    def tables(conn: sqlite3.Connection) -> list[list[tuple[object, ...]]]:
        return [conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("calls", "samples", "meta", "dedup_keys")]

    folded, stepwise = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    for path in (folded, stepwise):
        with sqlite3.connect(path) as conn:
            conn.executescript(store._SCHEMA)
    with sqlite3.connect(folded) as conn:
        # Groups as the journal queues them, sizes that leave remainders of every kind.
        store._execute(conn, [ops[:1], *ops[1:1000], ops[1000:1777], *ops[1777:]])
        got = tables(conn)
    with sqlite3.connect(stepwise) as conn:
        for sql, params in ops:
            conn.execute(sql, params)
        expected = tables(conn)
    assert got == expected
    assert all(expected)  # every table got rows, so each kind of write was compared
