"""The models of a run and who plays which role for each task (README: How a sample is made, Roles).

`fixed`: the endpoints' configured roles; the panel is the distinct reviewer models.
`rotate` (the paper's): every configured model is one pool; per task the generator is
drawn at random, the reviewers are the other models, and the adjudicator is drawn from
the models other than the generator. Draws are seeded by (run seed, task id), so a
resumed run gives every task the same team it had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from dataclasses import dataclass

from gra_async._concurrency import first_error
from gra_async.accounting import batch_prices
from gra_async.client import (
    Endpoint,
    EndpointPool,
    EndpointStats,
    RetryPolicy,
    Transport,
    probe,
    probe_embeddings,
)
from gra_async.config import EMBEDDER, ROLES, EndpointConfig, JsonMode, Role, RunConfig
from gra_async.errors import ConfigError

__all__ = ["Assignment", "Team", "build_team"]


@dataclass(frozen=True, slots=True)
class Assignment:
    generator: str
    reviewers: tuple[str, ...]
    adjudicator: str | None


@dataclass(slots=True)
class Team:
    """Pools per role (in `rotate` all three are the same pool) and the role draw."""

    mode: str
    pools: dict[Role, EndpointPool]
    panel_size: int | None  # None: every eligible reviewer model
    run_seed: int
    json_modes: dict[str, JsonMode]  # model -> how its server takes structured output
    prices: dict[str, tuple[float, float]]  # model -> (in, out) per million tokens
    batch_prices: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def models(self, role: Role) -> tuple[str, ...]:
        pool = self.pools.get(role)
        return pool.models if pool is not None else ()

    def assign(self, task_id: str) -> Assignment:
        digest = hashlib.sha256(f"gra-team/{self.run_seed}/{task_id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:16], "big"))
        generator = rng.choice(self.models("generator"))
        reviewers = list(self.models("reviewer"))
        adjudicators = list(self.models("adjudicator"))
        if self.mode == "rotate":
            reviewers = [m for m in reviewers if m != generator]
            adjudicators = [m for m in adjudicators if m != generator]
        if self.panel_size is not None and self.panel_size < len(reviewers):
            reviewers = sorted(rng.sample(reviewers, self.panel_size), key=reviewers.index)
        adjudicator = rng.choice(adjudicators) if adjudicators else None
        return Assignment(generator, tuple(reviewers), adjudicator)

    def capacity(self) -> int:
        """Calls all chat endpoints together take at once: more tasks in flight would only
        queue. The embedder's are left out: a task holds its call for a moment only."""
        endpoints = {id(e): e for r, p in self.pools.items() if r != EMBEDDER
                     for e in p.endpoints}
        return sum(e.cap for e in endpoints.values())

    def binding_caps(self, concurrency: int) -> list[str]:
        """Each role whose endpoints' own caps add up to less than the run's concurrency:
        the limit that binds below what the user asked for, and where to raise it."""
        notes, seen = [], set()
        for role, pool in self.pools.items():
            if id(pool) in seen or role == EMBEDDER:  # rotate: one pool serves every role
                continue
            seen.add(id(pool))
            caps = [e.config.max_concurrency for e in pool.endpoints]
            if all(caps) and (total := sum(c for c in caps if c)) < concurrency:
                notes.append(f"{role} endpoints take at most {total} calls at once "
                             f"(their max_concurrency), below the run's concurrency of "
                             f"{concurrency}: raise max_concurrency in [[endpoints.{role}]] "
                             "to use it")
        return notes

    def stats_pools(self) -> list[EndpointPool]:
        """Each distinct pool once (rotate shares one)."""
        return list({id(p): p for p in self.pools.values()}.values())

    def endpoints(self) -> list[tuple[Endpoint, tuple[Role, ...]]]:
        """Each endpoint once, with the roles it serves: one server may play several
        (the embedded default's replicas serve all three)."""
        found: dict[int, tuple[Endpoint, list[Role]]] = {}
        for role, pool in self.pools.items():
            for endpoint in pool.endpoints:
                found.setdefault(id(endpoint), (endpoint, []))[1].append(role)
        return [(endpoint, tuple(roles)) for endpoint, roles in found.values()]

    def stats(self) -> list[EndpointStats]:
        """A snapshot of each endpoint once, its roles filled in."""
        return [dataclasses.replace(endpoint.stats(), roles=roles)
                for endpoint, roles in self.endpoints()]


def _distinct(configs: list[EndpointConfig]) -> list[EndpointConfig]:
    seen: dict[tuple[str, str | None], EndpointConfig] = {}
    for config in configs:
        seen.setdefault((config.base_url, config.model), config)
    return list(seen.values())


async def build_team(
    config: RunConfig, transport: Transport, *, policy: RetryPolicy | None = None
) -> Team:
    """Make endpoints, probe each once (as doctor does), and group them into role pools.

    Raises `EndpointError` (exit 2) naming the first endpoint that is unreachable,
    refuses the key or does not serve its model.
    """
    by_role = {role: list(config.endpoints.get(role, ())) for role in ROLES}
    if not by_role["generator"] and config.run.roles == "fixed":
        raise ConfigError("no generator endpoint configured (add --endpoint generator=URL)")
    cache: dict[tuple[str, str | None], Endpoint] = {}

    def endpoint(cfg: EndpointConfig) -> Endpoint:
        key = (cfg.base_url, cfg.model)
        if key not in cache:
            cache[key] = Endpoint(cfg, transport, uncapped=config.run.concurrency)
        return cache[key]

    if config.run.roles == "rotate":
        everyone = [endpoint(c) for c in _distinct([c for r in ROLES for c in by_role[r]])]
        groups: dict[Role, list[Endpoint]] = dict.fromkeys(ROLES, everyone)
    else:
        groups = {role: [endpoint(c) for c in _distinct(by_role[role])] for role in ROLES}
    # Its own pool in either mode: an embedding model never writes or reviews. Only the
    # first model is asked (one run keeps one embedding space); more entries are replicas.
    embedder_configs = _distinct(list(config.endpoints.get(EMBEDDER, ()))
                                 if config.semantic_dedup else [])
    embedders = [endpoint(c) for c in embedder_configs]
    try:
        async with asyncio.TaskGroup() as group:  # one endpoint refusing us cancels the others
            for member in cache.values():
                group.create_task(probe(member, transport))
        async with asyncio.TaskGroup() as group:
            for member in embedders:
                group.create_task(probe_embeddings(member))
    except BaseExceptionGroup as errors:
        raise first_error(errors) from None

    pools: dict[Role, EndpointPool] = {}
    shared: EndpointPool | None = None
    for role, members in groups.items():
        if not members:
            continue
        if config.run.roles == "rotate":
            shared = shared or EndpointPool(members, policy=policy)
            pools[role] = shared
        else:
            pools[role] = EndpointPool(members, policy=policy)
    if not config.gate.adjudicator:
        pools.pop("adjudicator", None)
    if embedders:
        pools[EMBEDDER] = EndpointPool(embedders, policy=policy)
    team = Team(
        mode=config.run.roles,
        pools=pools,
        panel_size=config.run.reviewers,
        run_seed=config.run.seed,
        json_modes={e.model: e.config.json_mode for e in reversed(list(cache.values()))},
        prices={e.model: (e.config.price_in, e.config.price_out)
                for e in reversed(list(cache.values()))},
    )
    team.batch_prices = batch_prices(team.prices, {
        e.model: e.config.batch_discount for e in reversed(list(cache.values()))})
    if config.run.roles == "rotate" and len(team.models("generator")) < 2:
        raise ConfigError(
            "--roles rotate needs at least two distinct models (a model never reviews its own "
            "sample); configure more models or use --roles fixed"
        )
    return team
