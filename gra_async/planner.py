"""A deterministic stream of generation tasks from the seed pool (docs/architecture.md).

Task i of round r is a pure function of (pool, run seed, r, i): the same in every
process that builds the same seed store, which is what makes resume exact without
storing the plan. The pool lives in a `SeedStore` on disk, so memory is O(1) in both
seeds and tasks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gra_async.seeds import Seed, SeedStore, top_keywords

__all__ = ["Planner", "SeedPlan", "Task"]


@dataclass(frozen=True, slots=True)
class Task:
    """One generation request: which domain, which seed examples."""

    id: str
    round: int
    index: int
    domain: str
    seed_ids: tuple[str, ...]


def _rng(*parts: object) -> random.Random:
    """A RNG per (run seed, round, index): Python's hash() is salted per process, sha256 is not."""
    digest = hashlib.sha256("/".join(map(str, ("gra-planner", *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


class Planner:
    """The task stream of a run: domains round-robin (shuffled per cycle), few-shot seeds at random.

    Every domain gets a task once per cycle of `len(domains)` tasks, whatever its size,
    so a small domain is not drowned by a large one.
    """

    def __init__(self, seeds: SeedStore, run_seed: int, few_shot: int) -> None:
        if few_shot < 0:
            raise ValueError("few_shot must be >= 0")
        if not len(seeds):
            raise ValueError("Planner needs at least one seed")
        self.run_seed = run_seed
        self.few_shot = few_shot
        self._seeds = seeds
        self._keywords: dict[tuple[str, int, int], list[str]] = {}

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain, sorted: the order is part of the plan, so it must not depend on input order."""
        return tuple(self._seeds.domains())

    def __len__(self) -> int:
        return len(self._seeds)

    def add_seeds(self, new: Iterable[Seed], round: int) -> None:
        """Grow the pool from `round` on (accepted samples join the next round); re-adding is a no-op."""
        self._seeds.add(new, joined=round)
        self._keywords.clear()  # keywords weigh words against the whole pool

    def seed(self, id: str) -> Seed:
        """The seed with this id; KeyError when there is none."""
        return self._seeds.get(id)

    def keywords(self, domain: str, round: int, n: int = 5) -> list[str]:
        """The words that mark a domain in the pool of `round`, cached until the pool grows."""
        key = (domain, round, n)
        if key not in self._keywords:
            self._keywords[key] = top_keywords(*self._seeds.frequencies(domain, round), n)
        return list(self._keywords[key])

    def tasks(self, round: int, start: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[Task]:
        """Tasks `start`, `start + 1`, ... of a round, without end.

        The pool is fixed when this is called (seeds added later join the next call),
        so the stream does not depend on when `add_seeds` runs. With `shard=(i, n)` only
        the tasks whose index is i modulo n: n shards split the same plan without overlap
        (task ids stay those of the whole plan), and a shard takes every domain in turn
        as the whole plan does, since the domains' cycle is interleaved, not cut in blocks.
        """
        if start < 0:
            raise ValueError("start must be >= 0")
        part, count = shard
        if not 0 <= part < count:
            raise ValueError("shard must be (i, n) with 0 <= i < n")
        sizes = self._seeds.pool_sizes(round)
        domains = sorted(sizes)
        order: list[str] = []
        cycle = -1
        index = start
        while True:
            if index // len(domains) != cycle:
                cycle = index // len(domains)
                order = list(domains)
                _rng(self.run_seed, round, "cycle", cycle).shuffle(order)
            if index % count != part:
                index += 1
                continue
            domain = order[index % len(domains)]
            rng = _rng(self.run_seed, round, index)
            picks = rng.sample(range(sizes[domain]), min(self.few_shot, sizes[domain]))
            yield Task(
                id=f"r{round}-{index:07d}",
                round=round,
                index=index,
                domain=domain,
                seed_ids=self._seeds.ids_at(domain, picks),
            )
            index += 1


class SeedPlan(Planner):
    """`refine`'s plan: task i of the round is seed i of the seed file, in file order.

    Each task carries its one seed as `seed_ids`; the shard split is the generation plan's
    (tasks I, I+N, ...), so refine shards merge as run shards do.
    """

    def __init__(self, seeds: SeedStore, run_seed: int) -> None:
        super().__init__(seeds, run_seed, few_shot=0)

    def tasks(self, round: int, start: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[Task]:
        part, count = shard
        for index, seed in enumerate(self._seeds):
            if index >= start and index % count == part:
                yield Task(id=f"r{round}-{index:07d}", round=round, index=index,
                           domain=seed.domain, seed_ids=(seed.id,))
