"""Several run directories of one config (shards, or separate orchestrators) joined into one.

The merged directory is an ordinary run directory: `status`, `export` and `report` read it
like any other. Its journal holds every source's calls and samples, and its accepted
samples are deduplicated across the sources with the dedup a single run applies (exact
and MinHash near-duplicates, at the config's threshold), in a fixed order: source by
source as given, then round and index, so the same sources merge to the same result.
A sample that duplicates one kept from an earlier source is kept as rejected with
decision "duplicate" and `duplicate_of`, as a run records its own duplicates. Where each
sample came from is in the journal's `origins` table (task id, source directory, shard).

Crash safety: the directory is built beside its place under a hidden name and renamed
whole at the end, so a kill -9 at any moment leaves either the complete merged directory
or none (plus a hidden `.NAME.merging-PID` folder, removed by the next merge to NAME).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gra_async.errors import RunDirError
from gra_async.pipeline._embed import journaled_dedup
from gra_async.pipeline._steps import dedup_text
from gra_async.store import (
    _SCHEMA,
    _connect,
    _create_journal,
    _diff_keys,
    _embeddings,
    config_hash,
)

__all__ = ["MergeSummary", "merge_runs"]

_ORIGINS = """
CREATE TABLE IF NOT EXISTS origins (
    task_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    shard TEXT
);
"""


@dataclass(frozen=True, slots=True)
class MergeSummary:
    out: Path
    sources: int
    samples: int
    accepted: int
    duplicates: int  # accepted in a source, a duplicate of a sample kept from another one
    same_task: int  # a task already merged from an earlier source (unsharded runs of one plan)


def _source_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "journal.sqlite"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no journal.sqlite here (is this a run directory?)")
    try:
        conn = _connect(path, readonly=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise RunDirError(f"{path}: cannot read the journal ({exc})") from None
    if row is None:
        raise RunDirError(f"{run_dir}: the journal has no config yet (did the run start?)")
    config: dict[str, Any] = orjson.loads(row[0])
    return config


def _without_shard(config: dict[str, Any]) -> dict[str, Any]:
    run = {k: v for k, v in config.get("run", {}).items() if k != "shard"}
    return {**config, "run": run}


def _clear_leftovers(out: Path) -> None:
    """Hidden folders of merges to `out` that were killed; a live one is left alone."""
    for path in out.parent.glob(f".{out.name}.merging-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid != str(os.getpid()):
            try:
                os.kill(int(pid), 0)
                continue  # that merge still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(path, ignore_errors=True)


def merge_runs(sources: Sequence[Path], out: Path) -> MergeSummary:
    """Join `sources` into the new run directory `out` (RunDirError: one line saying why not)."""
    if not sources:
        raise RunDirError("merge needs at least one --run-dir")
    if len({p.resolve() for p in sources}) != len(sources):
        raise RunDirError("merge: the same --run-dir is given twice")
    if out.exists():
        raise RunDirError(f"{out}: already exists; merge writes a new run directory, pass another --out")
    configs = [_source_config(p) for p in sources]
    base = _without_shard(configs[0])
    for path, config in zip(sources[1:], configs[1:], strict=True):
        if _without_shard(config) != base:
            changed = ", ".join(_diff_keys(base, _without_shard(config))) or "unknown keys"
            raise RunDirError(f"{path}: made with another config than {sources[0]} "
                              f"(changed: {changed}); only runs of one config can be merged")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    work = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        summary = _build(work, sources, configs, base)
        # The journal is closed and synced; the rename is what makes the directory appear.
        os.rename(work, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return MergeSummary(out, *summary)


def _build(work: Path, sources: Sequence[Path], configs: Sequence[dict[str, Any]],
           base: dict[str, Any]) -> tuple[int, int, int, int, int]:
    path = work / "journal.sqlite"
    _create_journal(path)
    conn = _connect(path, readonly=False)
    try:
        conn.executescript(_SCHEMA + _ORIGINS)
        same_task = 0
        metas: list[dict[str, str]] = []
        for source, config in zip(sources, configs, strict=True):
            conn.execute("ATTACH DATABASE ? AS src", (f"file:{source / 'journal.sqlite'}?mode=ro",))
            try:
                conn.execute("BEGIN")
                # A call key hashes the task id and the request: the same key in two sources
                # is the same call, and the first source's reply stands, as a resume reuses it.
                conn.execute("INSERT OR IGNORE INTO calls SELECT * FROM src.calls")
                if conn.execute("SELECT 1 FROM src.sqlite_master WHERE type = 'table' AND "
                                "name = 'embeddings'").fetchone():  # none in older journals
                    conn.execute("INSERT OR IGNORE INTO embeddings SELECT * FROM src.embeddings")
                before = conn.total_changes
                conn.execute("INSERT OR IGNORE INTO samples SELECT * FROM src.samples")
                added = conn.total_changes - before
                total = conn.execute("SELECT count(*) FROM src.samples").fetchone()[0]
                same_task += total - added
                conn.execute(
                    "INSERT OR IGNORE INTO origins (task_id, source, shard) "
                    "SELECT task_id, ?, ? FROM src.samples ORDER BY round, idx",
                    (str(source.resolve()), config.get("run", {}).get("shard")))
                metas.append(dict(conn.execute("SELECT key, value FROM src.meta").fetchall()))
                conn.execute("COMMIT")
            finally:
                conn.execute("DETACH DATABASE src")
        duplicates = _dedup_across(conn, base)
        _write_meta(conn, work, sources, metas, base)
        samples = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        accepted = conn.execute("SELECT count(*) FROM samples WHERE state = 'accepted'").fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    for name in ("journal.sqlite", "config.json"):
        with open(work / name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(work)
    return len(sources), samples, accepted, duplicates, same_task


def _dedup_across(conn: sqlite3.Connection, config: dict[str, Any]) -> int:
    """Accepted samples in merge order through one run's dedup (MinHash, and paraphrases by
    the journaled vectors when the run had an embedder); later duplicates rejected."""
    dedup, prepare = journaled_dedup(config, lambda keys: _embeddings(conn, keys))
    rows = conn.execute(
        "SELECT s.task_id, s.body FROM samples s JOIN origins o USING (task_id) "
        "WHERE s.state = 'accepted' ORDER BY o.rowid").fetchall()
    duplicates = 0
    conn.execute("BEGIN")
    for task_id, body_text in rows:
        body = orjson.loads(body_text)
        text = dedup_text(body.get("instruction", ""), body.get("response", ""))
        prepare(task_id, text)
        twin = dedup.find_and_add(task_id, text)
        if twin is None:
            continue
        body["decision"], body["duplicate_of"] = "duplicate", twin.key
        if twin.similarity is not None:
            body["similarity"] = twin.similarity
        conn.execute("UPDATE samples SET state = 'rejected', body = ?, updated = ? WHERE task_id = ?",
                     (orjson.dumps(body).decode(), time.time(), task_id))
        duplicates += 1
    conn.execute("COMMIT")
    return duplicates


def _write_meta(conn: sqlite3.Connection, work: Path, sources: Sequence[Path],
                metas: Sequence[dict[str, str]], base: dict[str, Any]) -> None:
    def ints(key: str) -> int:
        return sum(int(m.get(key) or 0) for m in metas)

    sessions = sorted(s for m in metas for s in orjson.loads(m.get("sessions") or "[]"))
    prices: dict[str, Any] = {}
    for m in metas:
        prices.update(orjson.loads(m.get("prices") or "{}"))
    first = metas[0]
    meta = {
        "schema": first.get("schema", ""),
        "config_hash": config_hash(base),
        "config": orjson.dumps(base, option=orjson.OPT_SORT_KEYS).decode(),
        "created": repr(time.time()),
        "sessions": orjson.dumps(sessions).decode(),
        "plan_size": str(ints("plan_size")),
        "target": str(ints("target")),
        "prices": orjson.dumps(prices).decode(),
        "abandoned_calls": str(ints("abandoned_calls")),
        "abandoned_tokens": str(ints("abandoned_tokens")),
        "endpoints": orjson.dumps([e for m in metas for e in orjson.loads(m.get("endpoints") or "[]")]).decode(),
        "merged_from": orjson.dumps([str(p.resolve()) for p in sources]).decode(),
    }
    conn.execute("BEGIN")
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
    conn.execute("COMMIT")
    (work / "config.json").write_bytes(
        orjson.dumps(base, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
