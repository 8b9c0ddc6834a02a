"""Seeds: read from files, given domains, kept on disk, drawn by the planner.

    _formats   seed files -> `Seed` records, one at a time, with file:line errors
    _domains   words, keywords, clustering into domains
    _store     `SeedStore`: the pool in SQLite, so memory does not grow with it
"""

from gra_async.seeds._domains import top_keywords
from gra_async.seeds._formats import Seed, read_seeds
from gra_async.seeds._store import SeedStore

__all__ = ["Seed", "SeedStore", "read_seeds", "top_keywords"]
