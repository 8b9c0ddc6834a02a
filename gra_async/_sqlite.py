"""What the journal and the seed store both need from SQLite."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT on a connection opened with isolation_level=None; rolled back on
    error, unless SQLite rolled back already (a full disk does that): a second ROLLBACK
    would raise and hide the real error."""
    conn.execute("BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
