"""Export streams the journal: JSONL row by row, Parquet by chunks whose schemas differ."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from gra_async.report import export
from gra_async.store import Journal, SampleRecord

SAMPLES = 5000  # more than two Parquet chunks


def body(i: int) -> dict[str, Any]:
    out: dict[str, Any] = {"instruction": f"q{i}", "response": f"a{i}", "decision": "accept",
                           "mean": 8.0, "std": 0.5, "tokens": 10, "adjudication": None}
    if i >= 4500:  # only late rows carry these: the first chunks never saw their types
        out["adjudication"] = {"model": "adj", "decision": "accept", "reason": "fine"}
        out["duplicate_of"] = None
    if i % 10 == 0:
        out["decision"] = "duplicate"
        out["duplicate_of"] = f"r1-{i - 1:07d}"
    return out


def write_journal(run_dir: Path) -> None:
    async def go() -> None:
        journal = Journal.open(run_dir, {"test": 1})
        journal.start()
        for i in range(SAMPLES):
            state = "rejected" if i % 10 == 0 else "accepted"
            journal.record_sample(SampleRecord(f"r1-{i:07d}", 1, i, state, "d", ("s1",), body(i)))
        await journal.close()

    asyncio.run(go())


def test_parquet_and_jsonl_exports_agree_across_chunks(tmp_path: Path) -> None:
    write_journal(tmp_path / "run")
    n_jsonl, summary = export(tmp_path / "run", tmp_path / "out.jsonl", "jsonl", include_all=True)
    n_parquet, _ = export(tmp_path / "run", tmp_path / "out.parquet", "parquet", include_all=True)
    assert n_jsonl == n_parquet == SAMPLES
    jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in jsonl]
    assert table[1]["adjudication"] is None and table[1]["duplicate_of"] is None
    assert table[4501]["adjudication"] == {"model": "adj", "decision": "accept", "reason": "fine"}
    assert table[10]["duplicate_of"] == jsonl[10]["duplicate_of"] == "r1-0000009"
    stats = json.loads(summary.read_text())
    assert stats["samples"] == SAMPLES and stats["decisions"] == {"accept": 4500, "duplicate": 500}
    assert stats["acceptance_rate"] == 0.9 and stats["adjudication_rate"] == 0.1


def test_accepted_only_by_default(tmp_path: Path) -> None:
    write_journal(tmp_path / "run")
    written, _ = export(tmp_path / "run", tmp_path / "out.parquet", "parquet")
    assert written == 4500 == pq.read_metadata(tmp_path / "out.parquet").num_rows
