"""Dedup fingerprints kept in the journal: committed with their sample, seen before the
commit, reloaded on resume, made again when fingerprints are made another way."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

from gra_async.dedup import Deduplicator, layout
from gra_async.store import Journal, SampleRecord

VOCAB = [f"w{i}" for i in range(300)]


def text(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def near(seed: int) -> str:
    words = text(seed).split()
    words[10] = "changed"
    return " ".join(words)


def accepted(task_id: str, index: int) -> SampleRecord:
    return SampleRecord(task_id, 1, index, "accepted", "d", (), {"instruction": "i", "response": "r"})


def open_journal(run_dir: Path, threshold: float = 0.9) -> tuple[Journal, Deduplicator]:
    journal = Journal.open(run_dir, {"test": 1})
    dedup = Deduplicator(threshold, store=journal.fingerprints(layout(threshold)))
    return journal, dedup


def rows(run_dir: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(run_dir / "journal.sqlite") as conn:
        return list(conn.execute(sql))


def test_fingerprints_are_found_before_and_after_their_commit(tmp_path: Path) -> None:
    async def go() -> None:
        journal, dedup = open_journal(tmp_path)
        assert dedup.check_and_add("r1-0000000", text(1)) is None
        journal.record_sample(accepted("r1-0000000", 0))
        # The writer has not started, so nothing is committed: the shingle hashes that
        # verify the near match come from the journal's copy in memory.
        assert rows(tmp_path, "SELECT * FROM dedup_keys") == []
        assert dedup.check("r1-0000001", near(1)) == "r1-0000000"
        assert dedup.check("r1-0000002", text(1).upper()) == "r1-0000000"
        journal.start()
        await journal.flush()
        assert dedup.check("r1-0000001", near(1)) == "r1-0000000"  # now from the table
        assert dedup.check("r1-0000003", text(2)) is None
        await journal.close()

    asyncio.run(go())
    ((key, buckets),) = rows(tmp_path, "SELECT task_id, buckets FROM dedup_keys")
    assert key == "r1-0000000" and len(buckets) == 8 * Deduplicator().bands  # type: ignore[arg-type]


def test_fingerprint_and_accepted_state_share_one_transaction(tmp_path: Path) -> None:
    async def go() -> None:
        journal, dedup = open_journal(tmp_path)
        journal.start()
        for i in range(300):
            key = f"r1-{i:07d}"
            assert dedup.check_and_add(key, text(100 + i)) is None
            journal.record_sample(accepted(key, i))
        await journal.close()

    asyncio.run(go())
    keys = rows(tmp_path, "SELECT task_id FROM dedup_keys ORDER BY task_id")
    assert keys == rows(tmp_path, "SELECT task_id FROM samples WHERE state = 'accepted' ORDER BY task_id")
    assert len(keys) == 300


def test_resume_finds_earlier_samples_without_rebuilding(tmp_path: Path) -> None:
    async def first() -> None:
        journal, dedup = open_journal(tmp_path)
        journal.start()
        for i in range(20):
            dedup.check_and_add(f"r1-{i:07d}", text(i))
            journal.record_sample(accepted(f"r1-{i:07d}", i))
        await journal.close()

    async def second() -> None:
        journal, dedup = open_journal(tmp_path)
        assert list(journal.accepted(unindexed=True)) == []
        assert dedup.load() == 20 and dedup.load() == 0
        journal.start()
        assert dedup.check("r1-0000100", near(7)) == "r1-0000007"
        assert dedup.check("r1-0000007", text(7)) is None  # never its own duplicate
        assert "r1-0000007" in dedup.index and "r1-0000100" not in dedup.index
        await journal.close()

    asyncio.run(first())
    asyncio.run(second())


def test_a_new_layout_drops_the_index_and_lists_samples_to_index_again(tmp_path: Path) -> None:
    async def fill(threshold: float) -> list[str]:
        journal, dedup = open_journal(tmp_path, threshold)
        journal.start()
        dedup.load()
        missing = [r.task_id for r in journal.accepted(unindexed=True)]
        for record in journal.accepted(unindexed=True):
            dedup.add(record.task_id, text(record.index))  # re-indexing an accepted sample
            journal.commit_fingerprint(record.task_id)
        if not missing:
            for i in range(5):
                dedup.check_and_add(f"r1-{i:07d}", text(i))
                journal.record_sample(accepted(f"r1-{i:07d}", i))
        await journal.flush()
        assert dedup.check("r1-0000100", text(3)) == "r1-0000003"
        await journal.close()
        return missing

    assert asyncio.run(fill(0.9)) == []
    assert asyncio.run(fill(0.8)) == [f"r1-{i:07d}" for i in range(5)]  # another band layout
    assert asyncio.run(fill(0.8)) == []  # indexed again, committed
