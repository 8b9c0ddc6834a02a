"""The seed pool in SQLite: memory stays flat however many seeds a run has.

Why on disk: 100,000 seeds are ~200 MB as Python objects, yet a task needs three of
them. Rows are numbered within their domain in the order they joined the pool, so
the pool of round r is positions 0..n-1 of each domain, and growing the pool for a
later round never renumbers what a plan already drew.

In a run directory the store is `seeds.sqlite`. It is built once from the seed files
(into a temporary file, renamed when complete), then reused on resume for as long
as its key (the files' digest, the field mapping, the domain count, the run seed)
is unchanged: a resume neither re-reads nor re-clusters 100,000 seeds.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gra_async import defaults
from gra_async._sqlite import transaction
from gra_async.config import PlannerConfig
from gra_async.errors import RunDirError
from gra_async.seeds._domains import FIT_SAMPLE, DomainModel, seed_tokens
from gra_async.seeds._formats import Seed, fail, read_seeds

__all__ = ["Frequencies", "SeedStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seeds (
    id TEXT NOT NULL UNIQUE,
    joined INTEGER NOT NULL,     -- the first round whose pool holds it
    domain TEXT NOT NULL,        -- '' until clustering names it
    pos INTEGER,                 -- its place in the domain's pool; NULL until numbered
    cluster INTEGER,             -- scratch while building
    instruction TEXT NOT NULL,
    response TEXT NOT NULL,
    source TEXT NOT NULL         -- file:line, for messages
);
CREATE UNIQUE INDEX IF NOT EXISTS seeds_pool ON seeds (domain, pos);
-- Word document frequencies per domain ('' = the whole pool) and joining round:
-- a domain's keywords cost its vocabulary, not a pass over every seed.
CREATE TABLE IF NOT EXISTS df (
    domain TEXT NOT NULL, term TEXT NOT NULL, joined INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (domain, term, joined)
) WITHOUT ROWID;
"""
_VERSION = "1"
_CHUNK = 1000  # seeds per read while building: bounds the memory of every pass
_CORPUS = ""

# (term -> seeds of the domain using it, domain size, term -> seeds of the pool using it, pool size)
Frequencies = tuple[dict[str, int], int, dict[str, int], int]


def _connect(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class SeedStore:
    """Seeds by id, by (domain, position) and by round, with their word frequencies."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # A seed's row and its place in the pool never change once numbered; looking them
        # up in SQLite for each task was 4% of a run's CPU (py-spy, bench/pipeline_bench.py
        # at 0 ms latency).
        self._by_id: dict[str, Seed] = {}
        self._at: dict[tuple[str, int], str] = {}
        conn.executescript(_SCHEMA)

    # --- building --------------------------------------------------------------------

    @classmethod
    def of(cls, seeds: Iterable[Seed], *, domains: int = defaults.DOMAINS, seed: int = 0) -> SeedStore:
        """An in-memory store of these seeds; those without a domain get one by clustering."""
        store = cls(_connect(":memory:"))
        store._fill(((f"seed {s.id!r}", s) for s in seeds), domains, seed)
        return store

    @classmethod
    def build(
        cls, source: Path | None, cfg: PlannerConfig, *, seed: int, path: Path | None = None,
        key: str = "",
    ) -> SeedStore:
        """The store of a seed file or folder (None: the bundled set), in memory or at `path`.

        A store at `path` with the same `key` is reused as it is; any other is rebuilt.
        Raises SeedError for bad seeds, RunDirError when `path` cannot be written.
        """
        if path is None:
            store = cls(_connect(":memory:"))
            store._fill(read_seeds(source, cfg), cfg.domains, seed)
            return store
        try:
            return _reusable(path, key) or _build_file(path, source, cfg, seed, key)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise RunDirError.writing(path.parent, exc, "the seed store") from None

    def _fill(self, rows: Iterable[tuple[str, Seed]], domains: int, seed: int) -> None:
        conn = self._conn
        with transaction(conn):
            for where, s in rows:
                try:
                    conn.execute(
                        "INSERT INTO seeds (id, joined, domain, instruction, response, source) "
                        "VALUES (?, 0, ?, ?, ?, ?)", (s.id, s.domain, s.instruction, s.response, where))
                except sqlite3.IntegrityError:
                    (first,) = conn.execute("SELECT source FROM seeds WHERE id = ?", (s.id,)).fetchone()
                    raise fail(where, f"duplicate id {s.id!r} (first at {first})",
                               "make ids unique or drop the id field") from None
            self._assign_domains(domains, seed)
            self._number_new()

    def _assign_domains(self, k: int, seed: int) -> None:
        """Cluster the seeds that have no domain (TF-IDF + k-means) and name each cluster."""
        conn = self._conn
        rowids = np.fromiter((r for (r,) in conn.execute(
            "SELECT rowid FROM seeds WHERE domain = '' ORDER BY rowid")), dtype=np.int64)
        if not rowids.size:
            return
        k = max(1, min(k, self._distinct_documents(k)))
        if rowids.size > FIT_SAMPLE:
            sample = random.Random(f"gra-domains/{seed}").sample(range(rowids.size), FIT_SAMPLE)
            fit_rows = rowids[sorted(sample)].tolist()
        else:
            fit_rows = rowids.tolist()
        model = DomainModel.fit(list(self._documents(fit_rows)), k, seed)
        weights = np.zeros_like(model.centroids)
        for start in range(0, rowids.size, _CHUNK):
            chunk = rowids[start : start + _CHUNK].tolist()
            labels, points = model.assign(list(self._documents(chunk)))
            for label in sorted(set(labels.tolist())):
                weights[label] += np.asarray(points[labels == label].sum(axis=0)).ravel()
            conn.executemany("UPDATE seeds SET cluster = ? WHERE rowid = ?",
                             zip(labels.tolist(), chunk, strict=True))
        taken = {d for (d,) in conn.execute("SELECT DISTINCT domain FROM seeds WHERE domain != ''")}
        used = [c for (c,) in conn.execute(
            "SELECT DISTINCT cluster FROM seeds WHERE cluster IS NOT NULL ORDER BY cluster")]
        for label in used:
            conn.execute("UPDATE seeds SET domain = ?, cluster = NULL WHERE cluster = ?",
                         (model.name(weights[label], taken), label))

    def _distinct_documents(self, enough: int) -> int:
        """How many unlabelled seeds differ in their words, counting no further than `enough`."""
        seen: set[tuple[str, ...]] = set()
        rows = self._conn.execute("SELECT instruction, response FROM seeds WHERE domain = ''")
        for instruction, response in rows:
            seen.add(tuple(sorted(seed_tokens(instruction, response))))
            if len(seen) >= enough:
                break
        return len(seen)

    def _documents(self, rowids: list[int]) -> Iterator[list[str]]:
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._conn.execute(
                f"SELECT instruction, response FROM seeds WHERE rowid IN ({marks}) ORDER BY rowid", part)
            for instruction, response in rows:
                yield seed_tokens(instruction, response)

    def _number_new(self) -> None:
        """Give new rows their pool positions (after the domain's last) and count their words."""
        conn = self._conn
        counts: Counter[tuple[str, str, int]] = Counter()
        rows = conn.execute("SELECT domain, joined, instruction, response FROM seeds "
                            "WHERE pos IS NULL ORDER BY rowid")
        while batch := rows.fetchmany(_CHUNK):
            for domain, joined, instruction, response in batch:
                for term in set(seed_tokens(instruction, response)):
                    counts[domain, term, joined] += 1
                    counts[_CORPUS, term, joined] += 1
            self._add_frequencies(counts)
            counts.clear()
        conn.execute(
            "CREATE TEMP TABLE numbering AS SELECT s.rowid AS rid, row_number() OVER "
            "(PARTITION BY s.domain ORDER BY s.rowid) - 1 + coalesce((SELECT max(p.pos) + 1 "
            "FROM seeds p WHERE p.domain = s.domain), 0) AS n FROM seeds s WHERE s.pos IS NULL")
        conn.execute("UPDATE seeds SET pos = numbering.n FROM numbering WHERE seeds.rowid = numbering.rid")
        conn.execute("DROP TABLE numbering")

    def _add_frequencies(self, counts: Counter[tuple[str, str, int]]) -> None:
        self._conn.executemany(
            "INSERT INTO df (domain, term, joined, n) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (domain, term, joined) DO UPDATE SET n = n + excluded.n",
            ((d, t, j, n) for (d, t, j), n in counts.items()))

    def add(self, seeds: Iterable[Seed], joined: int) -> None:
        """Seeds that join the pool from round `joined` on (accepted samples of earlier rounds).

        Adding a seed again is a no-op, so a resumed run re-adds safely. A new seed never
        joins a round older than the newest already in the pool: positions stay in joining
        order (this happens only when a resume raises the target of an earlier round).
        """
        conn = self._conn
        joined = max(joined, self._newest_round())
        with transaction(conn):
            for s in seeds:
                if not s.domain:
                    raise ValueError(f"seed {s.id!r} has no domain")
                inserted = conn.execute(
                    "INSERT INTO seeds (id, joined, domain, instruction, response, source) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (s.id, joined, s.domain, s.instruction, s.response, f"round {joined}"))
                if not inserted.rowcount and self.get(s.id) != s:
                    raise ValueError(f"seed id {s.id!r} is already used by a different seed")
            self._number_new()

    # --- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM seeds").fetchone()[0])

    def __iter__(self) -> Iterator[Seed]:
        """Every seed, in the order it was read or added."""
        rows = self._conn.execute("SELECT id, instruction, response, domain FROM seeds ORDER BY rowid")
        while batch := rows.fetchmany(_CHUNK):
            yield from (Seed(*row) for row in batch)

    def get(self, id: str) -> Seed:
        """The seed with this id; KeyError when there is none."""
        seed = self._by_id.get(id)
        if seed is None:
            row = self._conn.execute(
                "SELECT id, instruction, response, domain FROM seeds WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise KeyError(id)
            seed = self._by_id[id] = Seed(*row)
        return seed

    def domains(self) -> list[str]:
        return [d for (d,) in self._conn.execute("SELECT DISTINCT domain FROM seeds ORDER BY domain")]

    def pool_sizes(self, round: int) -> dict[str, int]:
        """Seeds per domain in the pool of `round`."""
        return dict(self._conn.execute(
            "SELECT domain, count(*) FROM seeds WHERE joined <= ? GROUP BY domain", (round,)))

    def ids_at(self, domain: str, positions: list[int]) -> tuple[str, ...]:
        """The ids at these positions of a domain's pool, in the order asked."""
        missing = [p for p in positions if (domain, p) not in self._at]
        if missing:
            marks = ",".join("?" * len(missing))
            for pos, id in self._conn.execute(
                    f"SELECT pos, id FROM seeds WHERE domain = ? AND pos IN ({marks})",
                    (domain, *missing)):
                self._at[domain, pos] = id
        return tuple(self._at[domain, p] for p in positions)

    def frequencies(self, domain: str, round: int) -> Frequencies:
        """Word document frequencies of a domain and of the whole pool, as of `round`."""
        rows = self._conn.execute(
            "SELECT d.term, sum(d.n), (SELECT sum(c.n) FROM df c WHERE c.domain = ?3 "
            "AND c.term = d.term AND c.joined <= ?2) FROM df d WHERE d.domain = ?1 "
            "AND d.joined <= ?2 GROUP BY d.term", (domain, round, _CORPUS))
        in_domain: dict[str, int] = {}
        in_pool: dict[str, int] = {}
        for term, n, total in rows:
            in_domain[term], in_pool[term] = n, total
        size = self._conn.execute("SELECT count(*) FROM seeds WHERE domain = ? AND joined <= ?",
                                  (domain, round)).fetchone()[0]
        pool = self._conn.execute("SELECT count(*) FROM seeds WHERE joined <= ?",
                                  (round,)).fetchone()[0]
        return in_domain, int(size), in_pool, int(pool)

    def _newest_round(self) -> int:
        return int(self._conn.execute("SELECT coalesce(max(joined), 0) FROM seeds").fetchone()[0])

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._conn.close()


def _reusable(path: Path, key: str) -> SeedStore | None:
    """The store at `path` if it was built from the same inputs and reads back whole."""
    if not path.exists():
        return None
    conn = _connect(path)
    try:
        store = SeedStore(conn)
        if store._meta("key") == key and store._meta("version") == _VERSION:
            return store
    except sqlite3.DatabaseError:
        pass  # damaged: rebuilt from the seed files like a store built from other inputs
    conn.close()
    return None


def _build_file(path: Path, source: Path | None, cfg: PlannerConfig, seed: int, key: str) -> SeedStore:
    """Build into `<path>.tmp` and rename: a kill mid-way leaves the old store or none."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    conn = _connect(tmp)
    try:
        # No rollback journal while building: the file is not in use until the rename.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        store = SeedStore(conn)
        store._fill(read_seeds(source, cfg), cfg.domains, seed)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("key", key), ("version", _VERSION)])
        conn.close()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    # A rollback journal left by a crash belongs to the file being replaced.
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + "-journal").unlink()
    os.replace(tmp, path)
    return SeedStore(_connect(path))
